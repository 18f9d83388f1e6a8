"""Accuracy of lone requests under the two small-batch BatchNorm policies of the server.

    python -m benchmarks.small_batch_policy [--images 1600] [--corruptions gaussian_noise,fog,contrast]

A CIFAR-10-C stream (severity 5) goes through a ResNet-20 engine adapting with EATA in sync mode:
each group of 32 images is one batch of 16 (an adaptation step) followed by 16 one-image requests.
The table gives the accuracy of the one-image answers normalised with recent statistics (moving
averages of large batches' BatchNorm statistics, the default) and padded with recent inputs as context.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from adapters.corruptions import corrupt
from benchmarks.data import checkpoint_path, cifar10_test_path
from service.engine import ModelEngine
from service.model_sources import load_model
from service.settings import ModelConfig
from service.worker import PREDICT


def lone_request_accuracy(images: torch.Tensor, labels: np.ndarray, recent: bool) -> float:
    config = ModelConfig(name="m", architecture="resnet20", weights=checkpoint_path("resnet20"), method="eata",
                         mode="sync", fisher_data=cifar10_test_path(), fisher_size=200, recent_statistics=recent,
                         agreement_fraction=0)
    engine = ModelEngine(config, load_model(config, torch.device("cpu")), device=torch.device("cpu"))

    def serve(x: torch.Tensor) -> list:
        return engine._worker.submit(lambda: engine._run_batch(x), PREDICT).result()

    correct = total = 0
    try:
        for start in range(0, len(images) - 31, 32):
            serve(images[start : start + 16])
            for i in range(start + 16, start + 32):
                correct += int(serve(images[i : i + 1])[0].label == labels[i])
                total += 1
    finally:
        engine._worker.stop()
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--corruptions", default="gaussian_noise,fog,contrast")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with np.load(cifar10_test_path()) as data:
        clean, labels = data["x"][: args.images], data["y"][: args.images]
    table = Table(title="one-image answers between EATA steps (CIFAR-10-C severity 5), accuracy %")
    for column in ("corruption", "recent statistics", "context padding"):
        table.add_column(column, justify="right")
    for name in args.corruptions.split(","):
        x = torch.from_numpy(corrupt(clean, name, 5, seed=0)).permute(0, 3, 1, 2).float().div(255)
        recent, padded = (lone_request_accuracy(x, labels, r) for r in (True, False))
        table.add_row(name, f"{100 * recent:.1f}", f"{100 * padded:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
