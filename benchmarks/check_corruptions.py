"""Check the regenerated CIFAR-10-C against the published one, through a frozen ResNet-20.

A wrong parameter shows up as an error rate far from the one the original generator's files give, so
this prints, per corruption at severity 5: the frozen model's error, the reference, the difference and
the time to corrupt the images. Exit status 1 when any difference exceeds ``--tolerance``.

    python -m benchmarks.check_corruptions [--limit N] [--seed S] [--tolerance 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from adapters.corruptions import CORRUPTIONS, corrupt
from adapters.datasets import load_npz, to_tensor
from adapters.models import build_cifar_resnet
from benchmarks.data import checkpoint_path, cifar10_test_path

# Frozen akamaster ResNet-20, error % at severity 5 on all 10,000 images of the original CIFAR-10-C.
REFERENCE_ERROR: dict[str, float] = {
    "gaussian_noise": 75.8,
    "shot_noise": 69.7,
    "impulse_noise": 77.7,
    "defocus_blur": 41.5,
    "glass_blur": 58.2,
    "motion_blur": 40.2,
    "zoom_blur": 40.8,
    "snow": 30.8,
    "frost": 46.2,
    "fog": 34.5,
    "brightness": 13.1,
    "contrast": 73.4,
    "elastic_transform": 30.4,
    "pixelate": 60.7,
    "jpeg_compression": 29.7,
}


SEVERITY = 5  # the severity the references were measured at


@torch.no_grad()
def error_rate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 error in percent of an eval-mode model on uint8 NHWC images."""
    wrong = 0
    for start in range(0, len(x), batch_size):
        logits = model(to_tensor(x[start : start + batch_size]))
        wrong += int((logits.argmax(1).numpy() != y[start : start + batch_size]).sum())
    return 100.0 * wrong / len(x)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; return 1 if any corruption is further than the tolerance from its reference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="use the first N test images (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=5.0, help="allowed |error - reference| in points")
    args = parser.parse_args(argv)

    x, y = load_npz(cifar10_test_path())
    x, y = x[: args.limit], y[: args.limit]
    model = build_cifar_resnet("resnet20", checkpoint_path("resnet20")).eval()
    print(f"frozen ResNet-20, {len(x)} images, severity {SEVERITY}, seed {args.seed}")
    print(f"clean error {error_rate(model, x, y):.1f} %\n")
    print(f"{'corruption':<18} {'error %':>8} {'reference':>9} {'diff':>6} {'seconds':>8}")
    failures, errors, total_seconds = [], [], 0.0
    for name in CORRUPTIONS:
        start = time.perf_counter()
        corrupted = corrupt(x, name, SEVERITY, seed=args.seed)
        seconds = time.perf_counter() - start
        total_seconds += seconds
        error = error_rate(model, corrupted, y)
        errors.append(error)
        diff = error - REFERENCE_ERROR[name]
        flag = "" if abs(diff) <= args.tolerance else "  <-- off"
        if flag:
            failures.append(name)
        print(f"{name:<18} {error:8.1f} {REFERENCE_ERROR[name]:9.1f} {diff:+6.1f} {seconds:8.2f}{flag}")
    reference_mean = float(np.mean(list(REFERENCE_ERROR.values())))
    print(f"{'mean':<18} {np.mean(errors):8.1f} {reference_mean:9.1f} {np.mean(errors) - reference_mean:+6.1f}")
    print(f"\ncorrupting took {total_seconds:.1f} s in all")
    if failures:
        print(f"further than {args.tolerance} points from the reference: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
