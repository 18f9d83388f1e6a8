"""Residual blocks whose branch can be dropped, the basis of EATA-C's sub-network.

A sub-network is "the same weights with some residual blocks skipped" (stochastic depth). Any module
deriving from :class:`SkippableResidual` and routing its branch through :meth:`drop_branch` takes part;
user models can do the same to get the exact EATA-C behaviour.
"""

from __future__ import annotations

import torch
from torch import nn


class SkippableResidual(nn.Module):
    """Mixin for residual blocks: ``drop_prob > 0`` drops the branch per sample (no rescaling)."""

    drop_prob: float = 0.0
    #: True for a block whose shortcut changes the shape (down-sampling): dropping its branch leaves only
    #: the subsampled, zero-padded input, so EATA-C's sub-network keeps such blocks unless told otherwise.
    downsamples: bool = False
    #: The generator the drops draw from (set by :func:`adapters.subnetwork.subnetwork`); None: torch's global one.
    drop_generator: torch.Generator | None = None

    def drop_branch(self, branch: torch.Tensor) -> torch.Tensor:
        """Zero the residual branch of each sample with probability ``drop_prob``.

        No 1/(1-p) rescaling: the network was trained without stochastic depth, so the sub-network is
        literally the full network with some blocks removed.
        """
        if self.drop_prob <= 0.0:
            return branch
        keep = torch.rand(branch.shape[0], device=branch.device, generator=self.drop_generator) >= self.drop_prob
        return branch * keep.to(branch.dtype).view(-1, *([1] * (branch.dim() - 1)))
