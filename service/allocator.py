"""glibc malloc settings for tensor-sized allocations: keep freed activations in the heap.

By default glibc serves allocations above a *dynamic* threshold (128 KiB at start) with a fresh ``mmap``
and returns them with ``munmap``, so each forward pass page-faults its activations in again; and it
trims the heap top back to the OS at 128 KiB. Which state a process is in depends on what it freed
before: a fresh process ran ResNet-20 (batch 32, 2 threads) at 940 img/s here, the same code after
loading a dataset 1,600 (docs/benchmarks.md). :func:`tune_allocator` fixes the fast state from start-up,
as ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` would, at the cost of keeping up to the
trim threshold of freed memory mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (64-bit): a batch of activations stays in the heap
TRIM_THRESHOLD = 128 * 1024 * 1024


def tune_allocator() -> bool:
    """Apply the thresholds with ``mallopt``; False (and a debug log) where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        log.debug("allocator tuning skipped: the C library is not glibc")
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the allocator thresholds; tensor allocations may page-fault on every batch")
    return ok
