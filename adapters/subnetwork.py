"""Sub-networks of a model for EATA-C: the same weights with some residual branches skipped.

Models built from :class:`adapters.models.SkippableResidual` blocks get true stochastic depth. Any
other model falls back to dropping whole channels of normalisation-layer outputs per sample (the
closest "part of the network switched off" that works for arbitrary architectures).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from adapters.configure import norm_layers
from adapters.models.residual import SkippableResidual


def has_skippable_residuals(model: nn.Module) -> bool:
    return any(isinstance(m, SkippableResidual) for m in model.modules())


def _drop_channels(p: float, generator: torch.Generator | None):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.dim() >= 3 and not isinstance(module, nn.LayerNorm):
            shape = (output.shape[0], output.shape[1]) + (1,) * (output.dim() - 2)  # N, C, 1, ...
        else:
            shape = (output.shape[0],) + (1,) * (output.dim() - 2) + (output.shape[-1],)  # N, ..., C
        keep = torch.rand(shape, device=output.device, generator=generator) >= p
        return output * keep.to(output.dtype)

    return hook


@contextmanager
def subnetwork(model: nn.Module, drop_prob: float, generator: torch.Generator | None = None, *,
               drop_downsampling: bool = True, unit: Literal["blocks", "channels"] = "blocks") -> Iterator[None]:
    """Within the context, forward passes of ``model`` run a random sub-network, drawn from ``generator``
    (torch's global one when None): an adapter with its own generator resumes its draws exactly.
    ``unit='blocks'`` drops residual branches (``drop_downsampling=False`` keeps every down-sampling
    block, ``SkippableResidual.downsamples``), falling back to channels for a model without skippable
    blocks; ``unit='channels'`` drops normalisation-layer output channels per sample."""
    skippable = [m for m in model.modules() if isinstance(m, SkippableResidual)] if unit == "blocks" else []
    blocks = [m for m in skippable if drop_downsampling or not m.downsamples]
    handles = []
    if skippable:
        for block in blocks:
            block.drop_prob = drop_prob
            block.drop_generator = generator
    else:
        handles = [m.register_forward_hook(_drop_channels(drop_prob, generator)) for _, m in norm_layers(model)]
    try:
        yield
    finally:
        for block in blocks:
            block.drop_prob = 0.0
            block.drop_generator = None
        for handle in handles:
            handle.remove()
