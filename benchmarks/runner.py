"""The CIFAR-10-C benchmark loop: stream corrupted images through each adapter and score it.

One run per method: seed torch, build the adapter from the source model, feed the corruptions in the
spec order one batch at a time (``continual`` never resets, ``reset`` restores the source before each
corruption, ``mixed`` runs the clean/rising/falling stream of :mod:`benchmarks.mixed` without reset),
score the *pre-update* predictions the adapter returns (error and ECE), then measure the clean accuracy
of the adapted model (forgetting). No CLI code lives here: ``benchmarks.cli`` parses arguments into a
:class:`BenchConfig` and ``benchmarks.report`` formats the :class:`BenchResult`.

Data comes either from a clean npz corrupted on the fly (``adapters.corruptions``, cached on disk)
or from a directory in the published CIFAR-10-C layout; see :func:`load_cifar10c`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

import adapters
from adapters.confidence_map import fit_confidence_map_on_images
from adapters.datasets import DataFileError, load_images, to_tensor
from adapters.models import CIFAR_RESNETS, build_cifar_resnet
from benchmarks import mixed
from benchmarks.streams import ORDERS, Order, stream_order

Protocol = Literal["continual", "reset", "mixed"]
PROTOCOLS: tuple[str, ...] = ("continual", "reset", "mixed")
DEFAULT_METHODS: tuple[str, ...] = ("source", "norm", "tent", "eata", "eata-c")
#: Rows per severity block of a published CIFAR-10-C file. A ``<corruption>.npy`` with exactly
#: ``5 * CIFAR10C_SEVERITY_ROWS`` rows holds severities 1-5 in consecutive blocks; a file with any
#: other number of rows holds the requested severity alone.
CIFAR10C_SEVERITY_ROWS = 10_000
SEVERITY_BLOCKS = 5

#: Called after every adaptation batch with (method, corruption, images in the batch).
ProgressHook = Callable[[str, str, int], None]


class BenchError(ValueError):
    """A benchmark input problem (missing file, bad layout, unknown name), with the option at fault."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def default_cache_dir() -> Path:
    """Where corrupted datasets (and Fisher estimates, in ``fisher/``) are cached between runs."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "tta-serve" / "corruptions"


@dataclass
class BenchConfig:
    """Everything a benchmark run depends on; recorded (with the effective options) in the JSON."""

    clean_data: Path
    weights: Path
    model: str = "resnet20"
    methods: tuple[str, ...] = DEFAULT_METHODS
    #: Per-method option overrides, e.g. ``{"eata": {"lr": 0.002}}``.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    severity: int = 5
    protocol: Protocol = "continual"
    #: Order of the images inside each corruption (see :mod:`benchmarks.streams`); ``dirichlet`` needs
    #: ``dirichlet_alpha``. Reseeded with ``seed`` for every corruption, as the reference benchmark does.
    order: Order = "shuffled"
    dirichlet_alpha: float | None = None
    batch_size: int = 200
    limit: int | None = None
    seed: int = 0
    fisher_size: int = 2000
    corruptions: tuple[str, ...] | None = None
    cifar10c_dir: Path | None = None
    cifar10c_severity_rows: int = CIFAR10C_SEVERITY_ROWS
    cache_dir: Path | None = None
    threads: int | None = None
    forward_batches: int = 10


@dataclass
class RunResult:
    """One method over the whole stream. Every rate is in percent (0-100)."""

    method: str
    protocol: str
    mean_error: float
    errors: dict[str, float]
    ece: float
    backward_samples: int
    samples: int
    clean_accuracy_after: float
    images_per_second: float
    seconds: float
    eces: dict[str, float]
    ece_pooled: float
    forgetting: float
    resets: dict[str, int]
    #: Per segment kind (``clean``, ``sev 1-3``, ``sev 4-5``): error, ECE and samples over the kind's
    #: images pooled, and the 15 ECE bins (count, summed confidence, summed correct) for reliability plots.
    kinds: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchResult:
    """All runs plus the configuration that produced them (effective options of every method)."""

    runs: list[RunResult]
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"runs": [run.to_json() for run in self.runs], "config": self.config}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchResult:
        """Rebuild a result from its JSON (re-render tables or plots without re-running)."""
        return cls([RunResult(**run) for run in data["runs"]], dict(data["config"]))


# --------------------------------------------------------------------------- options
def resolve_options(methods: Sequence[str], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Validate every method name and override up front; return each method's effective options.

    Raises :class:`adapters.AdapterConfigError` (its message names the bad method or option) so a typo
    fails before any data is generated, not after an hour of benchmarking.
    """
    for method in [*methods, *overrides]:
        if method not in adapters.METHODS:
            raise adapters.AdapterConfigError(
                f"unknown adaptation method {method!r}; choose one of {sorted(adapters.METHODS)}"
            )
    effective = {}
    wanting = wanting_fitted_map(methods, overrides)
    for method in {*methods, *overrides}:
        given = dict(overrides.get(method, {}))
        if method in wanting:
            given["confidence_map"] = (0.0, 1.0)  # a stand-in to validate the rest; fitted once the model is loaded
        effective[method] = adapters.method_options(method, **given)
    return effective


#: Clean test images a requested confidence map is fitted on: the last N, never a benchmark's clean segment
#: (those are the first ``--limit`` images).
CONFIDENCE_FIT_IMAGES = 2000


def wanting_fitted_map(methods: Sequence[str], overrides: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Methods that answer with a fitted confidence map nobody gave (:func:`adapters.wants_fitted_confidence_map`):
    the bench fits one for them from clean labelled images it holds, as the server does from its Fisher set."""
    return [m for m in dict.fromkeys([*methods, *overrides])
            if adapters.wants_fitted_confidence_map(m, dict(overrides.get(m, {})))]


def with_fitted_maps(methods: Sequence[str], overrides: Mapping[str, Mapping[str, Any]], model: nn.Module,
                     clean: tuple[np.ndarray, np.ndarray], batch_size: int) -> dict[str, dict[str, Any]]:
    """``overrides`` with a confidence map fitted on the last CONFIDENCE_FIT_IMAGES clean images for each
    method that asks for one (the model answering as EATA-C does before it adapts, in batches of the run)."""
    result = {m: dict(o) for m, o in overrides.items()}
    wanting = wanting_fitted_map(methods, overrides)
    if wanting:
        x, y = clean[0][-CONFIDENCE_FIT_IMAGES:], clean[1][-CONFIDENCE_FIT_IMAGES:]
        fitted = fit_confidence_map_on_images(model, to_tensor(x), torch.as_tensor(y), batch_size)
        for method in wanting:
            result.setdefault(method, {})["confidence_map"] = fitted
    return result


def resolve_corruptions(names: Sequence[str] | None) -> tuple[str, ...]:
    """The requested corruptions in the spec order (the stream order), refusing unknown names.

    The validation corruptions (``VALIDATION_CORRUPTIONS``) run only when named, after the 15.
    """
    from adapters.corruptions import CORRUPTIONS, VALIDATION_CORRUPTIONS

    if names is None:
        return CORRUPTIONS
    known = (*CORRUPTIONS, *VALIDATION_CORRUPTIONS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown corruption(s) {unknown}; choose from {list(known)}", "--corruptions")
    if not names:
        raise BenchError("no corruption selected", "--corruptions")
    return tuple(n for n in known if n in set(names))


# --------------------------------------------------------------------------- data
def load_clean(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The clean in-distribution set (Fisher data, clean accuracy, and the on-the-fly source)."""
    try:
        return load_images(path)
    except DataFileError as exc:
        raise BenchError(str(exc), "--clean-data") from None


def _check_images(x: np.ndarray, path: Path) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise BenchError(f"{path}: expected uint8 NxHxWx3 images, got {x.dtype} {x.shape}", "--cifar10c-dir")


def load_cifar10c(
    directory: Path,
    name: str,
    severity: int,
    limit: int | None = None,
    severity_rows: int = CIFAR10C_SEVERITY_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one corruption at one severity from a CIFAR-10-C-layout directory.

    Rule: ``<name>.npy`` with exactly ``5 * severity_rows`` rows (50,000 for the published files)
    holds severities 1-5 in consecutive blocks of ``severity_rows``; any other row count is the
    requested severity alone. ``labels.npy`` either has as many rows as ``<name>.npy`` (sliced the
    same way, as published) or as many as the selected block. ``limit`` keeps the first N rows.
    """
    image_path, label_path = directory / f"{name}.npy", directory / "labels.npy"
    for path in (image_path, label_path):
        if not path.is_file():
            raise BenchError(f"CIFAR-10-C file missing: {path}", "--cifar10c-dir")
    images = np.load(image_path, mmap_mode="r")
    labels = np.load(label_path, mmap_mode="r")
    _check_images(images, image_path)
    rows = images.shape[0]
    start, stop = 0, rows
    if rows == SEVERITY_BLOCKS * severity_rows:
        start, stop = (severity - 1) * severity_rows, severity * severity_rows
    if labels.shape[0] == rows:
        labels = labels[start:stop]
    elif labels.shape[0] != stop - start:
        raise BenchError(
            f"{label_path} has {labels.shape[0]} rows; expected {rows} (as {image_path.name}) or {stop - start}",
            "--cifar10c-dir",
        )
    if limit is not None:
        stop = min(stop, start + limit)
        labels = labels[: stop - start]
    return np.array(images[start:stop]), np.array(labels, dtype=np.int64)  # copies: off the read-only mmap


def check_cifar10c_dir(directory: Path, names: Sequence[str]) -> None:
    """Fail before running anything when the directory lacks a needed file."""
    if not directory.is_dir():
        raise BenchError(f"CIFAR-10-C directory not found: {directory}", "--cifar10c-dir")
    missing = [f"{n}.npy" for n in [*names, "labels"] if not (directory / f"{n}.npy").is_file()]
    if missing:
        raise BenchError(f"{directory} lacks {', '.join(missing)}", "--cifar10c-dir")


def load_streams(
    config: BenchConfig, names: Sequence[str], clean: tuple[np.ndarray, np.ndarray], progress: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every corruption's (images, labels): read from ``--cifar10c-dir`` or corrupted (and cached)."""
    if config.cifar10c_dir is not None:
        check_cifar10c_dir(config.cifar10c_dir, names)
        return {
            n: load_cifar10c(config.cifar10c_dir, n, config.severity, config.limit, config.cifar10c_severity_rows)
            for n in names
        }
    from adapters.corruptions import corrupt_dataset

    x, y = clean
    x, y = x[: config.limit], y[: config.limit]
    cache = config.cache_dir or default_cache_dir()
    return {
        n: (corrupt_dataset(x, n, config.severity, seed=config.seed, cache_dir=cache, progress=progress), y)
        for n in names
    }


def order_streams(
    streams: Mapping[str, tuple[np.ndarray, np.ndarray]], order: Order, seed: int, alpha: float | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every corruption's images and labels in the requested order (each reseeded with ``seed``)."""
    if order == "shuffled":
        return dict(streams)
    ordered = {}
    for name, (x, y) in streams.items():
        index = stream_order(y, order, seed, alpha)
        ordered[name] = (x[index], y[index])
    return ordered


def batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (images, labels) tensor batches in the stream order; the last may be smaller."""
    for start in range(0, len(x), batch_size):
        yield to_tensor(x[start : start + batch_size]), torch.from_numpy(y[start : start + batch_size])


# --------------------------------------------------------------------------- model and Fisher
def load_model(name: str, weights: Path) -> nn.Module:
    """The source model (frozen, eval mode) from a checkpoint, with clear errors for bad inputs."""
    if name not in CIFAR_RESNETS:
        raise BenchError(f"unknown model {name!r}; choose one of {sorted(CIFAR_RESNETS)}", "--model")
    try:
        return build_cifar_resnet(name, weights)
    except FileNotFoundError as exc:
        raise BenchError(str(exc), "--weights") from None
    except ValueError as exc:  # CheckpointError: unreadable or wrong architecture
        raise BenchError(str(exc), "--weights") from None


def fisher_for(model: nn.Module, images: np.ndarray, batch_size: int, cache_dir: Path) -> adapters.FisherInfo:
    """EATA's Fisher diagonal from clean images, cached by model hash, image count and batch size.

    The batch size is part of the key because BN batch statistics shape the gradients.
    """
    path = cache_dir / f"{adapters.model_hash(model)}-n{len(images)}-b{batch_size}.safetensors"
    if path.is_file():
        try:
            return adapters.FisherInfo.load(path, model)
        except ValueError:
            pass  # unreadable or another model's: re-estimate and overwrite
    info = adapters.estimate_fisher(model, to_tensor(images), batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    info.save(tmp)
    os.replace(tmp, path)
    return info


# --------------------------------------------------------------------------- measurements
def clean_accuracy(adapter: adapters.Adapter, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Top-1 accuracy (%) of ``adapter.predict`` (no update) on clean images, in bench-size batches."""
    correct = 0
    for images, labels in batches(x, y, batch_size):
        correct += int((adapter.predict(images).argmax(1).cpu() == labels).sum())
    return 100.0 * correct / max(len(x), 1)


def time_forward(model: nn.Module, images: np.ndarray, batch_size: int, repeats: int = 10) -> dict[str, float]:
    """Images/s of a plain no-grad forward pass of the frozen model at the bench batch size.

    The reference row "forward only" of the report: what serving without adaptation costs.
    """
    batch = to_tensor(images[:batch_size])
    if len(batch) < batch_size:  # fewer clean images than one batch: tile them
        batch = batch.repeat((batch_size + len(batch) - 1) // len(batch), 1, 1, 1)[:batch_size]
    model = model.eval()
    with torch.no_grad():
        model(batch)  # warm-up (allocator, thread pool)
        start = time.perf_counter()
        for _ in range(repeats):
            model(batch)
        seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "batches": repeats,
        "seconds": seconds,
        "images_per_second": repeats * batch_size / seconds,
    }


# --------------------------------------------------------------------------- the loop
def run_method(
    method: str,
    model: nn.Module,
    streams: Mapping[str, tuple[np.ndarray, np.ndarray]],
    clean: tuple[np.ndarray, np.ndarray],
    *,
    protocol: Protocol,
    batch_size: int,
    seed: int,
    source_accuracy: float,
    options: Mapping[str, Any],
    fisher: adapters.FisherInfo | None = None,
    progress: ProgressHook | None = None,
    kinds: Mapping[str, str] | None = None,
) -> tuple[RunResult, dict[str, Any]]:
    """One method over the stream; returns its result and ``adapter.describe()`` (effective options).

    ``kinds`` maps stream names to a reporting group (:func:`benchmarks.mixed.kind_of`); each group's
    predictions are pooled into one calibration accumulator.

    Torch is seeded before the run (and, under ``reset``, again before each corruption) so a number
    never depends on which methods or corruptions ran before it.
    """
    torch.manual_seed(seed)
    uses_fisher = adapters.METHODS[method].uses_fisher
    adapter = adapters.create(method, model, fisher=fisher if uses_fisher else None, **dict(options))
    errors: dict[str, float] = {}
    eces: dict[str, float] = {}
    pooled = adapters.CalibrationAccumulator()
    groups: dict[str, adapters.CalibrationAccumulator] = {}
    seconds = 0.0
    samples = 0
    for index, (name, (x, y)) in enumerate(streams.items()):
        if protocol == "reset" and index > 0:
            adapter.reset()
            torch.manual_seed(seed)
        calib = adapters.CalibrationAccumulator()
        group = None if kinds is None else groups.setdefault(kinds[name], adapters.CalibrationAccumulator())
        for images, labels in batches(x, y, batch_size):
            start = time.perf_counter()
            logits = adapter.step(images).logits.detach().cpu()
            seconds += time.perf_counter() - start
            calib.add_logits(logits, labels)
            pooled.add_logits(logits, labels)
            if group is not None:
                group.add_logits(logits, labels)
            if progress is not None:
                progress(method, name, len(labels))
        samples += calib.samples
        errors[name] = 100.0 - calib.accuracy()
        eces[name] = calib.ece()
    after = clean_accuracy(adapter, *clean, batch_size)
    result = RunResult(
        method=method,
        protocol=protocol,
        mean_error=float(np.mean(list(errors.values()))),
        errors=errors,
        ece=float(np.mean(list(eces.values()))),
        backward_samples=adapter.stats.samples_selected,
        samples=samples,
        clean_accuracy_after=after,
        images_per_second=samples / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        eces=eces,
        ece_pooled=pooled.ece(),
        forgetting=adapters.forgetting(after, source_accuracy),
        resets={k: v for k, v in adapter.stats.resets.items() if k != "manual"},
        kinds={kind: _kind_record(groups[kind]) for kind in mixed.KINDS if kind in groups},
    )
    return result, adapter.describe()


def _kind_record(calib: adapters.CalibrationAccumulator) -> dict[str, Any]:
    """Error, ECE, samples and the raw bins of one segment kind (JSON-ready)."""
    return {
        "error": 100.0 - calib.accuracy(),
        "ece": calib.ece(),
        "samples": calib.samples,
        "bins": {
            "count": calib.count.tolist(),
            "confidence": calib.confidence.tolist(),
            "correct": calib.correct.tolist(),
        },
    }


def run_benchmark(
    config: BenchConfig,
    progress: bool = False,
    progress_hook: ProgressHook | None = None,
    on_run: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Run every method of ``config`` over the corruption stream and collect results and config.

    ``progress`` draws tqdm bars on stderr (corruption generation and adaptation batches);
    ``progress_hook`` is called after every batch instead of / besides that; ``on_run`` gets the
    partial result after each method but the last (so a long run interrupted late keeps its numbers).
    """
    wall_start = time.perf_counter()
    if config.protocol not in PROTOCOLS:
        raise BenchError(f"unknown protocol {config.protocol!r}; choose one of {list(PROTOCOLS)}", "--protocol")
    if not 1 <= config.severity <= SEVERITY_BLOCKS:
        raise BenchError(f"severity must be 1-5, got {config.severity}", "--severity")
    if not config.methods:
        raise BenchError("no method selected", "--methods")
    if config.order not in ORDERS:
        raise BenchError(f"unknown stream order {config.order!r}; choose one of {list(ORDERS)}", "--order")
    if config.order == "dirichlet" and not (config.dirichlet_alpha or 0) > 0:
        raise BenchError(f"the dirichlet order needs alpha > 0, got {config.dirichlet_alpha}", "--dirichlet")
    options = resolve_options(config.methods, config.options)
    names = resolve_corruptions(config.corruptions)
    is_mixed = config.protocol == "mixed"
    if is_mixed and config.cifar10c_dir is not None:
        raise BenchError(
            "--protocol mixed corrupts on the fly (each segment its own images and seed); "
            "drop --cifar10c-dir (or unset TTA_CIFAR10C_DIR)",
            "--cifar10c-dir",
        )
    if config.cifar10c_dir is not None:
        check_cifar10c_dir(config.cifar10c_dir, names)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model = load_model(config.model, config.weights)
    clean_x, clean_y = load_clean(config.clean_data)
    overrides = with_fitted_maps(config.methods, config.options, model, (clean_x, clean_y), config.batch_size)
    options = resolve_options(config.methods, overrides)  # the fitted maps, not resolve_options' stand-ins
    eval_clean = (clean_x[: config.limit], clean_y[: config.limit])
    cache = config.cache_dir or default_cache_dir()
    segments: list[mixed.Segment] = []
    if is_mixed:
        segments = mixed.schedule(names)
        segment_size = config.limit or mixed.DEFAULT_SEGMENT_SIZE
        try:
            streams = mixed.load_segments(segments, (clean_x, clean_y), segment_size, config.seed, cache, progress)
        except ValueError as exc:
            raise BenchError(str(exc), "--limit") from None
        eval_clean = (clean_x[:segment_size], clean_y[:segment_size])
        kinds = {segment.label: segment.kind for segment in segments}
    else:
        streams = load_streams(config, names, (clean_x, clean_y), progress=progress)
        kinds = dict.fromkeys(names, mixed.kind_of(config.severity))
    streams = order_streams(streams, config.order, config.seed, config.dirichlet_alpha)

    fisher = None
    fisher_images = clean_x[: config.fisher_size]
    if any(adapters.METHODS[m].uses_fisher for m in config.methods):
        fisher = fisher_for(model, fisher_images, config.batch_size, cache / "fisher")

    torch.manual_seed(config.seed)
    source_accuracy = clean_accuracy(adapters.create("source", model), *eval_clean, config.batch_size)
    forward = time_forward(model, clean_x, config.batch_size, config.forward_batches)

    total = len(config.methods) * sum(len(y) for _, y in streams.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="bench", dynamic_ncols=True, leave=True)

    def hook(method: str, name: str, count: int) -> None:
        if bar is not None:
            bar.set_description_str(f"{method} {name}", refresh=False)
            bar.update(count)
        if progress_hook is not None:
            progress_hook(method, name, count)

    runs: list[RunResult] = []
    described: dict[str, Any] = {}
    model_digest = adapters.model_hash(model)

    def snapshot(partial: bool) -> BenchResult:
        """Results so far with the full config; ``partial`` until every method has run."""
        methods_info = dict(described)
        # Methods that were given --set options but not run still record their effective options.
        for method, opts in options.items():
            methods_info.setdefault(method, {"method": method, "options": opts.model_dump(), "ran": False})
        record = {
            "model": config.model,
            "weights": str(config.weights),
            "model_hash": model_digest,
            "data": "cifar10c_dir" if config.cifar10c_dir is not None else "on_the_fly",
            "clean_data": str(config.clean_data),
            "cifar10c_dir": None if config.cifar10c_dir is None else str(config.cifar10c_dir),
            "cifar10c_severity_rows": config.cifar10c_severity_rows,
            "corruption_seed": config.seed,
            "severity": None if is_mixed else config.severity,
            "mixed_profile": list(mixed.PROFILE) if is_mixed else None,
            "segments": [
                {"label": s.label, "corruption": s.corruption, "severity": s.severity, "kind": s.kind}
                for s in segments
            ],
            "protocol": config.protocol,
            "order": config.order,
            "dirichlet_alpha": config.dirichlet_alpha if config.order == "dirichlet" else None,
            "batch_size": config.batch_size,
            "limit": config.limit,
            "samples_per_corruption": {n: len(y) for n, (_, y) in streams.items()},
            "seed": config.seed,
            "corruptions": list(names),
            "methods": methods_info,
            "overrides": overrides,
            "fisher": None
            if fisher is None
            else {
                "samples": fisher.num_samples,
                "batch_size": config.batch_size,
                "source": "first clean images (overlap the test images)",
            },
            "clean_samples": len(eval_clean[1]),
            "source_clean_accuracy": source_accuracy,
            "forward_only": forward,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "ece": "mean of per-corruption (mixed: per-segment) ECEs (15 equal-width bins); ece_pooled: over the "
            "whole stream; kinds: pooled per segment kind",
            "wall_seconds": time.perf_counter() - wall_start,
            "partial": partial,
        }
        return BenchResult(list(runs), _jsonable(record))

    try:
        for method in config.methods:
            result, info = run_method(
                method,
                model,
                streams,
                eval_clean,
                protocol=config.protocol,
                batch_size=config.batch_size,
                seed=config.seed,
                source_accuracy=source_accuracy,
                options=overrides.get(method, {}),
                fisher=fisher,
                progress=hook,
                kinds=kinds,
            )
            runs.append(result)
            if bar is not None:
                done = ", ".join(f"{k} {v['error']:.1f}/{v['ece']:.1f}" for k, v in result.kinds.items())
                bar.write(f"{method} done: error/ECE % {done}; {result.seconds:.0f} s adapting")
            described[method] = info
            if on_run is not None and len(runs) < len(config.methods):
                on_run(snapshot(partial=True))
    finally:
        if bar is not None:
            bar.close()

    return snapshot(partial=False)


def _jsonable(value: Any) -> Any:
    """Tuples to lists, paths to strings: the config goes to JSON as is."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
