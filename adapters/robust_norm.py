"""Robust BatchNorm statistics: source statistics moved only partly towards each batch.

Why: the papers normalise with the current batch's statistics. On class-correlated traffic (a camera
sees one kind of object for a while) a batch holds one or two classes, and its statistics are those
classes', not the domain's: BN-adapt then loses 40-50 points on CIFAR-10-C (docs/benchmarks.md). Two
fixes from the literature, neither with an extra forward pass:

* ``ema`` (RoTTA's RBN): a moving average that starts at the source statistics; each adapted batch
  moves it by ``momentum`` (0.05) and the batch is normalised with the moved average. A run of one
  class shifts it by little; a new corruption is followed within ~1/momentum batches.
* ``mix`` (alpha-BN): normalise with ``(1 - alpha) * source + alpha * batch``; no state, so it never
  follows a domain fully, but never drifts either.
* ``auto``: what a batch is normalised with is switched by
  :class:`adapters.correlation.CorrelationSwitch`: the batch's own statistics (the papers) while the
  traffic looks i.i.d.; while it looks class-correlated, the probe's split (:func:`normalise_split`):
  the shallow layers the batch's statistics, which undo a corruption for any class mix, the deep ones
  the source statistics, which keep the class signal of a one-class batch. No moving average follows
  the traffic in correlated mode: on runs of one class longer than ~1/momentum batches (the
  mariodoebler benchmark's 1,000-image runs) any average of raw batches becomes that class's
  statistics (measured: docs/benchmarks.md, "Long class runs"). ``ema``'s average is kept, recorded
  only while the traffic looks i.i.d., for batches too small to estimate statistics.

Layers are replaced by :class:`RobustBatchNorm`, which keeps the original affine parameters (the same
``Parameter`` objects, so names, optimiser and Fisher information are unchanged). Gradients flow
through the batch part of the statistics, as in RoTTA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from adapters.configure import BATCH_NORMS

StatisticsMode = Literal["batch", "ema", "mix", "auto"]


class RobustBatchNorm(nn.BatchNorm2d):
    """BatchNorm over any input with >= 2 dims whose statistics are a blend of source and batch.

    ``running_mean``/``running_var`` hold the statistics used without a batch part (the moving
    average in ``ema`` mode, the source in ``mix`` mode); ``source_mean``/``source_var`` (plain
    attributes, outside the model's state dict) keep the source for :meth:`reset`.
    """

    def __init__(self, layer: nn.modules.batchnorm._BatchNorm, mode: StatisticsMode, momentum: float) -> None:
        if mode not in ("ema", "mix"):  # 'auto' layers are 'ema' layers whose blend is switched
            raise ValueError(f"unknown robust statistics mode {mode!r}")
        super().__init__(layer.num_features, eps=layer.eps, affine=layer.affine, track_running_stats=True,
                         device=layer.running_mean.device if layer.running_mean is not None else None)
        if layer.affine:
            self.weight = layer.weight  # the same Parameter objects: names and optimiser state carry over
            self.bias = layer.bias
        if layer.running_mean is not None and layer.running_var is not None:
            with torch.no_grad():
                self.running_mean.copy_(layer.running_mean)
                self.running_var.copy_(layer.running_var)
        self.source_mean = self.running_mean.clone()
        self.source_var = self.running_var.clone()
        self.mode = mode
        #: Weight of the batch in the statistics a forward normalises with (``ema``/``mix``: the momentum
        #: or alpha; ``auto`` sets it per step).
        self.blend = momentum
        #: Weight of the batch in the moving average (``ema``; 0 for ``mix``, which keeps no average).
        self.momentum = momentum
        #: Normalise with the source statistics alone (the correlation probe's deep layers; see
        #: :func:`probing`).
        self.use_source = False
        #: The next forward in batch mode computes the moving average's next value (``ema`` only) into
        #: ``pending``, then this turns off; :func:`commit` stores it, or the adapter drops it.
        self.armed = False
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.training = layer.training

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.use_source:
            mean, var = self.source_mean.to(x.device), self.source_var.to(x.device)
        elif self.training and self.blend >= 1.0:
            return self._batch_forward(x)
        elif self.training:
            dims = [0, *range(2, x.dim())]
            # alpha-BN mixes the unbiased batch variance, RBN the biased one (as in their references).
            batch_var, batch_mean = torch.var_mean(x, dims, correction=1 if self.mode == "mix" else 0)
            mean = (1 - self.blend) * self.running_mean + self.blend * batch_mean
            var = (1 - self.blend) * self.running_var + self.blend * batch_var
            if self.mode != "mix" and self.armed:
                if self.momentum == self.blend:  # RBN: the average's next value is what this pass used
                    self.pending = (mean.detach(), var.detach())
                else:
                    m = self.momentum
                    self.pending = ((1 - m) * self.running_mean + m * batch_mean.detach(),
                                    (1 - m) * self.running_var + m * batch_var.detach())
                self.armed = False
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return x * scale.view(shape) + shift.view(shape)

    def _batch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The papers' normalisation (the batch alone) through the native kernel; when armed, the kernel
        also computes the moving average's next value into copies (its variance is the unbiased one,
        n/(n-1) with n = images x pixels: no measurable difference)."""
        if not self.armed or self.mode == "mix":
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum, self.eps)
        self.pending = (mean, var)
        self.armed = False
        return out

    def reset(self) -> None:
        with torch.no_grad():
            self.running_mean.copy_(self.source_mean)
            self.running_var.copy_(self.source_var)
        self.armed = False
        self.pending = None


def use_robust_statistics(model: nn.Module, mode: StatisticsMode, momentum: float) -> list[RobustBatchNorm]:
    """Replace every BatchNorm of ``model`` (in place) by a :class:`RobustBatchNorm`; none for ``batch``."""
    if mode == "batch":
        return []
    if mode == "auto":
        mode = "ema"
    layers: list[RobustBatchNorm] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BATCH_NORMS) and not isinstance(child, RobustBatchNorm):
                robust = RobustBatchNorm(child, mode, momentum)
                setattr(parent, name, robust)
                layers.append(robust)
    return layers


@contextmanager
def recording(layers: list[RobustBatchNorm]) -> Iterator[None]:
    """Inside, each layer's first batch-mode forward (a step's prediction forward) computes the moving
    average's next value; later forwards in the same step (a sub-network, a re-forward of selected
    samples) do not. :func:`commit` then stores it: the adapter may first judge the batch."""
    for layer in layers:
        layer.armed = True
        layer.pending = None
    try:
        yield
    finally:
        for layer in layers:
            layer.armed = False


def commit(layers: list[RobustBatchNorm], keep: bool = True) -> None:
    """Store (``keep``) or drop the moving averages computed by the last :func:`recording` forward."""
    with torch.no_grad():
        for layer in layers:
            if keep and layer.pending is not None:
                layer.running_mean.copy_(layer.pending[0])
                layer.running_var.copy_(layer.pending[1])
            layer.pending = None


def statistics_state(layers: list[RobustBatchNorm]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's moving statistics (for the adapter's state dict)."""
    return [(layer.running_mean.detach().clone(), layer.running_var.detach().clone()) for layer in layers]


def load_statistics_state(layers: list[RobustBatchNorm], state: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if len(state) != len(layers):
        raise ValueError(f"state has statistics of {len(state)} BatchNorm layers, the model has {len(layers)}")
    with torch.no_grad():
        for layer, (mean, var) in zip(layers, state, strict=True):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)


def normalise_split(layers: list[RobustBatchNorm], batch_layers: int) -> None:
    """From now on the first ``batch_layers`` layers normalise with the batch alone and the rest with the
    source statistics (the probe's split; ``bn_stats='auto'`` serves with it while traffic is correlated)."""
    for i, layer in enumerate(layers):
        layer.blend, layer.use_source = 1.0, i >= batch_layers


def normalise_blended(layers: list[RobustBatchNorm], blend: float) -> None:
    """From now on every layer normalises with ``blend`` of the batch and the rest its moving average."""
    for layer in layers:
        layer.blend, layer.use_source = blend, False


@contextmanager
def probing(layers: list[RobustBatchNorm], batch_layers: int) -> Iterator[None]:
    """Inside, the first ``batch_layers`` layers normalise with the batch alone and the rest with the
    source statistics: the correlation probe of :class:`adapters.correlation.CorrelationSwitch`.

    Why this split: a corruption changes low-level statistics, which the shallow layers' batch
    statistics undo for any class mix; the classes live in the deep layers, whose fixed source
    statistics keep a one-class batch looking like one class (measured: docs/benchmarks.md)."""
    before = [(layer.blend, layer.use_source) for layer in layers]
    normalise_split(layers, batch_layers)
    try:
        yield
    finally:
        for layer, (blend, use_source) in zip(layers, before, strict=True):
            layer.blend, layer.use_source = blend, use_source
