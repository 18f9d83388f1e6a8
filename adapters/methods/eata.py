"""eata: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022).

Adapts only on *reliable* (entropy below E0) and *non-redundant* (dissimilar to the moving average
of recent predictions) samples, re-weights their entropy by exp(E0 - H), and penalises moving
important parameters (Fisher diagonal) away from the source.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from adapters.base import Adapter, OptimizedOptions, entropy
from adapters.fisher import FisherInfo
from adapters.registry import register

# Reference redundancy thresholds, expressed as multiples of 1/sqrt(C) (the cosine of a one-hot vector
# with a uniform average): 0.4 at C=10, 0.1 at C=100, 0.05 at C=1000. Interpolated in log10(C).
_EPS_ANCHORS = ((1.0, 0.4 * math.sqrt(10)), (2.0, 0.1 * math.sqrt(100)), (3.0, 0.05 * math.sqrt(1000)))


def default_redundancy_eps(num_classes: int) -> float:
    """The redundancy threshold for C classes, matching the references at C = 10, 100, 1000."""
    xs, ks = zip(*_EPS_ANCHORS, strict=True)
    k = float(np.interp(math.log10(max(num_classes, 2)), xs, ks))
    return min(k / math.sqrt(num_classes), 0.99)


class EataOptions(OptimizedOptions):
    e0: float | None = Field(None, gt=0, description="entropy margin E0; default e0_factor * ln(C)")
    e0_factor: float = Field(0.4, gt=0, description="E0 = e0_factor * ln(C) when e0 is not given")
    redundancy_eps: float | None = Field(
        None, gt=0, description="cosine threshold; default 0.4 (C=10), 0.1 (C=100), 0.05 (C=1000), interpolated"
    )
    ma_momentum: float = Field(0.9, ge=0, lt=1, description="weight of the old moving average")
    fisher_alpha: float = Field(1.0, ge=0, description="Fisher penalty weight (CIFAR 1.0, ImageNet 2000)")
    max_selected: float | None = Field(
        None, gt=0, le=1, description="adapt on at most this share of each batch (rounded up), the least redundant "
        "selected samples (lowest |cosine| to the moving average; before it exists, the lowest entropy): with "
        "backward='selected' it bounds the cost of a step (None: the paper, every selected sample)",
    )


@register
class Eata(Adapter):
    name = "eata"
    Options = EataOptions
    updates_parameters = True
    uses_fisher = True
    options: EataOptions

    def __init__(self, model: nn.Module, options: EataOptions, *, fisher: FisherInfo | None = None,
                 **kwargs) -> None:
        super().__init__(model, options, **kwargs)
        self.fisher: dict[str, torch.Tensor] | None = None
        if fisher is not None:
            fisher.check_model(model, expected_hash=self.source_hash)
            if set(fisher.fisher) != set(self.params):
                raise ValueError("Fisher information does not cover this model's adaptable parameters")
            self.fisher = {n: f.to(self.device) for n, f in fisher.fisher.items()}

    @property
    def e0(self) -> float | None:
        if self.options.e0 is not None:
            return self.options.e0
        return None if self.num_classes is None else self.options.e0_factor * math.log(self.num_classes)

    @property
    def redundancy_eps(self) -> float | None:
        if self.options.redundancy_eps is not None:
            return self.options.redundancy_eps
        return None if self.num_classes is None else default_redundancy_eps(self.num_classes)

    def select(self, logits: torch.Tensor, ent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reliable = ent < self.e0
        average = self.prob_cache.get()
        if average is None:
            return reliable, self._at_most(reliable, ent)
        cosine = F.cosine_similarity(logits.softmax(1), average.to(logits.device).unsqueeze(0), dim=1).abs()
        return reliable, self._at_most(reliable & (cosine < self.redundancy_eps), cosine)

    def _at_most(self, selected: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """``selected`` cut to ``max_selected`` of the batch, the samples of lowest ``score``."""
        if self.options.max_selected is None:
            return selected
        cap = math.ceil(self.options.max_selected * selected.shape[0])
        if int(selected.sum()) <= cap:
            return selected
        ranked = torch.where(selected, score, torch.full_like(score, float("inf"))).argsort()[:cap]
        kept = torch.zeros_like(selected)
        kept[ranked] = True
        return kept

    def weighted_entropy(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample entropy and its EATA weight exp(E0 - H) (weight on detached H)."""
        ent = entropy(logits)
        return ent, torch.exp(self.e0 - ent.detach())

    def loss(self, x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ent, weight = self.weighted_entropy(logits[mask])
        return (weight * ent).mean() + self.fisher_penalty()

    def fisher_penalty(self) -> torch.Tensor | float:
        """alpha * sum_i F_i (theta_i - theta0_i)^2; zero without Fisher information.

        Over all parameters at once (foreach ops): a few tensor operations instead of three per parameter,
        each of which waits for the GIL again when the server's event loop is busy.
        """
        if self.fisher is None or self.options.fisher_alpha == 0:
            return 0.0
        diffs = self.differences_from_source()
        weighted = torch._foreach_mul(torch._foreach_mul(diffs, diffs), [self.fisher[n] for n in self.params])
        return self.options.fisher_alpha * torch.cat([w.reshape(-1) for w in weighted]).sum()

    def after_update(self, probs: torch.Tensor) -> None:
        self.prob_cache.update(probs.mean(0), self.options.ma_momentum)

    def describe(self) -> dict:
        info = super().describe()
        info.update(redundancy_eps=self.redundancy_eps, fisher=self.fisher is not None)
        return info
