"""``tta-serve stream``: the Redis Streams consumer from the command line.

Only argument parsing lives here; the consumer is :mod:`service.stream`. Heavy imports (torch) wait
until the command runs, so ``tta-serve --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer


def stream(
    input_stream: Annotated[str, typer.Option("--input-stream", help="stream key to read image entries from")],
    output_stream: Annotated[str, typer.Option("--output-stream", help="stream key to write results to")],
    group: Annotated[str, typer.Option(help="consumer group (created with MKSTREAM if missing)")] = "tta-serve",
    consumer: Annotated[
        str | None, typer.Option(help="this consumer's name in the group (default: host-pid)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model to serve when the config lists several")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis holding the streams (default: TTA_REDIS_URL or redis://127.0.0.1:6379/0)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML or TOML file listing the models (and settings)")] = None,
    batch: Annotated[int, typer.Option(help="entries read per XREADGROUP (one micro-batch)")] = 32,
    block_ms: Annotated[int, typer.Option(help="how long one read waits for new entries")] = 1000,
    claim_idle_ms: Annotated[
        int, typer.Option(help="claim other consumers' entries pending longer than this (XAUTOCLAIM)")
    ] = 60_000,
    max_messages: Annotated[
        int | None, typer.Option(help="stop after acknowledging this many entries (tests, demos)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="logging level")] = "info",
) -> None:
    """Consume images from a Redis stream, predict and adapt in micro-batches, write results to another.

    Exits 0 on SIGINT/SIGTERM after writing and acknowledging the batch in hand.
    """
    import redis

    from service.errors import ConfigError, ModelLoadError
    from service.settings import load_settings
    from service.stream import StreamOptions, serve_stream
    from service.stream import redis_url as default_redis_url

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = StreamOptions(
            input_stream=input_stream, output_stream=output_stream, group=group, batch=batch, block_ms=block_ms,
            claim_idle_ms=claim_idle_ms, max_messages=max_messages,
            **({"consumer": consumer} if consumer else {}),
        )
        settings = load_settings(config)
        url = redis_url or default_redis_url(settings)
        status = serve_stream(settings, options, url, model)
    except (ValueError, ConfigError, ModelLoadError, redis.RedisError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(status)


def register(app: typer.Typer) -> None:
    """Add the ``stream`` command to the ``tta-serve`` app."""
    app.command("stream")(stream)
