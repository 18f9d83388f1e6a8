"""Fisher information of the adaptable parameters, the anti-forgetting weight of EATA.

Estimated once per model from clean in-distribution images: run them through the model in the
adaptation configuration, pseudo-label with its own argmax, back-propagate the batch-mean cross
entropy and average the squared gradients over batches. Saved with the hash of the model it belongs
to, so a Fisher file of another model is refused instead of silently mis-weighting the penalty.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.configure import adaptable_parameters, model_device, model_hash, use_batch_statistics


class FisherMismatchError(ValueError):
    """A Fisher estimate that belongs to another model."""


@dataclass
class FisherInfo:
    """Per-parameter Fisher diagonal, keyed by adaptable-parameter name, tied to a model hash."""

    fisher: dict[str, torch.Tensor]
    model_hash: str
    num_samples: int

    def check_model(self, model: nn.Module, expected_hash: str | None = None) -> None:
        """Refuse to be used with a model other than the one it was estimated on."""
        actual = expected_hash or model_hash(model)
        if actual != self.model_hash:
            raise FisherMismatchError(
                f"Fisher information was estimated for model {self.model_hash}, "
                f"but this model hashes to {actual}; re-estimate it for this model"
            )

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (no pickle) with the model hash in its metadata."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in self.fisher.items()}
        meta = {"model_hash": self.model_hash, "num_samples": str(self.num_samples), "format": "tta-fisher/1"}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> FisherInfo:
        """Read a Fisher file; with ``model`` given, refuse it unless it belongs to that model."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Fisher file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except Exception as exc:
            raise ValueError(f"cannot read Fisher file {path}: {exc}") from exc
        if meta.get("format") != "tta-fisher/1" or "model_hash" not in meta:
            raise ValueError(f"{path} is not a tta-serve Fisher file (missing format/model_hash metadata)")
        info = cls(tensors, meta["model_hash"], int(meta.get("num_samples", 0)))
        if model is not None:
            info.check_model(model)
        return info


def _batches(data: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
    else:
        for item in data:
            yield item[0] if isinstance(item, list | tuple) else item


def estimate_fisher(
    model: nn.Module, data: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 64
) -> FisherInfo:
    """Estimate the Fisher diagonal of ``model``'s adaptable parameters on clean images.

    ``data`` is a tensor of images (split into ``batch_size`` batches) or an iterable of image
    batches (or ``(images, labels)`` pairs; labels are ignored: pseudo-labels are used, as in EATA).
    The model itself is not modified.
    """
    digest = model_hash(model)
    work = use_batch_statistics(copy.deepcopy(model))
    params = adaptable_parameters(work)
    if not params:
        raise ValueError("the model has no normalisation parameters to estimate Fisher information for")
    device = model_device(work)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    batches = samples = 0
    for x in _batches(data, batch_size):
        x = x.to(device)
        logits = work(x)
        loss = F.cross_entropy(logits, logits.argmax(1))
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, _), grad in zip(params.items(), grads, strict=True):
            sums[name] += grad.detach() ** 2
        batches += 1
        samples += x.shape[0]
    if batches == 0:
        raise ValueError("no images given to estimate Fisher information")
    return FisherInfo({name: s / batches for name, s in sums.items()}, digest, samples)
