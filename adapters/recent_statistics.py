"""Moving averages of the batch statistics each BatchNorm layer sees: normalisation for tiny batches.

Adapting methods normalise with the statistics of the batch itself, which a batch of one or two images
cannot estimate. Padding such a batch with recent inputs works but costs a full batch of compute per
request. Instead, every forward pass over a batch of at least ``min_batch`` images updates a moving
average of each layer's per-channel input mean and variance (the layer's own inputs, so it follows the
adapted weights and the drifting test distribution), and :meth:`RecentBatchStatistics.applied`
normalises a small batch with those: the cost of a forward pass at its own size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from adapters.configure import BATCH_NORMS, model_device

_REFRESH_EVERY = 8


class RecentBatchStatistics:
    """Records the input statistics of ``model``'s batch-statistics BatchNorm layers on large batches."""

    def __init__(self, model: nn.Module, min_batch: int, momentum: float = 0.2) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.training]
        self.min_batch = max(2, min_batch)
        self.momentum = momentum
        # Allocated once and only updated in place: a traced graph that normalises with them keeps reading them.
        self.mean = [torch.zeros(layer.num_features, device=model_device(layer)) for layer in self.layers]
        self.var = [torch.ones(layer.num_features, device=model_device(layer)) for layer in self.layers]
        self.updates = 0  # forward passes recorded
        self.served_since_update = 0  # images normalised with the averages since the last recorded pass
        self._applying = False
        self._large_passes = 0
        self._recording = False  # decided per forward pass, at the first layer
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._recorder(i))

    def _recorder(self, index: int):  # returns a forward pre-hook
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if index == 0:
                self._recording = not self._applying and x.shape[0] >= self.min_batch and self._due()
            if not self._recording:
                return
            with torch.no_grad():
                dims = [0, *range(2, x.dim())]
                mean, var = x.mean(dims), x.var(dims, unbiased=False)
                if self.updates == 0:
                    self.mean[index].copy_(mean)
                    self.var[index].copy_(var)
                else:
                    self.mean[index].lerp_(mean, self.momentum)
                    self.var[index].lerp_(var, self.momentum)
            if index == len(self.layers) - 1:
                self.updates += 1
                self.served_since_update = 0

        return record

    def _due(self) -> bool:
        """Record this large pass? Always when the averages were used since the last recording, else every
        ``_REFRESH_EVERY``-th pass: the reductions cost about a tenth of a forward pass, so a stream of
        large batches (which never needs the averages) pays for them rarely."""
        self._large_passes += 1
        return self.updates == 0 or self.served_since_update > 0 or self._large_passes % _REFRESH_EVERY == 0

    def ready(self, max_served: int) -> bool:
        """Whether every layer has averages, recorded before at most ``max_served`` small-batch images."""
        return bool(self.layers) and self.updates > 0 and self.served_since_update < max_served

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the layers normalise with the averages (eval mode); outside, with the batch again."""
        saved = [(layer.training, layer._buffers.get("running_mean"), layer._buffers.get("running_var"))
                 for layer in self.layers]
        self._applying = True
        try:
            for layer, mean, var in zip(self.layers, self.mean, self.var, strict=True):
                layer.training = False
                layer._buffers["running_mean"] = mean
                layer._buffers["running_var"] = var
            yield
        finally:
            for layer, (training, mean, var) in zip(self.layers, saved, strict=True):
                layer.training = training
                layer._buffers["running_mean"] = mean
                layer._buffers["running_var"] = var
            self._applying = False

    def clear(self) -> None:
        for mean, var in zip(self.mean, self.var, strict=True):
            mean.zero_()
            var.fill_(1.0)
        self.updates = 0
        self.served_since_update = 0

