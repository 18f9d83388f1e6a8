"""One ``torch.onnx.export`` at a time in this process.

The legacy (TorchScript) exporter keeps global state (``GLOBALS.in_onnx_export``, the export
context) and ``warnings.catch_warnings`` swaps a process-wide filter list: two exports on two threads
break each other ("GLOBALS.in_onnx_export must be True"). A server with two adapting models starts
two source-agreement exports at once, so every export in the service runs inside :func:`exporting`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_LOCK = threading.Lock()


@contextmanager
def exporting() -> Iterator[None]:
    """Exclusive, without gradient, with the exporter's tracer and deprecation warnings silenced."""
    with _LOCK, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        yield
