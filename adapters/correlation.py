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

import functools
import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


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


@functools.lru_cache(maxsize=256)
def iid_class_diversity(n: int, num_classes: int) -> float:
    """The expected :func:`class_diversity` of ``n`` predictions drawn uniformly from ``num_classes``.

    Why: a small i.i.d. batch cannot fill every class evenly (16 draws from 10 classes: 0.86; 64: 0.97), so
    its raw diversity would read as correlation. Exact: each class's count is Binomial(n, 1/C), and the
    histogram's entropy is a sum over classes.
    """
    if n < 2 or num_classes < 2:
        return 1.0
    p = 1.0 / num_classes
    log_n = math.lgamma(n + 1)
    expected = 0.0
    for k in range(1, n + 1):
        log_pk = log_n - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
        expected -= math.exp(log_pk) * (k / n) * math.log(k / n)
    return num_classes * expected / math.log(min(n, num_classes))


def relative_class_diversity(logits: torch.Tensor) -> float:
    """:func:`class_diversity` over what an i.i.d. batch of the same size would show, at most 1."""
    n, num_classes = logits.shape
    return min(1.0, class_diversity(logits) / iid_class_diversity(n, num_classes))


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


class SwitchOptions(BaseModel):
    """When ``bn_stats='auto'`` judges the traffic class-correlated, and back (see :class:`CorrelationSwitch`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enter: float = Field(
        0.825, ge=0, le=1, description="smoothed probe diversity (relative to an i.i.d. batch of the same size) "
        "below which traffic is correlated"
    )
    leave: float = Field(0.95, ge=0, le=1, description="smoothed relative probe diversity above which it is i.i.d.")
    smoothing: float = Field(
        0.5, ge=0, lt=1, description="weight of the old smoothed score per full probe; a probe of fewer than "
        "probe_images images moves the score less, in proportion"
    )
    batch_layers: float = Field(
        0.5, gt=0, lt=1, description="share of the BatchNorm layers (the shallow ones) the probe normalises with "
        "the batch; the rest use the source statistics"
    )
    probe_images: int = Field(64, ge=2, description="images of a batch the probe re-predicts")
    probe_every: int = Field(4, ge=1, description="probe every this many adaptation steps")
    always_correlated: bool = Field(
        False, description="treat all traffic as correlated (correlated_traffic 'always'); probes are still "
        "scored, for the metrics"
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> SwitchOptions:
        if self.leave < self.enter:
            raise ValueError(f"leave ({self.leave}) must not be below enter ({self.enter})")
        return self


class CorrelationSwitch:
    """Decides per stream, not per batch, whether traffic is class-correlated.

    Why per stream: a camera that sends one kind of object at a time does so for long stretches, and a
    server that serves i.i.d. traffic keeps doing so; only the mode's changes need detecting. The score
    is the class diversity (:func:`class_diversity`) of a *probe*: the batch re-predicted without
    gradient, its shallow BatchNorm layers normalised with the batch and its deep ones with the source
    statistics (:func:`adapters.robust_norm.probing`). Neither the served predictions would do: with
    batch statistics a one-class batch loses its class signal and looks diverse; with source (or
    slowly moving) statistics a new corruption makes an i.i.d. batch collapse onto a few classes and
    look correlated. The probe sees through both. The score is the diversity relative to an i.i.d. batch
    of the same size (:func:`relative_class_diversity`), smoothed over probes with each probe weighted by
    its share of ``probe_images`` (16 images are a quarter of the evidence of 64: on a shallow model one
    16-image probe of a strongly shifted i.i.d. batch once read 0.36 and flipped the switch); the two
    thresholds (``enter`` < ``leave``) keep a single odd batch from flipping the mode. At a full probe
    of 64 images over 10 classes, enter 0.825 is the raw diversity 0.8 chosen on the validation
    corruptions (an i.i.d. batch of 64 reads 0.968). Leaving is the riskier error, so it needs the score
    of i.i.d. traffic: 0.95, just below the least diverse shuffled probe on the validation corruptions
    (0.96, speckle noise). Wrongly correlated, a server answers about as the frozen model with LAME;
    wrongly i.i.d. on a run of one class, the papers' batch statistics and updates lose 30 points or more
    (heavy noise lifts a one-class probe to 0.9: docs/benchmarks.md, "Long class runs").
    """

    def __init__(self, options: SwitchOptions) -> None:
        self.options = options
        self.smoothed = 1.0
        self.correlated = options.always_correlated
        self.switches = 0
        self._steps = 0

    def probe_due(self) -> bool:
        """Whether this adaptation step is one to probe: the first, then every ``probe_every``-th (the
        first step's probe is the earliest evidence a class-sorted stream gives)."""
        self._steps += 1
        return (self._steps - 1) % self.options.probe_every == 0

    def observe(self, diversity: float, images: int | None = None) -> bool:
        """Add one probe's relative class diversity, measured on ``images`` images (default: a full probe);
        returns whether traffic is now judged correlated."""
        opts = self.options
        weight = (1 - opts.smoothing) * min(1.0, (images or opts.probe_images) / opts.probe_images)
        self.smoothed = (1 - weight) * self.smoothed + weight * diversity
        if opts.always_correlated:
            return True
        now = self.smoothed < opts.enter if not self.correlated else self.smoothed <= opts.leave
        if now != self.correlated:
            self.switches += 1
        self.correlated = now
        return now

    def reset(self) -> None:
        self.smoothed, self.correlated = 1.0, self.options.always_correlated

    def state_dict(self) -> dict[str, Any]:
        return {"smoothed": self.smoothed, "correlated": self.correlated, "switches": self.switches,
                "steps": self._steps}  # the probe cadence: a resumed adapter probes on the same steps

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.smoothed = float(state.get("smoothed", 1.0))
        self.correlated = bool(state.get("correlated", False))
        self.switches = int(state.get("switches", 0))
        self._steps = int(state.get("steps", 0))
