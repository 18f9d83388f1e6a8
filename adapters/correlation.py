"""Label-free signs that a batch is class-correlated (one camera scene, one kind of object).

An i.i.d. batch of 64 CIFAR-10 images covers nearly every class; a batch cut from a class-sorted
stream holds one or two. The entropy of the batch's predicted-class histogram tells them apart, but
not alone: under heavy noise the frozen model itself predicts few classes on i.i.d. batches (0.46 of
the maximum entropy on gaussian noise, against 0.37 for one-class batches of the same images). So a
batch is judged against the recent traffic: :class:`ClassMixMonitor` keeps a moving average of the
histograms, and a batch whose entropy falls well below that of the recent mix is correlated
(measured in docs/benchmarks.md: about 1.0 on shuffled streams, 0.5-0.7 on sorted ones).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def class_histogram(logits: torch.Tensor) -> torch.Tensor:
    """Fractions of the batch predicted as each class."""
    counts = torch.bincount(logits.argmax(1).cpu(), minlength=logits.shape[1]).double()
    return counts / max(logits.shape[0], 1)


def class_diversity(logits: torch.Tensor) -> float:
    """Entropy of the histogram of predicted classes over its maximum, ln(min(N, C)), in [0, 1].

    1.0 when the batch's predictions are spread as evenly as N samples allow; 0.0 when one class
    takes every sample. A batch of one sample counts as fully diverse (nothing to judge).
    """
    n, num_classes = logits.shape
    if n < 2 or num_classes < 2:
        return 1.0
    return max(0.0, _entropy(class_histogram(logits)) / math.log(min(n, num_classes)))


class ClassMixMonitor:
    """Moving average of predicted-class histograms; scores a batch's diversity relative to it.

    ``relative_diversity`` = H(batch histogram) / H(moving average including this batch): about 1 for
    a batch like the recent traffic, lower for a batch of fewer classes than the traffic has shown.
    The first batches score 1 (the average is the batch itself): a stream is never judged correlated
    before it has shown more than one mix of classes.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        self.momentum = momentum
        self.average: torch.Tensor | None = None

    def _mixed(self, histogram: torch.Tensor) -> torch.Tensor:
        if self.average is None:
            return histogram
        return self.momentum * self.average + (1 - self.momentum) * histogram

    def score(self, logits: torch.Tensor) -> float:
        """The batch's relative diversity, without recording it (serving without adapting)."""
        histogram = class_histogram(logits)
        recent = _entropy(self._mixed(histogram))
        return 1.0 if recent <= 1e-9 else _entropy(histogram) / recent

    def observe(self, logits: torch.Tensor) -> float:
        """Score the batch, then add its histogram to the moving average."""
        histogram = class_histogram(logits)
        mixed = self._mixed(histogram)
        recent = _entropy(mixed)
        self.average = mixed
        return 1.0 if recent <= 1e-9 else _entropy(histogram) / recent

    def reset(self) -> None:
        self.average = None

    def state_dict(self) -> dict[str, Any]:
        return {"average": None if self.average is None else self.average.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        average = state.get("average")
        self.average = None if average is None else average.clone().double()
