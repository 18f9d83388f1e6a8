"""One thread per model that owns the adapter: the only place its weights are read or written.

Jobs carry a priority: predictions (requests waiting) run before queued adaptation work, so async
mode keeps adaptation off the request path.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

PREDICT = 0
ADAPT = 1
_STOP = 2


class ModelWorker:
    """A single thread executing submitted callables in priority order (FIFO within a priority)."""

    def __init__(self, name: str) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any] | None, Future | None]] = (
            queue.PriorityQueue()
        )
        self._counter = itertools.count()
        self._thread = threading.Thread(target=self._run, name=f"tta-worker-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], priority: int = PREDICT) -> Future:
        future: Future = Future()
        self._queue.put((priority, next(self._counter), fn, future))
        return future

    def pending(self, priority: int) -> int:
        with self._queue.mutex:
            return sum(1 for item in self._queue.queue if item[0] == priority)

    def _run(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # the caller gets the error; the worker keeps serving
                log.exception("model worker job failed")
                future.set_exception(exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued jobs, then stop."""
        self._queue.put((_STOP, next(self._counter), None, None))
        self._thread.join(timeout)
