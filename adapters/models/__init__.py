"""Model definitions shipped with tta-serve (torchvision is not usable beside the pinned torch)."""

from adapters.models.cifar_resnet import CifarResNet, cifar_resnet
from adapters.models.residual import SkippableResidual
from adapters.models.zoo import (
    AKAMASTER_FILES,
    CIFAR_RESNETS,
    CheckpointError,
    Normalized,
    build_cifar_resnet,
    load_state_dict_file,
    load_weights,
)

__all__ = [
    "AKAMASTER_FILES",
    "CIFAR_RESNETS",
    "CheckpointError",
    "CifarResNet",
    "Normalized",
    "SkippableResidual",
    "build_cifar_resnet",
    "cifar_resnet",
    "load_state_dict_file",
    "load_weights",
]
