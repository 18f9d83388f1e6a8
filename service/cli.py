"""The ``tta-serve`` command line: one typer app, each command group in the module that owns it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="tta-serve",
    help="Serve vision models that adapt online, without labels, when their input drifts.",
    no_args_is_help=True,
    add_completion=False,
)


def _register_commands() -> None:
    """Attach commands defined elsewhere (benchmark, server) without import-time side effects."""
    from benchmarks.cli import register as register_bench

    register_bench(app)


_register_commands()
