"""One thread per model that owns the adapter: the only place its weights are read or written.

The thread also forms the micro-batches: requests wait in its queue and it takes a batch when it is
free, so a batch holds everything that arrived while the model was busy (the event loop never commits
a batch early to a model that cannot start it yet). What runs next, in order:

1. admin jobs (reset, snapshots, parameter sync), submitted with priority ``PREDICT``;
2. a batch of waiting requests, once it is due (see :class:`BatchPolicy`);
3. queued adaptation work (priority ``ADAPT``), only while no request waits: async mode keeps
   adaptation off the request path.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

PREDICT = 0
ADAPT = 1
_STOP = 2
_ADAPT_BURST_S = 0.1


class Request(Protocol):
    """What the worker needs of a waiting request."""

    size: int  # images
    enqueued: float  # time.perf_counter() at arrival


@dataclass(frozen=True)
class BatchPolicy:
    """When waiting requests leave as a batch: when ``max_batch`` images wait, or after ``max_delay_s``.

    The delay counts from the oldest request's arrival (``wait_from_free=False``: under load, requests
    that queued while the model was busy leave at once, so the model never idles), or from when the
    model became free (``wait_from_free=True``: the model waits up to ``max_delay_s`` for a fuller batch;
    worth it where per-image cost falls with batch size, as for adaptation steps).

    ``adapt_share`` < 1 budgets adaptation (a token bucket): jobs of priority ``ADAPT`` run only while
    their time so far stays within that share of the elapsed time (with a burst of ``_ADAPT_BURST_S``
    after idle time). Without it, a busy model starts a step in every short gap between requests and
    the requests arriving during the step wait for all of it.

    ``adapt_min_share`` > 0 reserves that share of the thread's time for adaptation even while requests
    wait (a second bucket): without it a saturated model never adapts, since some request always waits.
    ``adapt_traffic_share`` > 0 reserves adaptation for that share of the *served images* instead (a third
    bucket, counted in images): a job of ``images`` images runs ahead of waiting requests once the images
    served since earn it. A time share adapts on fewer images the faster batches are served; this one
    states what a saturated model learns from, whatever the load.
    """

    max_batch: int
    max_delay_s: float
    wait_from_free: bool = False
    adapt_share: float = 1.0  # most of the thread's time adaptation jobs may take (1: whenever no request waits)
    adapt_min_share: float = 0.0  # share adaptation jobs get even while requests wait
    adapt_traffic_share: float = 0.0  # share of served images adaptation jobs get even while requests wait


class ModelWorker:
    """A single thread running jobs in priority order and the batches of ``serve_batch``."""

    def __init__(
        self,
        name: str,
        policy: BatchPolicy | None = None,
        serve_batch: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self._policy = policy or BatchPolicy(max_batch=1, max_delay_s=0.0)
        self._serve_batch = serve_batch
        self._cond = threading.Condition()
        self._jobs: list[tuple[int, int, Callable[[], Any] | None, Future | None, int]] = []
        self._requests: deque[Any] = deque()
        self._waiting_images = 0
        self._counter = itertools.count()
        self._stopping = False
        self._adapt_credit = _ADAPT_BURST_S  # seconds of adaptation the budget allows now
        self._reserved_credit = 0.0  # seconds of adaptation owed even while requests wait
        self._image_credit = 0.0  # images of adaptation owed even while requests wait (adapt_traffic_share)
        self._credit_at = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=f"tta-worker-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def submit(self, fn: Callable[[], Any], priority: int = PREDICT, images: int = 0) -> Future:
        """Queue ``fn``; ``images``: the images an ``ADAPT`` job learns from (``adapt_traffic_share``)."""
        future: Future = Future()
        with self._cond:
            heapq.heappush(self._jobs, (priority, next(self._counter), fn, future, images))
            self._cond.notify()
        return future

    def put_request(self, request: Request) -> int:
        """Queue a request for the next batch; returns the images now waiting."""
        if self._serve_batch is None:
            raise RuntimeError("this worker serves no batches")
        with self._cond:
            self._requests.append(request)
            self._waiting_images += request.size
            self._cond.notify()
            return self._waiting_images

    def pending(self, priority: int) -> int:
        with self._cond:
            return sum(1 for job in self._jobs if job[0] == priority)

    @property
    def waiting_images(self) -> int:
        """Images of the requests waiting to be batched, now (read by scrapes: current when the queue drains)."""
        return self._waiting_images

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Serve waiting requests and finish queued jobs, then stop."""
        with self._cond:
            self._stopping = True  # waiting requests are due now
            heapq.heappush(self._jobs, (_STOP, next(self._counter), None, None, 0))
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        free_since = time.perf_counter()
        while True:
            with self._cond:
                job, batch = self._next(free_since)
            if batch is not None:
                assert self._serve_batch is not None
                try:
                    self._serve_batch(batch)
                except BaseException:  # serve_batch answers its requests itself; never let the thread die
                    log.exception("serving a batch failed")
            elif job is not None:
                priority, _, fn, future, images = job
                if fn is None:
                    return
                started = time.perf_counter()
                if future is not None and future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # the caller gets the error; the worker keeps serving
                        log.exception("model worker job failed")
                        future.set_exception(exc)
                if priority == ADAPT:
                    with self._cond:
                        spent = time.perf_counter() - started
                        self._adapt_credit -= spent
                        self._reserved_credit -= spent
                        self._image_credit = max(0.0, self._image_credit - images)
            free_since = time.perf_counter()

    def _next(self, free_since: float) -> tuple[tuple | None, list[Any] | None]:
        """(job, None) or (None, batch): what to run next; waits until something is due. Holds the lock."""
        policy = self._policy
        while True:
            if self._jobs and self._jobs[0][0] == PREDICT:
                return heapq.heappop(self._jobs), None
            if self._requests and self._jobs and self._jobs[0][0] == ADAPT and self._reserved_share_due():
                return heapq.heappop(self._jobs), None
            if self._requests:
                start = self._requests[0].enqueued
                if policy.wait_from_free:
                    start = max(start, free_since)
                remaining = start + policy.max_delay_s - time.perf_counter()
                if self._waiting_images >= policy.max_batch or remaining <= 0 or self._stopping:
                    return None, self._take_batch()
                self._cond.wait(remaining)
                continue
            if self._jobs:
                wait = self._adapt_wait() if self._jobs[0][0] == ADAPT else 0.0
                if wait <= 0:
                    return heapq.heappop(self._jobs), None
                self._cond.wait(wait)
                continue
            self._cond.wait()

    def _accrue(self) -> None:
        """Add the budget earned since the last call to both buckets. Holds the lock."""
        now = time.perf_counter()
        elapsed, self._credit_at = now - self._credit_at, now
        self._adapt_credit = min(_ADAPT_BURST_S, self._adapt_credit + self._policy.adapt_share * elapsed)
        self._reserved_credit = min(_ADAPT_BURST_S, self._reserved_credit + self._policy.adapt_min_share * elapsed)

    def _adapt_wait(self) -> float:
        """Seconds until the adaptation budget allows the next job (0: now). Holds the lock."""
        share = self._policy.adapt_share
        if share >= 1 or self._stopping:
            return 0.0
        self._accrue()
        return 0.0 if self._adapt_credit > 0 else -self._adapt_credit / share

    def _reserved_share_due(self) -> bool:
        """Whether the next adaptation job runs ahead of waiting requests now (a reserved share: of the time or
        of the served images). Holds the lock."""
        if self._stopping:
            return False
        images = self._jobs[0][4]  # 0: not an adaptation step (a probe evaluation): the time share alone
        owed = self._policy.adapt_traffic_share > 0 and images > 0
        if owed and self._image_credit >= min(images, self._policy.max_batch):
            return True
        if self._policy.adapt_min_share <= 0:
            return False
        self._accrue()
        return self._reserved_credit > 0

    def _take_batch(self) -> list[Any]:
        """The oldest requests that fit in ``max_batch`` images (always at least one)."""
        batch = [self._requests.popleft()]
        size = batch[0].size
        while self._requests and size + self._requests[0].size <= self._policy.max_batch:
            request = self._requests.popleft()
            batch.append(request)
            size += request.size
        self._waiting_images -= size
        # adapt_traffic_share: these images earn adaptation, owed at most a batch (a share of what is served now,
        # not a backlog)
        self._image_credit = min(self._image_credit + self._policy.adapt_traffic_share * size, self._policy.max_batch)
        return batch
