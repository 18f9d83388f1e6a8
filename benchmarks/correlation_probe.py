"""What tells a class-sorted stream from a shuffled one without labels: the probe of ``bn_stats='auto'``.

Why: the correlation switch (:class:`adapters.correlation.CorrelationSwitch`) judges the class diversity of
a re-prediction of each batch whose first ``k`` BatchNorm layers normalise with the batch and the rest with
the source statistics. ``k = 0`` is the frozen model (a corruption collapses its i.i.d. predictions onto a
few classes, so it looks correlated); ``k = all`` is batch statistics (a one-class batch loses its class
signal, so it looks diverse). This prints, per corruption and order, the mean class diversity and the
accuracy of each split, to choose ``batch_layers`` and the switch thresholds on the validation corruptions::

    python -m benchmarks.correlation_probe --corruptions speckle_noise,gaussian_blur,saturate --limit 1280
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import adapters
from adapters.correlation import class_diversity
from adapters.robust_norm import probing
from benchmarks import runner
from benchmarks.data import checkpoint_path, cifar10_test_path

SPLITS = (0, 4, 7, 10, 13, 19)


def measure(names: tuple[str, ...], limit: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Rows of {corruption, order, k: (mean diversity, accuracy %)}; corruption 'clean' first."""
    config = runner.BenchConfig(clean_data=cifar10_test_path(), weights=checkpoint_path("resnet20"), limit=limit,
                                batch_size=batch_size, corruptions=names, seed=seed)
    model = runner.load_model("resnet20", config.weights)
    clean = runner.load_clean(config.clean_data)
    streams = {"clean": (clean[0][:limit], clean[1][:limit])}
    streams |= runner.load_streams(config, runner.resolve_corruptions(names), clean)
    adapter = adapters.create("norm", model, bn_stats="auto")  # RobustBatchNorm layers, never stepped
    layers = adapter.robust_layers
    rows = []
    for order in ("shuffled", "correlated"):
        for name, (x, y) in runner.order_streams(streams, order, seed, None).items():
            row: dict = {"corruption": name, "order": "sorted" if order == "correlated" else order}
            for k in (s for s in SPLITS if s <= len(layers)):
                diversity, right = [], 0
                for images, labels in runner.batches(x, y, batch_size):
                    with torch.no_grad(), probing(layers, k):
                        logits = adapter.model(images)
                    diversity.append(class_diversity(logits))
                    right += int((logits.argmax(1) == labels).sum())
                row[k] = (float(np.mean(diversity)), 100.0 * right / len(y))
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    cells = [f"{row[k][0]:.2f} / {row[k][1]:.0f}" for k in SPLITS if k in row]
    return f"| {row['corruption']} | {row['order']} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corruptions", default="speckle_noise,gaussian_blur,saturate,spatter")
    parser.add_argument("--limit", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    print("| corruption | order | " + " | ".join(f"k={k}: diversity / acc %" for k in SPLITS) + " |")
    print("|" + "---|" * (len(SPLITS) + 2))
    measure(tuple(args.corruptions.split(",")), args.limit, args.batch_size)


if __name__ == "__main__":
    main()
