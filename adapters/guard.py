"""Collapse guard: reset the adapter before unsupervised adaptation degenerates.

Entropy minimisation can collapse (every input mapped to one confident class) or drift far from the
source weights on long streams. The guard watches cheap, label-free signals after every step and
names the reason when it asks for a reset. Off by default (paper-faithful benchmark); the service
turns it on.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

ENTROPY_COLLAPSE = "entropy_collapse"
CLASS_COLLAPSE = "class_collapse"
PARAMETER_DRIFT = "parameter_drift"
PERIODIC = "periodic"
MANUAL = "manual"
RESET_REASONS = (ENTROPY_COLLAPSE, CLASS_COLLAPSE, PARAMETER_DRIFT, PERIODIC, MANUAL)


class CollapseGuardOptions(BaseModel):
    """When to reset to the source model. Each criterion is off when set to None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    min_entropy_ratio: float | None = Field(
        0.05, ge=0, description="reset when the entropy moving average falls below this fraction of E0"
    )
    max_class_fraction: float | None = Field(
        0.6, gt=0, le=1, description="reset when one class takes more than this share of recent predictions"
    )
    window: int = Field(1000, ge=1, description="recent predictions judged by max_class_fraction")
    max_drift: float | None = Field(
        0.5, gt=0, description="reset when the relative L2 drift of adapted parameters exceeds this"
    )
    every_steps: int | None = Field(None, ge=1, description="reset every N adaptation steps (RDumb-style)")
    min_steps: int = Field(10, ge=0, description="steps after a reset before the signal criteria apply")


class CollapseGuard:
    """Judges the adapter's health after each step; returns the reason to reset, or None."""

    def __init__(self, options: CollapseGuardOptions) -> None:
        self.options = options
        self._recent: deque[int] = deque(maxlen=options.window)
        self._steps_since_reset = 0

    def observe(self, predictions: torch.Tensor) -> None:
        self._steps_since_reset += 1
        if self.options.max_class_fraction is not None:
            self._recent.extend(predictions.detach().cpu().tolist())

    def check(self, entropy_ema: float | None, e0: float | None, drift: float) -> str | None:
        opts = self.options
        if not opts.enabled:
            return None
        if opts.every_steps is not None and self._steps_since_reset >= opts.every_steps:
            return PERIODIC
        if self._steps_since_reset < opts.min_steps:
            return None
        if (
            opts.min_entropy_ratio is not None
            and entropy_ema is not None
            and e0 is not None
            and entropy_ema < opts.min_entropy_ratio * e0
        ):
            return ENTROPY_COLLAPSE
        if opts.max_class_fraction is not None and len(self._recent) >= opts.window:
            counts = torch.bincount(torch.tensor(list(self._recent)))
            if counts.max().item() / len(self._recent) > opts.max_class_fraction:
                return CLASS_COLLAPSE
        if opts.max_drift is not None and drift > opts.max_drift:
            return PARAMETER_DRIFT
        return None

    def reset(self) -> None:
        self._recent.clear()
        self._steps_since_reset = 0

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self._recent), "steps_since_reset": self._steps_since_reset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._recent = deque(state.get("recent", []), maxlen=self.options.window)
        self._steps_since_reset = int(state.get("steps_since_reset", 0))
