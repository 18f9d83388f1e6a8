"""The ``tta-serve`` command line: one typer app, each command group in the module that owns it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="tta-serve",
    help="Serve vision models that adapt online, without labels, when their input drifts.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"tta-serve {version('tta-serve')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("tta-serve (not installed: run 'pip install .')")
        raise typer.Exit()


@app.callback()
def _main(
    _version_flag: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Serve vision models that adapt online, without labels, when their input drifts."""


#: Where a setting comes from, highest first (``service.settings.load_settings`` implements it): the same
#: for ``serve``, ``stream`` and the app factory. Kept here so that ``--help`` imports no torch.
PRECEDENCE = (
    "command-line flags, then TTA_* environment variables, then the config file (--config or TTA_CONFIG), "
    "then the built-in defaults"
)
SERVE_HELP = (
    "Start the HTTP server. Without --config or --architecture it serves the built-in `digits` model.\n\n"
    f"Every setting comes from, highest first: {PRECEDENCE}. "
    "An unknown key in the config file stops start-up (exit 2) and names the key."
)


@app.command("serve", help=SERVE_HELP)
def serve(
    config: Annotated[Path | None, typer.Option(help="YAML or TOML file listing the models (and settings)")] = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1, or TTA_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000, or TTA_PORT)")] = None,
    architecture: Annotated[
        str | None, typer.Option(help="serve one built-in model instead of a config file: digits, resnet20, ...")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="weights for --architecture")] = None,
    method: Annotated[str, typer.Option(help="adaptation method for --architecture")] = "eata",
    name: Annotated[str | None, typer.Option(help="model name for --architecture (default: the architecture)")] = None,
    fisher_data: Annotated[
        Path | None,
        typer.Option(help="clean images for EATA's Fisher term: an npz (x uint8 NxHxWx3), cifar-10-python.tar.gz "
                     "or its cifar-10-batches-py/ folder"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="server processes on the port (or TTA_WORKERS; 0: one per core; default: one per core "
                     "when every model is frozen, else 1). With more than one, worker 0 adapts and the others "
                     "serve its weights (Linux, SO_REUSEPORT; docs/serving.md)", min=0),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Start the HTTP server (help text: SERVE_HELP)."""
    import uvicorn

    from service.composition import build_registry, routing_for_app
    from service.errors import ConfigError, ModelLoadError
    from service.http.app import create_app
    from service.metrics import ServiceMetrics
    from service.settings import load_settings

    models = None
    if architecture is not None:
        if config is not None:
            _fail("give either --config or --architecture, not both")
        model = {"name": name or architecture, "architecture": architecture, "method": method}
        if weights is not None:
            model["weights"] = str(weights)
        if fisher_data is not None:
            model["fisher_data"] = str(fisher_data)
        models = [model]
    elif weights is not None or fisher_data is not None or name is not None:
        _fail("--weights, --fisher-data and --name apply to --architecture")
    import logging.config

    from service.logs import logging_config

    try:
        settings = load_settings(config, host=host, port=port, models=models, workers=workers)
        logging.config.dictConfig(logging_config(settings.log_format, log_level))  # model loading logs too
        if settings.resolved_workers() > 1:  # a supervisor of worker processes (service/workers.py)
            from service.workers import serve_workers

            raise typer.Exit(serve_workers(settings, log_level))
        metrics = ServiceMetrics()
        registry = build_registry(settings, metrics)
    except (ConfigError, ModelLoadError) as exc:
        _fail(str(exc))
    try:  # CLIP towers, detectors and route tables: a broken one stops start-up here, with exit 2
        routing = routing_for_app(settings, registry, metrics)
    except Exception as exc:
        _fail(f"routing: {exc}")
    app_ = create_app(settings, registry, metrics)
    app_.state.routing = routing
    uvicorn.run(app_, host=settings.host, port=settings.port, log_level=log_level,
                log_config=logging_config(settings.log_format, log_level))


@app.command("demo")
def demo(
    images_per_segment: Annotated[int, typer.Option(help="images streamed per drift segment")] = 400,
    segments: Annotated[
        str, typer.Option(help="comma-separated drift segments: 'clean' or corruption names (severity 5)")
    ] = ",".join(("clean", "impulse_noise", "snow", "brightness", "frost", "contrast", "fog")),
    batch: Annotated[int, typer.Option(help="images per HTTP request")] = 32,
    port: Annotated[int | None, typer.Option(help="port for the demo server (default: a free one)")] = None,
    seed: Annotated[int, typer.Option(help="random seed of the stream")] = 0,
) -> None:
    """Start the server and stream drifting digits through it: frozen vs adapting accuracy, live."""
    from adapters.corruptions import CORRUPTIONS
    from service.demo import run_demo

    chosen = tuple(s.strip() for s in segments.split(",") if s.strip())
    unknown = [s for s in chosen if s != "clean" and s not in CORRUPTIONS]
    if not chosen or unknown:
        _fail(f"unknown segments {unknown}; choose from clean, {', '.join(CORRUPTIONS)}")
    if images_per_segment < 1 or batch < 1:
        _fail("--images-per-segment and --batch must be at least 1")
    result = run_demo(chosen, images_per_segment, batch, port, seed)
    if result.adapting_accuracy <= result.frozen_accuracy:
        raise typer.Exit(1)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _register_commands() -> None:
    """Attach commands defined elsewhere (benchmark, server) without import-time side effects."""
    from benchmarks.cli import register as register_bench
    from service.clip.cli import register as register_clip
    from service.stream_cli import register as register_stream

    register_bench(app)
    register_clip(app)
    register_stream(app)


_register_commands()

if __name__ == "__main__":  # ``python -m service.cli`` works without the installed script
    app()
