"""LAME (Boudiaf et al., CVPR 2022): correct a batch's predictions using the batch's own structure.

Why: on class-correlated traffic a batch holds one or two classes. Nothing is learned; instead each
sample's class probabilities are pulled towards those of its neighbours in feature space (Laplacian
regularised maximum likelihood): close samples end with the same label. It needs the pooled
penultimate features of the same forward pass (L2-normalised) and works on top of any method.

LAME hurts on i.i.d. batches (the reference benchmark: 20.8 points worse than source on CIFAR-10-C),
because the pairwise term grows with the batch and merges classes that merely look alike, so
:class:`LameOptions` has a gate, ``max_class_diversity``: correct only batches whose predicted classes
look correlated, less diverse than the recent traffic (:class:`adapters.correlation.ClassMixMonitor`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

Affinity = Literal["rbf", "knn", "linear"]
#: Relative energy change below which the bound optimisation stops (reference value).
TOLERANCE = 1e-8


class LameOptions(BaseModel):
    """LAME as an output correction; off by default. Reference defaults: rbf, k=5, lambda 1, 100 steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    affinity: Affinity = Field("rbf", description="'rbf' (sigma from the k-th neighbour), 'knn' or 'linear'")
    knn: int = Field(5, ge=1, description="neighbours for 'knn'; for 'rbf' the k-th distance, self counted")
    strength: float = Field(1.0, ge=0, description="lambda, weight of the pairwise (Laplacian) term")
    max_steps: int = Field(100, ge=1, description="bound-optimisation iterations at most")
    symmetric: bool = Field(False, description="use (W + W^T) / 2 (the reference leaves it off)")
    max_class_diversity: float | None = Field(
        None, ge=0, description="correct only batches whose relative class diversity is at most this (None: all)"
    )


def affinity_matrix(
    features: torch.Tensor, kind: Affinity = "rbf", knn: int = 5, symmetric: bool = False
) -> torch.Tensor:
    """The N x N affinity W of L2-normalised ``features`` (N x d).

    rbf: sigma is the mean over rows of each row's k-th smallest distance, the zero self-distance
    counted (k=5 is the 4th neighbour), recomputed per batch; the diagonal is kept. knn: 1 for the k
    nearest other samples (asymmetric). linear: f f^T.
    """
    n = features.shape[0]
    if kind == "linear":
        w = features @ features.T
    else:
        dist = torch.cdist(features, features)
        if kind == "knn":
            k = min(knn, n - 1)
            w = torch.zeros_like(dist)
            if k > 0:
                others = dist + torch.diag(torch.full((n,), float("inf"), device=dist.device, dtype=dist.dtype))
                w.scatter_(1, others.topk(k, dim=1, largest=False).indices, 1.0)
        elif kind == "rbf":
            k = min(knn, n)
            sigma = dist.topk(k, dim=1, largest=False).values[:, -1].mean()
            # sigma 0: every sample has >= k exact copies, and only those are its neighbours.
            w = (dist <= 0).to(dist.dtype) if float(sigma) <= 0 else torch.exp(-dist.square() / (2 * sigma.square()))
        else:
            raise ValueError(f"unknown LAME affinity {kind!r}")
    return (w + w.T) / 2 if symmetric else w


def lame_energy(unary: torch.Tensor, w: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
    """E(Y) = sum(a * Y - lambda * (W Y) * Y + Y log Y), the objective the iterations decrease."""
    return (unary * y - strength * (w @ y) * y + y * y.clamp_min(1e-20).log()).sum()


def lame(
    probs: torch.Tensor,
    features: torch.Tensor,
    affinity: Affinity = "rbf",
    knn: int = 5,
    strength: float = 1.0,
    max_steps: int = 100,
    symmetric: bool = False,
) -> torch.Tensor:
    """Corrected class probabilities (N x C) for a batch of ``probs`` and penultimate ``features``.

    Features are L2-normalised here. A batch of one sample is returned unchanged (no neighbours;
    the rbf sigma would be 0). Never pad a batch with copies of a sample: copies reinforce each other.
    """
    if probs.shape[0] < 2:
        return probs
    probs, features = probs.float(), features.float().flatten(1)
    features = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = affinity_matrix(features, affinity, knn, symmetric)
    unary = -(probs + 1e-10).log()
    y = (-unary).softmax(1)
    previous: float | None = None
    for step in range(max_steps):
        y = (-unary + strength * (w @ y)).softmax(1)
        energy = float(lame_energy(unary, w, y, strength))
        if step > 1 and previous is not None and abs(energy - previous) <= TOLERANCE * abs(previous):
            break
        previous = energy
    return y


class PenultimateFeatures:
    """Captures the input of the model's last ``nn.Linear`` (the pooled penultimate features) during
    the first forward pass inside :meth:`capture`; later passes (a sub-network) are ignored."""

    def __init__(self, model: nn.Module) -> None:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise ValueError("lame needs the model's penultimate features: the model has no nn.Linear head")
        self._capturing = False
        self.features: torch.Tensor | None = None
        heads[-1].register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self._capturing and self.features is None:
            self.features = args[0].detach()

    @contextmanager
    def capture(self) -> Iterator[None]:
        self.features = None
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def take(self) -> torch.Tensor | None:
        features, self.features = self.features, None
        return features
