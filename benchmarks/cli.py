"""``tta-serve bench``: the CIFAR-10-C benchmark from the command line.

Only argument parsing lives here; the loop is :mod:`benchmarks.runner` and the output
:mod:`benchmarks.report`. Heavy imports (torch) wait until the command runs, so ``tta-serve --help``
stays fast.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_METHODS = "source,norm,tent,eata,eata-c"


class Protocol(StrEnum):
    """continual: the 15 corruptions in spec order, never reset; reset: reset before each corruption;
    mixed: clean, each corruption at severities 1,2,3,4,5,4,3,2,1, clean again (benchmarks.mixed)."""

    continual = "continual"
    reset = "reset"
    mixed = "mixed"


class StreamOrder(StrEnum):
    """Order of the images inside each corruption (``--dirichlet ALPHA`` for Dirichlet blocks)."""

    shuffled = "shuffled"
    correlated = "correlated"


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, true/false/null, lists like [0.9,0.999]) or a bare string.

    YAML-ish spellings are accepted too: True/False/None/~, and floats such as ``.5`` or ``1e-3``.
    """
    stripped = text.strip()
    lowered = stripped.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("null", "none", "~"):
        return None
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    try:
        return float(stripped)
    except ValueError:
        return stripped


def parse_set_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.OPTION=VALUE`` strings -> ``{method: {option: value}}``.

    A dotted option (``eata.guard.enabled=true``) sets a nested field. Method and option names are
    checked later, by the adapter library, so its error message names the valid options.
    """
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, option = key.strip().partition(".")
        if not sep or not dot or not method or not option or any(not p for p in option.split(".")):
            raise typer.BadParameter(f"{item!r} is not METHOD.OPTION=VALUE (e.g. eata.lr=0.001)", param_hint="--set")
        target = options.setdefault(method, {})
        *parents, leaf = option.split(".")
        for part in parents:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise typer.BadParameter(f"{item!r}: {part!r} was already set to a value", param_hint="--set")
            target = child
        target[leaf] = parse_value(value)
    return options


class CorrelatedTrafficChoice(StrEnum):
    auto = "auto"
    always = "always"
    never = "never"


class EfficiencyChoice(StrEnum):
    papers = "papers"
    efficient = "efficient"


def served_overrides(
    methods: tuple[str, ...], overrides: dict[str, dict[str, Any]], *, correlated_traffic: str | None = None,
    efficiency: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``overrides`` with the server's ``correlated_traffic`` and ``efficiency`` presets under them, per
    (known) method."""
    import adapters
    from service.settings import correlated_traffic_options, efficiency_options

    merged = {m: dict(o) for m, o in overrides.items()}
    for method in methods:
        if method not in adapters.METHODS:
            continue  # named by the usual unknown-method error below
        options = {}
        if correlated_traffic is not None:
            options |= correlated_traffic_options(method, correlated_traffic)  # type: ignore[arg-type]
        if efficiency is not None:
            options |= efficiency_options(method, efficiency)  # type: ignore[arg-type]
        for key, value in merged.get(method, {}).items():
            both_dicts = isinstance(value, dict) and isinstance(options.get(key), dict)
            options[key] = options[key] | value if both_dicts else value
        merged[method] = options
    return merged


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def bench(
    model: Annotated[str, typer.Option(help="CIFAR ResNet: resnet20, resnet32, resnet44 or resnet56")] = "resnet20",
    weights: Annotated[
        Path | None,
        typer.Option(help="the model's akamaster checkpoint; default: $TTA_MODELS_DIR/<file> or $TTA_SHARED/models/"),
    ] = None,
    methods: Annotated[str, typer.Option(help="comma-separated adaptation methods, run in this order")] = (
        DEFAULT_METHODS
    ),
    severity: Annotated[
        int | None, typer.Option(min=1, max=5, help="corruption severity 1-5 (default 5; not with --protocol mixed)")
    ] = None,
    protocol: Annotated[
        Protocol,
        typer.Option(
            help="continual: never reset; reset: reset the adapter before each corruption; mixed: clean, every "
            "corruption at severities 1,2,3,4,5,4,3,2,1, clean again, never reset (--limit = images per segment, "
            "default 1000)"
        ),
    ] = Protocol.continual,
    order: Annotated[
        StreamOrder,
        typer.Option(help="shuffled: the data set's (i.i.d.) order; correlated: sorted by class per corruption"),
    ] = StreamOrder.shuffled,
    dirichlet: Annotated[
        float | None,
        typer.Option(metavar="ALPHA", help="class-correlated Dirichlet(ALPHA) blocks per corruption (NOTE), "
                     "ALPHA > 0; 0.1 is strongly correlated"),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per adaptation step")] = 200,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="use the first N images of each corruption (mixed: N images per segment)"),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="corruption and torch seed")] = 0,
    fisher_size: Annotated[
        int, typer.Option(min=1, help="clean images (the first N) to estimate EATA's Fisher information")
    ] = 2000,
    corruptions: Annotated[
        str | None, typer.Option(help="comma-separated subset of the 15 corruptions (run in spec order)")
    ] = None,
    clean_data: Annotated[
        Path | None,
        typer.Option(
            help="the CIFAR-10 test set: an npz (x uint8 NxHxWx3, y), the official cifar-10-python.tar.gz or its "
            "cifar-10-batches-py/ folder; default: $TTA_CIFAR10, or $TTA_SHARED/data/cifar10_test.npz"
        ),
    ] = None,
    cifar10c_dir: Annotated[
        Path | None,
        typer.Option(
            help="the published CIFAR-10-C folder (default: $TTA_CIFAR10C_DIR): read <corruption>.npy + labels.npy "
            "instead of corrupting on the fly; "
            "a file of exactly 50,000 rows holds severities 1-5 in blocks of 10,000, any other row count is "
            "the requested severity alone"
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="cache of corrupted sets (Fisher estimates in its fisher/); "
            "default $XDG_CACHE_HOME or ~/.cache, /tta-serve/corruptions"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="METHOD.OPTION=VALUE, repeatable, e.g. --set eata.lr=0.001"),
    ] = None,
    correlated_traffic: Annotated[
        CorrelatedTrafficChoice | None,
        typer.Option(
            help="apply the server's correlated_traffic preset to every method (auto: what `tta-serve serve` "
            "runs by default; --set options win); default: the library's (the papers') options"
        ),
    ] = None,
    efficiency: Annotated[
        EfficiencyChoice | None,
        typer.Option(help="apply the server's efficiency preset to EATA and EATA-C (efficient: back-propagate the "
                     "least redundant quarter of each batch only; --set options win)"),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results JSON here")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="draw error per corruption (mixed: per segment) for all methods (PNG)")
    ] = None,
    reliability: Annotated[
        Path | None,
        typer.Option(help="draw reliability diagrams (accuracy against confidence) per segment kind and method (PNG)"),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch.set_num_threads")] = None,
    forward_batches: Annotated[
        int, typer.Option(min=1, help="batches timed for the 'forward only' reference row")
    ] = 10,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Benchmark test-time adaptation methods on CIFAR-10-C and print a table per method."""
    from adapters import AdapterConfigError
    from benchmarks import report, runner
    from benchmarks.data import DataNotGiven, checkpoint_path, cifar10_test_path
    from benchmarks.data import cifar10c_dir as cifar10c_folder

    overrides = parse_set_options(set_ or [])
    method_list = _split(methods) or ()
    if correlated_traffic is not None or efficiency is not None:
        overrides = served_overrides(method_list, overrides, correlated_traffic=correlated_traffic,
                                     efficiency=efficiency)
    if dirichlet is not None and order != StreamOrder.shuffled:
        raise typer.BadParameter("give --order or --dirichlet, not both", param_hint="--dirichlet")
    if not method_list:
        raise typer.BadParameter("give at least one method", param_hint="--methods")
    if severity is not None and protocol == Protocol.mixed:
        raise typer.BadParameter(
            "--protocol mixed runs severities 1,2,3,4,5,4,3,2,1 per corruption; drop --severity",
            param_hint="--severity",
        )
    for flag, path in (("--plot", plot), ("--reliability", reliability)):
        if path is None:
            continue
        try:
            report.require_matplotlib()
        except report.PlotUnavailableError as exc:
            raise typer.BadParameter(str(exc).replace("--plot", flag), param_hint=flag) from None
    try:
        runner.resolve_options(method_list, overrides)
    except AdapterConfigError as exc:
        unknown_method = any(f"method {m!r}" in str(exc) and m not in runner.adapters.METHODS for m in method_list)
        raise typer.BadParameter(str(exc), param_hint="--methods" if unknown_method else "--set") from None
    from adapters.models import CIFAR_RESNETS

    if model not in CIFAR_RESNETS:
        raise typer.BadParameter(
            f"unknown model {model!r}; choose one of {sorted(CIFAR_RESNETS)}", param_hint="--model"
        )
    try:
        clean_data = cifar10_test_path(clean_data)
        weights = checkpoint_path(model, weights)
        cifar10c_dir = cifar10c_folder(cifar10c_dir)
    except DataNotGiven as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    config = runner.BenchConfig(
        clean_data=clean_data,
        weights=weights,
        model=model,
        methods=method_list,
        options=overrides,
        severity=5 if severity is None else severity,
        protocol=protocol.value,  # type: ignore[arg-type]
        order="dirichlet" if dirichlet is not None else order.value,  # type: ignore[arg-type]
        dirichlet_alpha=dirichlet,
        batch_size=batch_size,
        limit=limit,
        seed=seed,
        fisher_size=fisher_size,
        corruptions=_split(corruptions),
        cifar10c_dir=cifar10c_dir,
        cache_dir=cache_dir,
        threads=threads,
        forward_batches=forward_batches,
    )

    def save_partial(partial: runner.BenchResult) -> None:
        """Keep finished methods on disk: a run of hours must not lose them to a late failure."""
        if json_out is not None:
            report.write_json(partial, json_out)

    try:
        result = runner.run_benchmark(config, progress=not quiet, on_run=save_partial)
    except runner.BenchError as exc:
        raise typer.BadParameter(str(exc), param_hint=exc.option) from None
    except AdapterConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None
    typer.echo(report.format_report(result))
    if json_out is not None:
        report.write_json(result, json_out)
        typer.echo(f"results written to {json_out}", err=True)
    if plot is not None:
        report.plot_errors(result, plot)
        typer.echo(f"plot written to {plot}", err=True)
    if reliability is not None:
        report.plot_reliability(result, reliability)
        typer.echo(f"reliability diagrams written to {reliability}", err=True)


def _group() -> None:
    """Keeps ``tta-serve`` a command group (see :func:`register`)."""


def register(app: typer.Typer) -> None:
    """Attach the benchmark commands to the ``tta-serve`` app.

    Typer collapses an app with a single command and no callback into that command, which would turn
    ``tta-serve bench ...`` into ``tta-serve ...``; a no-op callback keeps the ``bench`` sub-command
    name whatever else is registered (an app callback set by its owner takes precedence).
    """
    app.command("bench")(bench)
    if not app.registered_callback and not app.info.callback:
        app.callback()(_group)


if __name__ == "__main__":  # ``python -m benchmarks.cli`` works without the installed script
    _app = typer.Typer(add_completion=False)
    register(_app)
    _app()
