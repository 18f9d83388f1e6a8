"""Put a model into the test-time adaptation configuration and find what it may update.

Tent-style: every BatchNorm normalises with the statistics of the current batch, only the affine
scale and shift of normalisation layers are trainable, and everything else (dropout included) stays
in eval mode.
"""

from __future__ import annotations

import hashlib
import itertools

import torch
from torch import nn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORMS = (*BATCH_NORMS, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class NoNormalizationError(ValueError):
    """The method needs normalisation layers and the model has none."""


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalisation layer of the model, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORMS)]


def require_norm_layers(model: nn.Module, method: str) -> None:
    if not norm_layers(model):
        raise NoNormalizationError(
            f"method {method!r} adapts normalisation layers, but the model has no BatchNorm, GroupNorm, "
            "LayerNorm or InstanceNorm layer; use method 'source' for this model"
        )


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Eval mode everywhere, except BatchNorm layers, which normalise with the current batch.

    ``track_running_stats=False`` with ``training=True`` makes PyTorch use batch statistics without
    touching the stored running statistics, so the source statistics survive for ``reset``.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, BATCH_NORMS):
            module.train()
            module.track_running_stats = False
    return model


def adaptable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze the model and return the affine parameters of its normalisation layers, made trainable."""
    model.requires_grad_(False)
    params: dict[str, nn.Parameter] = {}
    for name, module in norm_layers(model):
        for pname, param in module.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                param.requires_grad_(True)
                params[f"{name}.{pname}" if name else pname] = param
    return params


def model_hash(model: nn.Module) -> str:
    """A short content hash of the model's architecture and source weights (ties Fisher files to it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_device(model: nn.Module) -> torch.device:
    """The device of the module's first parameter, else of its first buffer (e.g. a BatchNorm without affine)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")
