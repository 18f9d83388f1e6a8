"""``tta-serve bench`` registration (the runner lands with the benchmark issue)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the benchmark commands to the ``tta-serve`` app."""
