"""Wall-clock time per image of each method's step next to a plain forward pass.

    python -m benchmarks.timing [--batches 10] [--threads 1]

Same model (ResNet-20), batch 200, images from the regenerated CIFAR-10-C stream (gaussian noise,
severity 5, so the selection filters see realistic inputs). Methods are timed in turns,
``--rounds`` times, and the median per image is reported, which keeps a shared machine's load from
favouring whichever ran first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import adapters
from adapters.corruptions import corrupt
from adapters.datasets import load_npz, to_tensor
from benchmarks.data import checkpoint_path, cifar10_test_path
from benchmarks.runner import default_cache_dir, fisher_for, load_model

VARIANTS: list[tuple[str, str, dict]] = [
    ("source", "source", {}),
    ("norm", "norm", {}),
    ("tent", "tent", {}),
    ("eata (eps 0.4)", "eata", {}),
    ("eata (eps 0.4), backward=selected", "eata", {"backward": "selected"}),
    ("eata (eps 0.2)", "eata", {"redundancy_eps": 0.2}),
    ("eata (eps 0.2), backward=selected", "eata", {"redundancy_eps": 0.2, "backward": "selected"}),
    ("eata-c (2 confidence draws)", "eata-c", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=10, help="batches of 200 per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("resnet20", checkpoint_path("resnet20"))
    x, _ = load_npz(cifar10_test_path())
    n = 200 * args.batches
    stream = to_tensor(corrupt(x[:n], "gaussian_noise", 5, seed=0)).split(200)
    fisher = fisher_for(model, x[:2000], 200, default_cache_dir() / "fisher")
    times: dict[str, list[float]] = {label: [] for label, _, _ in VARIANTS}
    times["plain forward"] = []
    selected: dict[str, float] = {}
    for _ in range(args.rounds):
        with torch.inference_mode():
            start = time.perf_counter()
            for batch in stream:
                model(batch)
            times["plain forward"].append((time.perf_counter() - start) / n)
        for label, method, options in VARIANTS:
            uses_fisher = adapters.METHODS[method].uses_fisher
            adapter = adapters.create(method, model, fisher=fisher if uses_fisher else None, **options)
            adapter.step(stream[0])  # first step: moving average and optimiser state exist
            start = time.perf_counter()
            for batch in stream:
                adapter.step(batch)
            times[label].append((time.perf_counter() - start) / n)
            selected[label] = 100.0 * adapter.stats.samples_selected / max(adapter.stats.samples_seen, 1)
    base = statistics.median(times["plain forward"])
    print(f"{'method':38s} {'ms/image':>9s} {'x forward':>10s} {'back-propagated':>16s}")
    for label, values in times.items():
        ms = 1000 * statistics.median(values)
        share = f"{selected[label]:.0f} %" if label in selected else ""
        print(f"{label:38s} {ms:9.2f} {statistics.median(values) / base:10.1f} {share:>16s}")


if __name__ == "__main__":
    main()
