"""The redundancy filter's moving average of predicted probabilities, behind a small interface.

EATA keeps m, a moving average of the probability vectors of the samples it adapted on, and skips
samples too similar to it. Several replicas must share m, so the algorithm talks only to a
:class:`ProbabilityCache`; the in-process one here is the default, a Redis one plugs in later.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ProbabilityCache(Protocol):
    """Holds the moving average m of selected samples' probabilities (no gradient)."""

    def get(self) -> torch.Tensor | None:
        """The current m (a 1-D tensor of length C), or None before the first selection."""

    def update(self, batch_mean: torch.Tensor, momentum: float) -> None:
        """m <- batch_mean if m is unset, else momentum * m + (1 - momentum) * batch_mean (atomically)."""

    def clear(self) -> None:
        """Forget m (part of every reset)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class InProcessProbabilityCache:
    """The single-process store: a tensor in memory."""

    def __init__(self) -> None:
        self._mean: torch.Tensor | None = None

    def get(self) -> torch.Tensor | None:
        return None if self._mean is None else self._mean.clone()

    def update(self, batch_mean: torch.Tensor, momentum: float) -> None:
        batch_mean = batch_mean.detach().float().cpu()
        if self._mean is None:
            self._mean = batch_mean.clone()
        else:
            self._mean = momentum * self._mean + (1.0 - momentum) * batch_mean

    def clear(self) -> None:
        self._mean = None

    def state_dict(self) -> dict[str, Any]:
        return {"mean": None if self._mean is None else self._mean.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = state.get("mean")
        self._mean = None if mean is None else torch.as_tensor(mean).clone().float()
