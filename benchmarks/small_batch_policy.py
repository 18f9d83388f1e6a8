"""Accuracy of lone requests under the two small-batch BatchNorm policies of the server.

    python -m benchmarks.small_batch_policy [--images 1600] [--corruptions gaussian_noise,fog,contrast]

A CIFAR-10-C stream (severity 5) goes through a ResNet-20 engine adapting with EATA in sync mode:
each group of 32 images is one batch of 16 (an adaptation step) followed by 16 one-image requests.
The table gives the accuracy of the one-image answers normalised with recent statistics (moving
averages of large batches' BatchNorm statistics, the default) and padded with recent inputs as context.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from adapters.corruptions import corrupt
from adapters.datasets import load_images, to_tensor
from benchmarks.data import checkpoint_path, cifar10_test_path
from service.engine import ModelEngine
from service.model_sources import load_model
from service.settings import ModelConfig


async def lone_request_accuracy(
    images: torch.Tensor, labels: np.ndarray, recent: bool, fisher_size: int = 200
) -> float:
    """Accuracy of the one-image requests, served through the engine's public ``predict``."""
    config = ModelConfig(name="m", architecture="resnet20", weights=checkpoint_path("resnet20"), method="eata",
                         mode="sync", fisher_data=cifar10_test_path(), fisher_size=fisher_size,
                         recent_statistics=recent, agreement_fraction=0)
    engine = ModelEngine(config, load_model(config, torch.device("cpu")), device=torch.device("cpu"))
    await engine.start()
    correct = total = 0
    try:
        for start in range(0, len(images) - 31, 32):
            await engine.predict(images[start : start + 16])  # one adaptation step (sync mode)
            for i in range(start + 16, start + 32):
                (answer,) = await engine.predict(images[i : i + 1])
                correct += int(answer.label == labels[i])
                total += 1
    finally:
        await engine.stop()
    return correct / total


def measure(images: int, corruptions: list[str], fisher_size: int = 200) -> list[tuple[str, float, float]]:
    """(corruption, accuracy with recent statistics, accuracy with context padding) per corruption."""
    clean, labels = load_images(cifar10_test_path())
    clean, labels = clean[:images], labels[:images]
    rows = []
    for name in corruptions:
        x = to_tensor(corrupt(clean, name, 5, seed=0))
        recent, padded = (asyncio.run(lone_request_accuracy(x, labels, r, fisher_size)) for r in (True, False))
        rows.append((name, recent, padded))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--corruptions", default="gaussian_noise,fog,contrast")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(title="one-image answers between EATA steps (CIFAR-10-C severity 5), accuracy %")
    for column in ("corruption", "recent statistics", "context padding"):
        table.add_column(column, justify="right")
    for name, recent, padded in measure(args.images, args.corruptions.split(",")):
        table.add_row(name, f"{100 * recent:.1f}", f"{100 * padded:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
