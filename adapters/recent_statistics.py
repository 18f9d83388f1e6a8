"""Moving averages of the batch statistics each BatchNorm layer sees: normalisation for tiny batches.

Adapting methods normalise with the statistics of the batch itself, which a batch of one or two images
cannot estimate. Padding such a batch with recent inputs works but costs a full batch of compute per
request. Instead, every forward pass over a batch of at least ``min_batch`` images updates a moving
average of each layer's per-channel input mean and variance (the layer's own inputs, so it follows the
adapted weights and the drifting test distribution), and :meth:`RecentBatchStatistics.applied`
normalises a small batch with those: the cost of a forward pass at its own size.

The averages are BatchNorm's own running statistics, kept in tensors of ours: the layers stay in batch
mode (``training=True``) but track running statistics, so the normalisation kernel updates the
averages from the mean and variance it computes anyway. Recording costs nothing measurable; separate
reductions in per-layer hooks cost a quarter of a sync adaptation step. One hook on the model decides
per forward pass whether that pass counts (its ``momentum``: 0 for small batches, and for the adapter's
own passes marked by :func:`adapters.passes.auxiliary_pass`: EATA-C's sub-network passes and
``backward='selected'`` re-forwards answer no request, and their statistics are not the traffic's).
Like BatchNorm's, the recorded variance is the unbiased one (a factor n/(n-1), n = images x pixels per channel).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from adapters.configure import BATCH_NORMS, model_device
from adapters.passes import is_auxiliary_pass
from adapters.robust_norm import RobustBatchNorm


class RecentBatchStatistics:
    """Averages the input statistics of ``model``'s batch-statistics BatchNorm layers over large batches."""

    def __init__(self, model: nn.Module, min_batch: int, momentum: float = 0.2) -> None:
        # Robust layers (bn_stats 'ema'/'mix') already normalise a small batch with mostly stored statistics.
        self.layers = [
            m for m in model.modules()
            if isinstance(m, BATCH_NORMS) and m.training and not isinstance(m, RobustBatchNorm)
        ]
        self.min_batch = max(2, min_batch)
        self.momentum = momentum
        # Allocated once and only updated in place: a traced graph that normalises with them keeps reading them.
        self.mean = [torch.zeros(layer.num_features, device=model_device(layer)) for layer in self.layers]
        self.var = [torch.ones(layer.num_features, device=model_device(layer)) for layer in self.layers]
        self.updates = 0  # forward passes recorded
        self.served_since_update = 0  # images normalised with the averages since the last recorded pass
        self._applying = False
        self._tracing = False
        self._paused = False
        self._factor = 0.0  # the layers' momentum now
        for layer, mean, var in zip(self.layers, self.mean, self.var, strict=True):
            # The layer's own buffers (the source statistics) are replaced: batch mode never reads them.
            layer._buffers["running_mean"] = mean
            layer._buffers["running_var"] = var
            layer._buffers["num_batches_tracked"] = None
            layer.track_running_stats = True
            layer.momentum = 0.0
        if self.layers:
            model.register_forward_pre_hook(self._before_pass)

    def _before_pass(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Set how much this forward pass moves the averages: all the way on the first recorded pass,
        ``momentum`` on later large ones, not at all on small batches, inside :meth:`applied` or
        :meth:`paused`, nor on the adapter's own (auxiliary) passes."""
        if self._tracing:
            return
        record = (not (self._applying or self._paused or is_auxiliary_pass(module)) and bool(args)
                  and args[0].shape[0] >= self.min_batch)
        self._set_factor((1.0 if self.updates == 0 else self.momentum) if record else 0.0)
        if record:
            self.recorded()

    def _set_factor(self, factor: float) -> None:
        if factor != self._factor:
            for layer in self.layers:
                layer.momentum = factor
            self._factor = factor

    def recorded(self) -> None:
        """Count a large pass that updated the averages (a traced graph's passes do not run the hook)."""
        self.updates += 1
        self.served_since_update = 0

    @contextmanager
    def tracing(self) -> Iterator[None]:
        """Trace inside to get a batch-mode graph that records like a later large pass: a traced graph keeps
        the layers' momentum as a constant, so it is set to ``momentum`` here. Tracing runs example inputs
        through the model: the averages and counters are restored afterwards. Use the graph only for
        batches of at least ``min_batch`` once :attr:`updates` > 0, and call :meth:`recorded` after each."""
        saved = [(mean.clone(), var.clone()) for mean, var in zip(self.mean, self.var, strict=True)]
        counters = self.updates, self.served_since_update
        self._set_factor(self.momentum)
        self._tracing = True
        try:
            yield
        finally:
            self._tracing = False
            for mean, var, (old_mean, old_var) in zip(self.mean, self.var, saved, strict=True):
                mean.copy_(old_mean)
                var.copy_(old_var)
            self.updates, self.served_since_update = counters

    def ready(self, max_served: int) -> bool:
        """Whether every layer has averages, recorded before at most ``max_served`` small-batch images."""
        return bool(self.layers) and self.updates > 0 and self.served_since_update < max_served

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the layers normalise with the averages (eval mode); outside, with the batch again."""
        saved = [layer.training for layer in self.layers]
        self._applying = True
        try:
            for layer in self.layers:
                layer.training = False
            yield
        finally:
            for layer, training in zip(self.layers, saved, strict=True):
                layer.training = training
            self._applying = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, large passes leave the averages alone: for inputs that are not the served traffic (a
        labelled probe set), whose statistics would otherwise normalise the next small batches."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def clear(self) -> None:
        for mean, var in zip(self.mean, self.var, strict=True):
            mean.zero_()
            var.fill_(1.0)
        self.updates = 0
        self.served_since_update = 0

