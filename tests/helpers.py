"""Small models and data shared by the tests."""

from __future__ import annotations

import math

import torch
from torch import nn


def small_bn_cnn(num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A tiny BatchNorm CNN on 3x8x8 inputs: fast enough for behaviour tests."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    ).eval()
    seeded_init(model, seed)
    return model


def seeded_init(model: nn.Module, seed: int) -> None:
    """Initialise convolutions and linear layers as PyTorch does, from a private generator.

    The same weights as ``torch.manual_seed(seed)`` before construction, but safe while another engine's
    background thread draws from the global generator (which once made two "identical" models differ).
    """
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(layer.weight[0].numel())
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def small_gn_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    ).eval()


def small_ln_mlp(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, num_classes))


def no_norm_mlp(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, num_classes))


def images(n: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g)


class _Exploding(nn.Module):
    """``small_bn_cnn`` that raises on a batch whose first pixel is exactly 1: a model fault on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_bn_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0, 0, 0] == 1.0).any()):
            raise RuntimeError("the model exploded")
        return self.net(x)


def exploding_cnn() -> nn.Module:
    return _Exploding()


class _Unexportable(nn.Module):
    """A classifier with an operator the ONNX exporter has no mapping for (an FFT): PyTorch serves it only."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_bn_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + torch.fft.fft2(x).abs().mean() * 0.0


def unexportable_cnn() -> nn.Module:
    return _Unexportable()
