"""Requests in, micro-batches out, answers back: the joining and splitting around the model's worker.

A request is split into chunks of at most ``max_batch_size`` images, each waiting in the worker's
queue as a :class:`PendingRequest` with a future. The worker joins whatever waits into one batch
(:class:`~service.worker.BatchPolicy` says when), and :func:`deliver` hands each request its slice of
the batch's answers on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from service.settings import ModelConfig
from service.tracing import current_context
from service.worker import BatchPolicy


@dataclass
class PendingRequest:
    """A request (or a ``max_batch_size`` chunk of one) waiting in the worker's queue."""

    images: torch.Tensor
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    enqueued_ns: int = field(default_factory=time.time_ns)  # wall clock, for the queue-wait span
    trace_context: Any = field(default_factory=current_context)  # the request's trace (None: tracing off)

    @property
    def size(self) -> int:
        return self.images.shape[0]


def batch_policy(config: ModelConfig) -> BatchPolicy:
    """Batching for ``config`` (the ``max_delay_ms`` field explains the two policies)."""
    share = config.adapt_time_share if config.mode == "async" else 1.0
    return BatchPolicy(config.max_batch_size, config.max_delay_ms / 1000, wait_from_free=config.adapts_in_sync,
                       adapt_share=share, adapt_min_share=min(config.adapt_min_share, share),
                       adapt_traffic_share=config.adapt_traffic_share if config.mode == "async" else 0.0)


def split(images: torch.Tensor, max_batch_size: int, loop: asyncio.AbstractEventLoop) -> list[PendingRequest]:
    """A request as queue entries of at most ``max_batch_size`` images, each with its future."""
    return [PendingRequest(chunk, loop.create_future()) for chunk in images.split(max_batch_size)]


def join(batch: list[PendingRequest]) -> torch.Tensor:
    """The images of every waiting entry, in order, as one batch."""
    return torch.cat([p.images for p in batch]) if len(batch) > 1 else batch[0].images


def deliver(batch: list[PendingRequest], outcome: list[Any] | Exception) -> None:
    """Resolve each entry's future with its slice of the batch's answers (event loop thread)."""
    offset = 0
    for p in batch:
        if not p.future.done():  # a client that went away cancelled its future
            if isinstance(outcome, Exception):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome[offset : offset + p.size])
        offset += p.size
