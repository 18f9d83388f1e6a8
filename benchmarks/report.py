"""Turn a :class:`benchmarks.runner.BenchResult` into tables, a JSON file and an error plot.

Tables are plain Markdown so they read the same in a terminal, a CI log and a pull request.
matplotlib is optional (the ``bench`` extra): only ``--plot`` needs it.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.runner import BenchResult, RunResult

#: Column headers of the wide table (the usual CIFAR-10-C abbreviations).
SHORT_NAMES = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impul",
    "defocus_blur": "defoc",
    "glass_blur": "glass",
    "motion_blur": "motn",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "brit",
    "contrast": "contr",
    "elastic_transform": "elast",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
}


class PlotUnavailableError(RuntimeError):
    """``--plot`` was asked for but matplotlib is not installed."""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table with padded columns; ``align`` has one 'l' or 'r' per column."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align, strict=True)
    )
    return "\n".join([line(header), rule + "|", *(line(r) for r in rows)])


def method_table(run: RunResult, source_accuracy: float | None = None) -> str:
    """One method: error and ECE per corruption, the means, then cost and forgetting."""
    rows = [[name, f"{err:.1f}", f"{run.eces[name]:.1f}"] for name, err in run.errors.items()]
    rows.append(["mean", f"{run.mean_error:.1f}", f"{run.ece:.1f}"])
    share = 100.0 * run.backward_samples / run.samples if run.samples else 0.0
    source = "" if source_accuracy is None else f" (source {source_accuracy:.1f})"
    lines = [
        f"### {run.method} ({run.protocol})",
        "",
        _table(["corruption", "error %", "ECE %"], rows),
        "",
        f"- back-propagated: {run.backward_samples:,} of {run.samples:,} samples ({share:.1f} %)",
        f"- clean accuracy after the stream: {run.clean_accuracy_after:.1f} %{source}, "
        f"forgetting {run.forgetting:+.1f} pt",
        f"- speed: {run.images_per_second:,.0f} images/s ({run.seconds:.1f} s adapting)",
    ]
    if run.resets:
        lines.append(f"- collapse-guard resets: {run.resets}")
    return "\n".join(lines)


def wide_table(result: BenchResult) -> str:
    """Error % per corruption (columns) for every method (rows), with the mean."""
    names = result.config["corruptions"]
    header = ["method", *(SHORT_NAMES.get(n, n) for n in names), "mean"]
    rows = [
        [r.method, *(f"{r.errors[n]:.1f}" if n in r.errors else "-" for n in names), f"{r.mean_error:.1f}"]
        for r in result.runs
    ]
    return _table(header, rows)


def summary_table(result: BenchResult) -> str:
    """One row per method plus the "forward only" reference row (a plain no-grad forward pass)."""
    cfg = result.config
    header = ["method", "error %", "ECE %", "back-propagated", "clean acc after %", "forgetting pt", "images/s"]
    rows = [
        [
            r.method,
            f"{r.mean_error:.1f}",
            f"{r.ece:.1f}",
            f"{r.backward_samples:,}/{r.samples:,}",
            f"{r.clean_accuracy_after:.1f}",
            f"{r.forgetting:+.1f}",
            f"{r.images_per_second:,.0f}",
        ]
        for r in result.runs
    ]
    forward = cfg.get("forward_only") or {}
    rows.append(
        [
            "forward only",
            "",
            "",
            "",
            f"{cfg.get('source_clean_accuracy', 0.0):.1f}",
            "",
            f"{forward.get('images_per_second', 0.0):,.0f}",
        ]
    )
    return _table(header, rows)


def kind_table(result: BenchResult) -> str:
    """Error and ECE per segment kind (clean, sev 1-3, sev 4-5), one row per method, pooled per kind."""
    kinds = [k for k in ("clean", "sev 1-3", "sev 4-5") if any(k in r.kinds for r in result.runs)]
    header = ["method"]
    for kind in kinds:
        header += [f"{kind} error %", f"{kind} ECE %"]
    header += ["segment mean error %", "mean ECE %"]
    rows = []
    for run in result.runs:
        row = [run.method]
        for kind in kinds:
            entry = run.kinds.get(kind)
            row += ["-", "-"] if entry is None else [f"{entry['error']:.1f}", f"{entry['ece']:.1f}"]
        rows.append([*row, f"{run.mean_error:.1f}", f"{run.ece:.1f}"])
    return _table(header, rows)


def segment_table(result: BenchResult) -> str:
    """Error % of every segment in stream order (rows), one column per method."""
    labels = [segment["label"] for segment in result.config.get("segments", [])]
    header = ["segment", *(r.method for r in result.runs)]
    rows = [[label, *(f"{r.errors[label]:.1f}" if label in r.errors else "-" for r in result.runs)] for label in labels]
    return _table(header, rows)


def _mixed_report(result: BenchResult, order: str) -> str:
    cfg = result.config
    segments = cfg["segments"]
    size = next(iter(cfg["samples_per_corruption"].values()), 0)
    profile = "-".join(map(str, cfg.get("mixed_profile") or []))
    title = (
        f"## {cfg['model']} · mixed: clean, severities {profile} per corruption, clean · {order} · "
        f"batch {cfg['batch_size']} · {len(segments)} segments of {size:,} images "
        f"({sum(cfg['samples_per_corruption'].values()):,} per method) · seed {cfg['seed']}"
    )
    if cfg.get("partial"):
        title += " · PARTIAL (not every method has run)"
    parts = [
        title,
        "### error % / ECE % per segment kind (pooled over the kind's images)",
        kind_table(result),
        "### error % per segment",
        segment_table(result),
        "### summary",
        summary_table(result),
        f"wall time {cfg['wall_seconds']:.0f} s on {cfg['threads']} thread(s)",
    ]
    return "\n\n".join(parts) + "\n"


def format_report(result: BenchResult) -> str:
    """Everything the CLI prints after the progress bar: a table per method, then the comparisons."""
    cfg = result.config
    source = cfg.get("source_clean_accuracy")
    order = cfg.get("order", "shuffled")
    if order == "dirichlet":
        order = f"dirichlet {cfg.get('dirichlet_alpha')}"
    if cfg.get("protocol") == "mixed":
        return _mixed_report(result, order)
    title = (
        f"## {cfg['model']} · severity {cfg['severity']} · {cfg['protocol']} · {order} · batch {cfg['batch_size']} · "
        f"{sum(cfg['samples_per_corruption'].values()):,} images per method · seed {cfg['seed']}"
    )
    if cfg.get("partial"):
        title += " · PARTIAL (not every method has run)"
    parts = [title, *(method_table(run, source) for run in result.runs)]
    parts += ["### error % per corruption", wide_table(result), "### summary", summary_table(result)]
    parts.append(f"wall time {cfg['wall_seconds']:.0f} s on {cfg['threads']} thread(s)")
    return "\n\n".join(parts) + "\n"


def write_json(result: BenchResult, path: Path) -> None:
    """The contract file: ``{"runs": [...], "config": {...}}``, every rate in percent (atomic write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    tmp.replace(path)


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def require_matplotlib() -> None:
    """Fail before a long run, not after it, when ``--plot`` cannot be honoured."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailableError("--plot needs matplotlib, part of the bench extra: pip install 'tta-serve[bench]'")


def plot_errors(result: BenchResult, path: Path) -> None:
    """Error % per corruption, one line per method (mean in the legend), saved as a PNG."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result.config
    mixed = cfg.get("protocol") == "mixed"
    names = [s["label"] for s in cfg["segments"]] if mixed else cfg["corruptions"]
    fig, ax = plt.subplots(figsize=(min(40.0, max(6.0, (0.25 if mixed else 0.6) * len(names) + 2)), 4.2))
    for run in result.runs:
        ax.plot(
            range(len(names)),
            [run.errors.get(n, float("nan")) for n in names],  # a merged/partial run may lack some
            marker="o",
            linewidth=1.5,
            label=f"{run.method} (mean {run.mean_error:.1f}, ECE {run.ece:.1f})",
        )
    ax.set_xticks(range(len(names)), [SHORT_NAMES.get(n, n) for n in names], rotation=45 if not mixed else 90,
                  ha="right" if not mixed else "center", fontsize=None if not mixed else 6)
    ax.set_ylabel("error %")
    top = max((max(r.errors.values(), default=0.0) for r in result.runs), default=0.0)
    ax.set_ylim(0, min(100.0, top * 1.25 + 1))  # head-room for the legend
    severity = "1-5 rising and falling" if mixed else cfg["severity"]
    ax.set_title(f"{cfg['model']}, severity {severity}, {cfg['protocol']}, batch {cfg['batch_size']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(result: BenchResult, path: Path) -> None:
    """Reliability diagrams: accuracy against mean confidence per ECE bin, one panel per segment kind.

    A calibrated method lies on the diagonal; below it is over-confident, above it under-confident.
    Bins with fewer than 0.2 % of a kind's images are left out (their accuracy is noise).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("clean", "sev 1-3", "sev 4-5") if any(k in r.kinds for r in result.runs)]
    if not kinds:
        raise ValueError("the result has no per-kind calibration bins (run it with this version of tta-serve bench)")
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 4.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        ax.plot([0, 100], [0, 100], color="gray", linestyle="--", linewidth=1)
        for run in result.runs:
            entry = run.kinds.get(kind)
            if entry is None:
                continue
            count = [float(c) for c in entry["bins"]["count"]]
            total = sum(count) or 1.0
            points = [
                (100.0 * conf / n, 100.0 * hit / n)
                for n, conf, hit in zip(count, entry["bins"]["confidence"], entry["bins"]["correct"], strict=True)
                if n >= 0.002 * total
            ]
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, linewidth=1.2,
                    label=f"{run.method} (err {entry['error']:.1f}, ECE {entry['ece']:.1f})")
        ax.set_title(f"{kind} ({next((r.kinds[kind]['samples'] for r in result.runs if kind in r.kinds), 0):,} "
                     "images)")
        ax.set_xlabel("confidence %")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("accuracy %")
    cfg = result.config
    fig.suptitle(f"{cfg['model']}, {cfg['protocol']}, batch {cfg['batch_size']}: reliability per segment kind")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
