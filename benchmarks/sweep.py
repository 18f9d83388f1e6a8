"""Trade-off sweeps on the CIFAR-10-C stream: efficiency of EATA and calibration of EATA-C.

    python -m benchmarks.sweep redundancy [--limit 1000] [--corruptions reported] [--json OUT] [--plot PNG]
    python -m benchmarks.sweep calibration [--limit 1000] [--corruptions validation] [--json OUT] [--plot PNG]

``redundancy``: EATA's error against the fraction of samples back-propagated, for several
redundancy thresholds, plus the cheaper step that back-propagates through the selected samples only
(``backward=selected``), with the wall-clock time per image of each next to a plain forward pass.
``calibration``: EATA-C's error/ECE pairs for its knobs next to EATA's. Same data path, seeds and
defaults as ``tta-serve bench`` (continual, severity 5, ResNet-20, batch 200); only the listed
options change. Use ``--limit`` to trade precision for time; the docs state which was used.

``--corruptions``: ``reported`` (the 15 of the benchmark), ``validation`` (CIFAR-10-C's four extra
corruptions, ``VALIDATION_CORRUPTIONS``, kept for choosing defaults) or a comma-separated list. The
calibration sweep chooses defaults, so it runs on ``validation`` unless told otherwise. Every variant
spells out the options it compares (e.g. ``confidence_samples``, the sub-network), so a later change
of a default does not silently change what a row means; a variant whose confidence is 'auto' gets a map
fitted on the last 2,000 clean test images, as ``tta-serve bench`` fits one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adapters
from benchmarks.data import checkpoint_path, cifar10_test_path
from benchmarks.runner import (
    BenchConfig,
    BenchError,
    clean_accuracy,
    default_cache_dir,
    fisher_for,
    load_clean,
    load_model,
    load_streams,
    resolve_corruptions,
    run_method,
    time_forward,
    with_fitted_maps,
)

#: EATA-C's first design (residual blocks dropped with p 0.2, answers deflated by sub-network agreement) and
#: the one chosen since (channels with p 0.005, answers by a confidence map fitted on clean images).
FIRST_DESIGN = {"subnetwork": "blocks", "drop_prob": 0.2, "drop_downsampling": True, "confidence": "subnetwork"}
CHANNELS = {"subnetwork": "channels", "drop_prob": 0.005}

SWEEPS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    # (label, method, options)
    "redundancy": [
        ("eps 0.2", "eata", {"redundancy_eps": 0.2}),
        ("eps 0.3", "eata", {"redundancy_eps": 0.3}),
        ("eps 0.4 (default)", "eata", {}),
        ("eps 0.6", "eata", {"redundancy_eps": 0.6}),
        ("no redundancy filter", "eata", {"redundancy_eps": 2.0}),
        ("eps 0.4, backward=selected", "eata", {"backward": "selected"}),
        ("eps 0.3, backward=selected", "eata", {"redundancy_eps": 0.3, "backward": "selected"}),
    ],
    "calibration": [
        ("eata", "eata", {}),
        ("eata-c blocks, 1 confidence draw", "eata-c", {**FIRST_DESIGN, "confidence_samples": 1}),
        ("eata-c blocks, confidence=full", "eata-c", {**FIRST_DESIGN, "confidence": "full"}),
        ("eata-c blocks, 2 confidence draws", "eata-c", {**FIRST_DESIGN, "confidence_samples": 2}),
        ("eata-c blocks, 1 draw, drop 0.1", "eata-c", {**FIRST_DESIGN, "confidence_samples": 1, "drop_prob": 0.1}),
        ("eata-c blocks, 1 draw, drop 0.3", "eata-c", {**FIRST_DESIGN, "confidence_samples": 1, "drop_prob": 0.3}),
        ("eata-c blocks, 1 draw, no KL, no max-entropy", "eata-c",
         {**FIRST_DESIGN, "confidence_samples": 1, "kl_weight": 0.0, "alpha_ent": 0.0}),
        ("eata-c channels, confidence=full", "eata-c", {**CHANNELS, "confidence": "full"}),
        ("eata-c channels, 2 confidence draws", "eata-c", {**CHANNELS, "confidence": "subnetwork",
                                                           "confidence_samples": 2}),
        ("eata-c channels, fitted map (default)", "eata-c", {**CHANNELS, "confidence": "auto"}),
    ],
}
#: Which corruptions a sweep runs on unless ``--corruptions`` says otherwise: defaults are chosen on the
#: validation corruptions; the efficiency sweep documents a trade-off on the reported stream.
DEFAULT_CORRUPTIONS = {"redundancy": "reported", "calibration": "validation"}


def corruption_names(text: str) -> tuple[str, ...]:
    """``reported``, ``validation`` or a comma-separated list -> corruption names (checked by the runner)."""
    from adapters.corruptions import CORRUPTIONS, VALIDATION_CORRUPTIONS

    if text == "reported":
        return CORRUPTIONS
    if text == "validation":
        return VALIDATION_CORRUPTIONS
    return tuple(part.strip() for part in text.split(",") if part.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", choices=sorted(SWEEPS))
    parser.add_argument("--limit", type=int, default=1000, help="images per corruption")
    parser.add_argument("--corruptions", default=None,
                        help="reported (the 15), validation (the 4 extra) or a comma-separated list; "
                        f"default: {DEFAULT_CORRUPTIONS}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        names = resolve_corruptions(corruption_names(args.corruptions or DEFAULT_CORRUPTIONS[args.sweep]))
    except BenchError as exc:
        parser.error(str(exc))
    for _, method, options in SWEEPS[args.sweep]:
        try:
            adapters.method_options(method, **options)
        except adapters.AdapterConfigError as exc:
            parser.error(f"sweep variant {options} no longer matches {method}'s options: {exc}")
    config = BenchConfig(clean_data=cifar10_test_path(), weights=checkpoint_path("resnet20"), limit=args.limit)
    model = load_model(config.model, config.weights)
    clean_x, clean_y = load_clean(config.clean_data)
    streams = load_streams(config, names, (clean_x, clean_y), progress=True)
    evaluation = (clean_x[: args.limit], clean_y[: args.limit])
    fisher = fisher_for(model, clean_x[: config.fisher_size], config.batch_size, default_cache_dir() / "fisher")
    source_accuracy = clean_accuracy(adapters.create("source", model), *evaluation, config.batch_size)
    forward = time_forward(model, clean_x, config.batch_size, 20)
    rows = []
    for label, method, options in SWEEPS[args.sweep]:
        started = time.perf_counter()
        used = with_fitted_maps([method], {method: options}, model, (clean_x, clean_y), config.batch_size)[method]
        result, _ = run_method(method, model, streams, evaluation, protocol="continual", batch_size=200, seed=0,
                               source_accuracy=source_accuracy, options=used, fisher=fisher)
        rows.append({"label": label, "method": method, "options": options, "mean_error": result.mean_error,
                     "ece": result.ece, "backward_fraction": 100.0 * result.backward_samples / result.samples,
                     "clean_accuracy_after": result.clean_accuracy_after,
                     "ms_per_image": 1000.0 / result.images_per_second,
                     "wall_seconds": time.perf_counter() - started})
        print(f"{label:32s} error {result.mean_error:5.1f}  ECE {result.ece:5.1f}  "
              f"back-propagated {rows[-1]['backward_fraction']:5.1f}%  {rows[-1]['ms_per_image']:.2f} ms/img  "
              f"clean after {result.clean_accuracy_after:.1f}", flush=True)
    forward_ms = 1000.0 / forward["images_per_second"]
    print(f"{'plain forward (batch 200)':32s} {forward_ms:.2f} ms/img")
    record = {"sweep": args.sweep, "limit": args.limit, "corruptions": list(names), "threads": torch.get_num_threads(),
              "forward_ms_per_image": forward_ms, "source_clean_accuracy": source_accuracy, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    if args.plot:
        plot(record, args.plot)


def plot(record: dict[str, Any], path: Path) -> None:
    """Error against back-propagated fraction (redundancy) or against ECE (calibration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, x_label = (("backward_fraction", "samples back-propagated (%)") if record["sweep"] == "redundancy"
                      else ("ece", "ECE (%)"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.array([r[x_key] for r in record["rows"]])
    ys = np.array([r["mean_error"] for r in record["rows"]])
    ax.scatter(xs, ys)
    for r, x, y in zip(record["rows"], xs, ys, strict=True):
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x_label)
    names = record.get("corruptions") or ["15 reported"]
    ax.set_ylabel(f"mean error over {len(names)} corruptions (%)")
    ax.set_title(f"ResNet-20, CIFAR-10-C severity 5, continual, {record['limit']} images/corruption"
                 + (" (validation set)" if "spatter" in names else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
