"""EATA-C's sub-network: how weak is it, and does its divergence from the full network say anything?

Why: EATA-C compares the full network with a random sub-network (residual branches dropped). Its
divergence is served as an uncertainty signal and drives the KL loss term; a sub-network that already
disagrees on clean images (the first design: every block, down-sampling ones included, dropped with
p = 0.2) makes the signal mostly noise and the KL term a pull towards a much weaker network. For each
construction this prints, with the source weights as EATA-C answers before adapting (batch statistics):
the sub-network's clean accuracy and agreement with the full network, the mean divergence on clean and
on shifted images, their ratio, and how well the divergence ranks the full network's errors (AUROC,
per shifted corruption, averaged). Clean: the last ``--limit`` test images (never a benchmark's clean
segment); shifted: the first ``--limit`` images under each **validation** corruption, so a construction
chosen here was not chosen on the reported stream::

    python -m benchmarks.subnetwork --limit 2000
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import torch

import adapters
from adapters.base import entropy
from adapters.corruptions import VALIDATION_CORRUPTIONS, corrupt
from adapters.datasets import to_tensor
from benchmarks import runner
from benchmarks.data import checkpoint_path, cifar10_test_path

#: (unit, drop_prob, drop_downsampling): the first is the original construction.
VARIANTS = (("blocks", 0.2, True), ("blocks", 0.1, True), ("blocks", 0.3, False), ("blocks", 0.2, False),
            ("blocks", 0.1, False), ("blocks", 0.05, False), ("channels", 0.2, False), ("channels", 0.1, False),
            ("channels", 0.05, False), ("channels", 0.02, False), ("channels", 0.01, False), ("channels", 0.005, False),
            ("channels", 0.002, False))


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).float().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).float().mean()
    return float(greater + ties / 2)


def run_variant(adapter: adapters.Adapter, images: torch.Tensor, labels: torch.Tensor,
                batch_size: int) -> dict[str, torch.Tensor]:
    """Full labels, sub-network labels and divergence of every image (no update)."""
    full, sub, divergence, ent = [], [], [], []
    for i in range(0, images.shape[0], batch_size):
        logits, div = adapter.predict_with_divergence(images[i : i + batch_size])
        full.append(logits.argmax(1))
        ent.append(entropy(logits))
        sub.append(adapter._sub_logits.argmax(1))
        divergence.append(div)
    return {"full": torch.cat(full), "sub": torch.cat(sub), "divergence": torch.cat(divergence),
            "entropy": torch.cat(ent), "labels": labels}


def measure(limit: int, batch_size: int, severity: int, seed: int = 0,
            variants: Sequence[tuple[str, float, bool]] = VARIANTS) -> Iterator[dict[str, float]]:
    """One row per construction in VARIANTS, yielded as soon as it is measured."""
    model = runner.load_model("resnet20", checkpoint_path("resnet20"))
    x, y = runner.load_clean(cifar10_test_path())
    clean = (to_tensor(x[-limit:]), torch.from_numpy(y[-limit:]).long())
    shifted = [(to_tensor(corrupt(x[:limit], name, severity, seed=seed)), torch.from_numpy(y[:limit]).long())
               for name in VALIDATION_CORRUPTIONS]
    for unit, drop_prob, drop_downsampling in variants:
        options = {"subnetwork": unit, "drop_prob": drop_prob, "drop_downsampling": drop_downsampling,
                   "confidence": "full", "seed": seed}
        c = run_variant(adapters.create("eata-c", model, **options), *clean, batch_size)
        s = [run_variant(adapters.create("eata-c", model, **options), *data, batch_size) for data in shifted]
        shifted_div = torch.cat([r["divergence"] for r in s])
        yield {
            "unit": unit, "drop_prob": drop_prob, "drop_downsampling": drop_downsampling,
            "full_acc": 100 * float((c["full"] == c["labels"]).float().mean()),
            "sub_acc": 100 * float((c["sub"] == c["labels"]).float().mean()),
            "agreement": 100 * float((c["sub"] == c["full"]).float().mean()),
            "shift_agreement": 100 * float(torch.cat([(r["sub"] == r["full"]).float() for r in s]).mean()),
            "div_clean": float(c["divergence"].mean()), "div_shift": float(shifted_div.mean()),
            "auroc": sum(auroc(r["divergence"], r["full"] != r["labels"]) for r in s) / len(s),
            "entropy_auroc": sum(auroc(r["entropy"], r["full"] != r["labels"]) for r in s) / len(s),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=2000, help="images per set")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, nargs="*", help="indices into VARIANTS to run (default: all)")
    args = parser.parse_args()
    variants = VARIANTS if not args.only else [VARIANTS[i] for i in args.only]
    print("| drops | drop_prob | drop down-sampling | full clean acc % | sub clean acc % | agreement clean % | "
          "agreement shifted % | divergence clean | divergence shifted | shifted / clean | error AUROC | "
          "entropy's AUROC |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in measure(args.limit, args.batch_size, args.severity, args.seed, variants):
        down = ("yes" if r["drop_downsampling"] else "no") if r["unit"] == "blocks" else "-"
        print(f"| {r['unit']} | {r['drop_prob']} | {down} | {r['full_acc']:.1f} | "
              f"{r['sub_acc']:.1f} | {r['agreement']:.1f} | {r['shift_agreement']:.1f} | {r['div_clean']:.3f} | "
              f"{r['div_shift']:.3f} | {r['div_shift'] / r['div_clean']:.2f} | {r['auroc']:.3f} | "
              f"{r['entropy_auroc']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
