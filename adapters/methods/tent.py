"""tent: minimise the mean prediction entropy of every batch (Wang et al., ICLR 2021)."""

import torch

from adapters.base import Adapter, OptimizedOptions, entropy
from adapters.registry import register


@register
class Tent(Adapter):
    name = "tent"
    Options = OptimizedOptions
    updates_parameters = True

    def loss(self, x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return entropy(logits[mask]).mean()
