"""CIFAR ResNets (20/32/44/56) rebuilt in code, loadable from the akamaster checkpoints.

torchvision is not usable beside the pinned torch, so the architecture lives here. Each basic block
is a *skippable residual* (see :mod:`adapters.models.residual`) so EATA-C can form a sub-network by
dropping residual branches while keeping the shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.models.residual import SkippableResidual

DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9}


class LambdaShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels (no parameters)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(SkippableResidual):
    """conv-BN-ReLU-conv-BN plus shortcut; the residual branch can be dropped per sample."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaShortcut(planes)
            self.downsamples = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.shortcut(x) + self.drop_branch(branch))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with 16/32/64 channels and a linear head (He et al. 2016, CIFAR variant)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, blocks_per_stage, 1)
        self.layer2 = self._stage(32, blocks_per_stage, 2)
        self.layer3 = self._stage(64, blocks_per_stage, 2)
        self.linear = nn.Linear(64, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build an untrained CIFAR ResNet of the given depth (20, 32, 44 or 56)."""
    if depth not in DEPTHS:
        raise ValueError(f"unsupported CIFAR ResNet depth {depth}; choose one of {sorted(DEPTHS)}")
    return CifarResNet(DEPTHS[depth], num_classes)
