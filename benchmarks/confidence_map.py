"""Fit EATA-C's ``confidence='fitted'`` map on clean labelled CIFAR-10 images and print it.

    python -m benchmarks.confidence_map [--first N] [--count 2000]
    tta-serve bench --protocol mixed --methods eata-c --set eata-c.confidence=fitted \\
        --set 'eata-c.confidence_map=[A,B]' ...

The images default to the last 2,000 of the test set: the mixed protocol's clean segments are the first
``--limit`` images, so the map is never fitted on an image it is evaluated on in clean form. The model
answers as EATA-C answers before adapting (batch statistics, batches of ``--batch-size``).
"""

from __future__ import annotations

import argparse
import json

import torch

import adapters
from adapters.confidence_map import pre_adaptation_logits
from adapters.datasets import to_tensor
from benchmarks.data import checkpoint_path, cifar10_test_path
from benchmarks.runner import CONFIDENCE_FIT_IMAGES, load_clean, load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--first", type=int, default=None,
                        help="first clean test image of the fitting set (default: the last --count, as the bench fits)")
    parser.add_argument("--count", type=int, default=CONFIDENCE_FIT_IMAGES, help="clean test images in the fitting set")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(args.model, checkpoint_path(args.model))
    x, y = load_clean(cifar10_test_path())
    first = max(0, len(y) - args.count) if args.first is None else args.first
    x, y = x[first : first + args.count], y[first : first + args.count]
    if len(y) < 2:
        parser.error(f"--first {args.first} --count {args.count} selects {len(y)} images; need at least 2")
    logits, labels = pre_adaptation_logits(model, to_tensor(x), args.batch_size), torch.as_tensor(y)
    a, b = adapters.fit_confidence_map(logits, labels)
    print(json.dumps({"confidence_map": [round(a, 4), round(b, 4)], "images": len(labels),
                      "accuracy": round(float((logits.argmax(1) == labels).double().mean()), 4)}))
    print(f"--set eata-c.confidence=fitted --set 'eata-c.confidence_map=[{a:.4f},{b:.4f}]'")


if __name__ == "__main__":
    main()
