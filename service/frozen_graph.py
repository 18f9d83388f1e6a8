"""The frozen model as a traced, frozen TorchScript graph: the fast path for answers without adaptation.

Why: eager PyTorch returns to Python between every layer and takes Python's GIL back each time, so a
model thread competes with the HTTP event loop for it on every operation. A frozen graph runs the whole
forward in C++ without the GIL, and freezing folds BatchNorm into the convolutions (docs/benchmarks.md
has the effect on throughput). Only models whose weights never change can be frozen: the ``source``
method, and the source model that answers small batches before any BatchNorm context exists.

Tracing records one path through the model, so a model with data-dependent control flow could trace
to a wrong graph: the graph is checked against eager outputs on a batch size other than the traced one,
and any failure keeps the eager model (with a warning naming why).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from adapters.configure import model_device

log = logging.getLogger(__name__)

_TRACE_BATCH = 8
_CHECK_BATCH = 3
_TOLERANCE = 1e-3


def freeze_for_inference(
    module: nn.Module, input_size: tuple[int, int], channels_last: bool, name: str = "model"
) -> nn.Module | None:
    """A frozen TorchScript graph equivalent to ``module`` in eval mode, or None (logged) if tracing fails.

    ``module`` itself is left untouched.
    """
    was_training = module.training
    module.eval()
    try:
        return _checked_graph(module, input_size, channels_last, name, freeze=True)
    finally:
        module.train(was_training)


def trace_shared(
    module: nn.Module, input_size: tuple[int, int], channels_last: bool, name: str = "model"
) -> nn.Module | None:
    """A traced graph of ``module`` as it is configured now that is *not* frozen: it reads the module's
    parameters and buffers when it runs, so in-place updates (optimiser steps, resets, parameter sync,
    recent statistics) reach it. None (logged) if tracing fails."""
    return _checked_graph(module, input_size, channels_last, name, freeze=False)


def _checked_graph(
    module: nn.Module, input_size: tuple[int, int], channels_last: bool, name: str, freeze: bool
) -> nn.Module | None:
    device = model_device(module)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def example(batch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(batch)
        x = torch.rand(batch, 3, *input_size, generator=generator).to(device)
        return x.contiguous(memory_format=memory_format)

    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.compile, which needs a C++ toolchain at run time
            # and compiles per shape; a traced graph is the portable way to drop the GIL for a forward.
            warnings.simplefilter("ignore", DeprecationWarning)
            # Tracer warnings (e.g. batch norm's batch-size check becoming a constant) are what the output check
            # below decides on; a wrong graph is logged there with its reason.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            graph = torch.jit.trace(module, example(_TRACE_BATCH), check_trace=False)
            if freeze:
                graph = torch.jit.freeze(graph)
            x = example(_CHECK_BATCH)
            expected, got = module(x), graph(x)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            raise ValueError(f"traced output has shape {getattr(got, 'shape', None)}, eager {tuple(expected.shape)}")
        difference = float((got - expected).abs().max())
        if difference > _TOLERANCE * max(1.0, float(expected.abs().max())):
            raise ValueError(f"traced outputs differ from eager by {difference:.3g} (data-dependent control flow?)")
    except Exception as exc:  # any tracing failure keeps the eager model
        log.warning("model %s: serving %s eagerly; it cannot be traced (%s)", name,
                    "the frozen model" if freeze else "small batches", exc)
        return None
    return graph
