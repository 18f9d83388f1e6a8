"""Sweep of LAME's class-diversity gate: error % per stream order and threshold, for one method.

Why: LAME helps on class-correlated batches and hurts on i.i.d. ones, so it runs only where a batch's
predicted classes are less diverse than the recent traffic (``lame.max_class_diversity``). This picks
that threshold: one pass per order computes each batch's logits and features once and scores the
prediction with and without LAME, so every threshold costs nothing extra. Choose on the validation
corruptions (``adapters.corruptions.VALIDATION_CORRUPTIONS``), never on the reported 15::

    python -m benchmarks.lame_gate --method norm --set bn_stats=ema \
        --corruptions speckle_noise,gaussian_blur,saturate --limit 2000 --batch-size 64
"""

from __future__ import annotations

import argparse

import torch

import adapters
from adapters.correlation import ClassMixMonitor
from adapters.lame import lame
from benchmarks import runner
from benchmarks.cli import parse_value
from benchmarks.data import checkpoint_path, cifar10_test_path

THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


def sweep(method: str, options: dict, names: tuple[str, ...], limit: int, batch_size: int, seed: int = 0) -> dict:
    """{order: {"none": err, "always": err, threshold: err}} over the continual stream of ``names``."""
    config = runner.BenchConfig(clean_data=cifar10_test_path(), weights=checkpoint_path("resnet20"), limit=limit,
                                batch_size=batch_size, corruptions=names, seed=seed)
    model = runner.load_model("resnet20", config.weights)
    streams = runner.load_streams(config, runner.resolve_corruptions(names), runner.load_clean(config.clean_data))
    results = {}
    for order, alpha in (("shuffled", None), ("dirichlet", 0.1), ("correlated", None)):
        torch.manual_seed(seed)
        adapter = adapters.create(method, model, lame={"enabled": True, "max_class_diversity": 0.0}, **options)
        monitor = ClassMixMonitor(adapter.options.diversity_momentum)
        wrong = {"none": 0, "always": 0, **dict.fromkeys(THRESHOLDS, 0)}
        total = 0
        for x, y in (b for _, (xs, ys) in runner.order_streams(streams, order, seed, alpha).items()
                     for b in runner.batches(xs, ys, batch_size)):
            with torch.no_grad(), adapter._capturing_features():
                logits = adapter.forward(x)  # the prediction of the step below (same weights and statistics)
            features = adapter.features.take()
            adapter.step(x)  # adapt; its own output is not scored (the update never sees LAME)
            plain = (logits.argmax(1) != y).sum().item()
            corrected = (lame(logits.softmax(1), features).argmax(1) != y).sum().item()
            diversity = monitor.observe(logits)
            wrong["none"] += plain
            wrong["always"] += corrected
            for t in THRESHOLDS:
                wrong[t] += corrected if diversity <= t else plain
            total += len(y)
        results[order] = {k: 100.0 * v / total for k, v in wrong.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="source")
    parser.add_argument("--set", action="append", default=[], help="OPTION=VALUE for the method")
    parser.add_argument("--corruptions", default="speckle_noise,gaussian_blur,saturate")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    options = {k: parse_value(v) for k, _, v in (item.partition("=") for item in args.set)}
    results = sweep(args.method, options, tuple(args.corruptions.split(",")), args.limit, args.batch_size)
    header = ["order", "none", "always", *map(str, THRESHOLDS)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for order, row in results.items():
        print(f"| {order} | " + " | ".join(f"{row[k]:.1f}" for k in ["none", "always", *THRESHOLDS]) + " |")


if __name__ == "__main__":
    main()
