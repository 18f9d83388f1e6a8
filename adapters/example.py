"""A one-minute look at the library: a frozen and an adapting digits model on a drifting stream.

Run with ``python -m adapters.example``. Needs nothing beyond what pip installs: the digits model
trains on first use (seconds) and is cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import adapters
from adapters.datasets import to_tensor
from adapters.models.digits import digits_split, load_digits_model

BATCH = 64


def drift(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Simple shifts of [0, 1] images: additive noise, lowered contrast, blur."""
    if kind == "noise":
        return (x + 0.35 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    if kind == "low contrast":
        return (x - x.mean((1, 2, 3), keepdim=True)) * 0.25 + 0.5
    if kind == "blur":
        kernel = torch.ones(3, 1, 5, 5) / 25
        return F.conv2d(x, kernel, padding=2, groups=3)
    return x


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = load_digits_model()
    (train_x, _), (x, y) = digits_split()
    clean = to_tensor(x)
    labels = torch.from_numpy(y)
    fisher_images = to_tensor(train_x[:500])
    frozen = adapters.create("source", model)
    adapting = adapters.create("eata", model, fisher_data=fisher_images)
    print(f"{'segment':<14}{'frozen acc %':>14}{'EATA acc %':>12}{'selected':>10}")
    for kind in ["clean", "noise", "low contrast", "blur"]:
        stream = drift(clean, kind, generator)
        hits = {"frozen": 0, "eata": 0}
        selected = 0
        for i in range(0, len(stream), BATCH):
            xb, yb = stream[i : i + BATCH], labels[i : i + BATCH]
            hits["frozen"] += int((frozen.step(xb).logits.argmax(1) == yb).sum())
            result = adapting.step(xb)
            hits["eata"] += int((result.logits.argmax(1) == yb).sum())
            selected += int(result.selected.sum())
        n = len(stream)
        print(f"{kind:<14}{100 * hits['frozen'] / n:>14.1f}{100 * hits['eata'] / n:>12.1f}{selected:>10}")
    stats = adapting.stats
    print(f"EATA adapted on {stats.samples_selected} of {stats.samples_seen} samples in {stats.updates} steps.")


if __name__ == "__main__":
    main()
