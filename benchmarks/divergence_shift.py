"""EATA-C's model divergence under a distribution shift: does the uncertainty signal rise?

Why: the divergence (KL from the full network's prediction to a sub-network's, per image) is served as
an uncertainty signal (``divergence`` in answers, ``tta_prediction_divergence_nats``). This measures its
mean on clean CIFAR-10 test images and on gaussian_noise at rising severity (generated on the fly), for
the source weights (``predict``: no update, what the first batches of a shift see) and while EATA-C
adapts through the segment (a fresh adapter per segment, ``step``), with the error rate and the mean
divergence of right and wrong predictions (does it point at errors?)::

    python -m benchmarks.divergence_shift --limit 2000 --batch-size 200
"""

from __future__ import annotations

import argparse

import torch

import adapters
from adapters.corruptions import corrupt
from adapters.datasets import to_tensor
from benchmarks import runner
from benchmarks.data import checkpoint_path, cifar10_test_path

SEGMENTS = (("clean", 0), ("gaussian_noise", 1), ("gaussian_noise", 3), ("gaussian_noise", 5))


def measure(limit: int, batch_size: int, seed: int = 0) -> list[dict]:
    """One row per (segment, mode): mean divergence, error %, mean divergence of right / wrong answers."""
    model = runner.load_model("resnet20", checkpoint_path("resnet20"))
    x, y = runner.load_clean(cifar10_test_path())
    x, labels = x[:limit], torch.from_numpy(y[:limit]).long()
    rows = []
    for name, severity in SEGMENTS:
        images = to_tensor(x if severity == 0 else corrupt(x, name, severity, seed=seed))
        for mode in ("predict", "step"):
            adapter = adapters.create("eata-c", model, seed=seed)
            logits, divergence = [], []
            for i in range(0, limit, batch_size):
                batch = images[i : i + batch_size]
                if mode == "predict":
                    out, div = adapter.predict_with_divergence(batch)
                else:
                    result = adapter.step(batch)
                    out, div = result.logits, result.divergence
                logits.append(out.detach())
                divergence.append(div)
            right = torch.cat(logits).argmax(1) == labels
            d = torch.cat(divergence)
            rows.append({
                "segment": "clean" if severity == 0 else f"{name} {severity}", "mode": mode,
                "divergence": float(d.mean()), "error": 100.0 * (1 - float(right.float().mean())),
                "divergence_right": float(d[right].mean()),
                "divergence_wrong": float(d[~right].mean()) if bool((~right).any()) else float("nan"),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2000, help="images per segment (the first N of the test set)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| segment | weights | mean divergence (nats) | error % | divergence right / wrong |")
    print("|---|---|---|---|---|")
    for r in measure(args.limit, args.batch_size, args.seed):
        weights = "source (no update)" if r["mode"] == "predict" else "EATA-C adapting"
        print(f"| {r['segment']} | {weights} | {r['divergence']:.4f} | {r['error']:.1f} | "
              f"{r['divergence_right']:.4f} / {r['divergence_wrong']:.4f} |")


if __name__ == "__main__":
    main()
