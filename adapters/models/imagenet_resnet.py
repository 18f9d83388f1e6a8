"""A ResNet-50-shaped network for ImageNet-sized inputs (224 px), for sizing and GPU checks.

The bottleneck architecture of He et al. (2016): stem 7x7/2 conv and 3x3/2 max-pool, four stages of
[3, 4, 6, 3] bottleneck blocks (1x1, 3x3, 1x1 convolutions, expansion 4) with 64-512 channels, global
average pooling and a linear head; 25.6 M parameters at 1,000 classes. Random weights: this is for
measuring what serving and adapting a model of realistic size costs, not for accuracy.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ImageNetResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers, in_planes = [], 64
        for stage, count in enumerate(blocks):
            planes = 64 * 2**stage
            for i in range(count):
                layers.append(Bottleneck(in_planes, planes, stride=2 if stage > 0 and i == 0 else 1))
                in_planes = planes * Bottleneck.expansion
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x)).mean((2, 3))
        return self.head(features)


def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    """A randomly initialised ResNet-50 (seeded, so every replica builds the same weights)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return ImageNetResNet((3, 4, 6, 3), num_classes)
    finally:
        torch.random.set_rng_state(generator_state)
