"""Named models with their input normalisation, loaded safely from checkpoints.

Every zoo model takes RGB NCHW float images scaled to [0, 1]; the normalisation the checkpoint was
trained with is part of the module, so callers never have to remember mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from adapters.models.cifar_resnet import DEPTHS, cifar_resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_RESNETS = {f"resnet{d}": d for d in DEPTHS}
AKAMASTER_FILES = {
    "resnet20": "akamaster_resnet20-12fca82f.th",
    "resnet32": "akamaster_resnet32-d509ac18.th",
    "resnet44": "akamaster_resnet44-014dd654.th",
    "resnet56": "akamaster_resnet56-4bfd9763.th",
}


class Normalized(nn.Module):
    """Wrap a network with a fixed per-channel normalisation of [0, 1] inputs."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class CheckpointError(ValueError):
    """A weights file that cannot be loaded into the requested architecture."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True`` (never unpickles code); accept raw or wrapped dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or pickled code: all refused the same way
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(blob, dict) and "state_dict" in blob and isinstance(blob["state_dict"], dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in blob.items()}


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` strictly, tolerating only missing ``num_batches_tracked`` buffers."""
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source} does not match the architecture: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def build_cifar_resnet(name: str, weights: str | Path | None = None, num_classes: int = 10) -> Normalized:
    """A CIFAR ResNet by name (``resnet20`` ... ``resnet56``), optionally with akamaster weights."""
    if name not in CIFAR_RESNETS:
        raise ValueError(f"unknown model {name!r}; built-in CIFAR models: {sorted(CIFAR_RESNETS)}")
    net = cifar_resnet(CIFAR_RESNETS[name], num_classes)
    if weights is not None:
        load_weights(net, load_state_dict_file(weights), source=str(weights))
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval()
