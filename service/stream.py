"""Streaming adaptation on live traffic: a Redis Streams consumer that predicts and adapts.

A consumer in a consumer group reads image entries from an input stream, answers them in
micro-batches through the model's engine (``ModelEngine.predict``: the same batching and adaptation
as the HTTP server), writes one result entry per input entry to an output stream and acknowledges
the inputs only after the results are written.

Delivery is at-least-once (a consumer that dies leaves its entries pending; another one claims them
with XAUTOCLAIM), but the effect is exactly-once: the result entry and a *done record* for the input
entry are written in one MULTI/EXEC transaction, and entries with a done record are acknowledged
without being predicted again. A redelivered entry therefore neither adds a second output entry nor
counts twice in the adaptation statistics, and its ``result_id`` (derived from the input stream and
entry id) is the same whoever answers it.

Redis calls use the blocking client of :class:`service.redis_state.RedisConnection` on a thread, so
the engine's batcher keeps running on the event loop; Redis being down is logged and retried with
backoff, and the batch in hand is kept (its results are written when Redis returns, never recomputed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np
import redis
from PIL import Image

from service.engine import ModelEngine, Prediction
from service.errors import InvalidInput, StoreUnavailable
from service.predictions import prediction_fields
from service.preprocess import decode_image, uint8_nhwc_to_tensor
from service.redis_state import KEY_PREFIX, RedisConnection
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_GROUP = "tta-serve"


@dataclass
class StreamOptions:
    """Where to read and write, and how the consumer paces itself."""

    input_stream: str
    output_stream: str
    group: str = DEFAULT_GROUP
    consumer: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    batch: int = 32
    block_ms: int = 1000
    claim_idle_ms: int = 60_000
    max_messages: int | None = None
    result_ttl_s: int = 86_400
    log_every_s: float = 10.0
    retry_max_s: float = 5.0
    stop_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.block_ms < 1 or self.claim_idle_ms < 1:
            raise ValueError("batch, block_ms and claim_idle_ms must be at least 1")
        if self.max_messages is not None and self.max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        if self.input_stream == self.output_stream:
            raise ValueError("the input and output streams must differ")


@dataclass
class StreamCounters:
    """Entries handled, by outcome. ``duplicates`` were already answered (redelivered) and only acked."""

    read: int = 0
    claimed: int = 0
    predicted: int = 0
    errors: int = 0
    duplicates: int = 0
    deleted: int = 0
    acked: int = 0

    def minus(self, other: StreamCounters) -> StreamCounters:
        return StreamCounters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def copy(self) -> StreamCounters:
        return StreamCounters(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class _Entry:
    entry_id: str
    fields: dict[bytes, bytes] | None  # None: deleted from the stream while pending


def result_id(input_stream: str, entry_id: str) -> str:
    """The deterministic id of an entry's result: the same on every delivery and every consumer."""
    return hashlib.sha256(f"{input_stream}\n{entry_id}".encode()).hexdigest()[:32]


def done_key(options: StreamOptions, entry_id: str) -> str:
    """The done record of one input entry: a hash of the result fields written, with a TTL."""
    return ":".join((KEY_PREFIX, "stream", options.input_stream, options.group, "done", entry_id))


# ---------------------------------------------------------------------------------------- decoding
def decode_entry(
    entry_fields: dict[bytes, bytes], size: tuple[int, int], max_pixels: int
) -> np.ndarray:
    """An input entry's ``image`` (encoded file) or ``tensor`` + ``shape`` (raw uint8 HxWx3) -> uint8 HxWx3."""
    if b"image" in entry_fields:
        return decode_image(entry_fields[b"image"], size, max_pixels)
    if b"tensor" not in entry_fields:
        raise InvalidInput("the entry has neither an 'image' nor a 'tensor' field")
    raw = entry_fields[b"tensor"]
    dims = [int(d) for d in re.findall(rb"\d+", entry_fields.get(b"shape", b""))]
    if len(dims) != 3 or dims[2] != 3 or 0 in dims:
        raise InvalidInput(f"'tensor' needs a 'shape' field H,W,3 (got {entry_fields.get(b'shape', b'')!r})")
    height, width, _ = dims
    if height * width > max_pixels:
        raise InvalidInput(f"tensor is {width}x{height} pixels; the limit is {max_pixels} pixels")
    if len(raw) != height * width * 3:
        raise InvalidInput(f"tensor has {len(raw)} bytes but shape {dims} of uint8 needs {height * width * 3}")
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
    if (height, width) != tuple(size):
        image = Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    return pixels


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------- the consumer
class StreamConsumer:
    """One consumer of a consumer group, answering entries with ``engine`` until stopped."""

    def __init__(
        self, engine: ModelEngine, connection: RedisConnection, options: StreamOptions, max_image_pixels: int
    ) -> None:
        self.engine = engine
        self.connection = connection
        self.client = connection.client
        self.options = options
        self.max_image_pixels = max_image_pixels
        self.counters = StreamCounters()
        self._read_backlog = True  # first re-read our own pending entries (a restart with the same name)
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._retry_delay = 0.1

    # ------------------------------------------------------------------ the loop
    async def run(self, stop: asyncio.Event | None = None) -> bool:
        """Consume until ``stop`` is set or ``max_messages`` entries are acknowledged.

        Returns False when it had to give up on a batch in hand (Redis down at stop time); its
        entries stay pending for another consumer to claim.
        """
        stop = stop or asyncio.Event()
        o = self.options
        log.info("stream consumer %s: group %s reads %s, writes %s, model %s",
                 o.consumer, o.group, o.input_stream, o.output_stream, self.engine.name)
        last_log, last_counts = time.monotonic(), self.counters.copy()
        try:
            await self._until_ok(self._ensure_group, stop)
            while not stop.is_set() and not self._enough():
                entries = await self._until_ok(self._next_entries, stop)
                if entries and not await self._handle(entries, stop):
                    return False
                if time.monotonic() - last_log >= o.log_every_s:
                    self._log_progress(time.monotonic() - last_log, last_counts)
                    last_log, last_counts = time.monotonic(), self.counters.copy()
        except StoreUnavailable:  # stopped while Redis was down, with nothing in hand
            log.warning("stream consumer %s: stopped while redis was down", o.consumer)
        self._log_progress(time.monotonic() - last_log, last_counts)
        return True

    def _enough(self) -> bool:
        limit = self.options.max_messages
        return limit is not None and self.counters.acked >= limit

    def _room(self) -> int:
        limit = self.options.max_messages
        return self.options.batch if limit is None else max(1, min(self.options.batch, limit - self.counters.acked))

    def _log_progress(self, seconds: float, before: StreamCounters) -> None:
        d = self.counters.minus(before)
        log.info(
            "stream %s: %d entries in %.1fs (%d predicted, %d errors, %d duplicates, %d claimed); %d acked in all",
            self.options.input_stream, d.acked, seconds, d.predicted, d.errors, d.duplicates, d.claimed,
            self.counters.acked,
        )

    async def _until_ok(self, fn: Callable[[], T], stop: asyncio.Event, grace_s: float = 0.0) -> T:
        """Run a blocking Redis job on a thread, retrying with backoff while Redis is down.

        Once ``stop`` is set, retrying goes on for ``grace_s`` more seconds, then
        :class:`StoreUnavailable` is raised (0: at once, for reads; a batch in hand gets longer).
        """
        stopped_at: float | None = None
        while True:
            try:
                result = await asyncio.to_thread(fn)
            except StoreUnavailable as exc:
                if stop.is_set():
                    stopped_at = stopped_at or time.monotonic()
                    if time.monotonic() - stopped_at >= grace_s:
                        raise
                level = logging.WARNING if self._retry_delay <= 0.1 else logging.DEBUG  # once per outage
                log.log(level, "stream consumer %s: redis unavailable (%s); retrying with backoff up to %.0fs",
                        self.options.consumer, exc, self.options.retry_max_s)
                if stop.is_set():
                    await asyncio.sleep(self._retry_delay)
                else:  # a stop request cuts the wait short
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._retry_delay)
                self._retry_delay = min(self._retry_delay * 2, self.options.retry_max_s)
                continue
            self._retry_delay = 0.1
            return result

    # ------------------------------------------------------------------ reading (blocking, on a thread)
    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.connection.call(fn, *args, **kwargs)

    def _ensure_group(self) -> None:
        """Create the group (and the stream) if missing; a new group starts at the stream's beginning."""
        try:
            self._call(self.client.xgroup_create, self.options.input_stream, self.options.group, id="0",
                       mkstream=True)
            log.info("created consumer group %s on %s", self.options.group, self.options.input_stream)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _next_entries(self) -> list[_Entry]:
        """Claimed entries of dead consumers when a claim is due, else our backlog, else new entries."""
        try:
            return self._claim() or self._read()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("consumer group %s on %s is gone (redis restarted without data?); recreating it",
                        self.options.group, self.options.input_stream)
            self._ensure_group()
            self._read_backlog = True
            return []

    def _claim(self) -> list[_Entry]:
        o = self.options
        if time.monotonic() < self._next_claim:
            return []
        reply = self._call(self.client.xautoclaim, o.input_stream, o.group, o.consumer,
                           min_idle_time=o.claim_idle_ms, start_id=self._claim_cursor, count=self._room())
        cursor, claimed = reply[0], reply[1]
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if self._claim_cursor == "0-0":  # scanned the whole pending list: wait before the next scan
            self._next_claim = time.monotonic() + o.claim_idle_ms / 2000
        entries = [_Entry(i.decode(), f or None) for i, f in claimed]
        if entries:
            log.warning("stream consumer %s: claimed %d entries idle over %d ms from other consumers",
                        o.consumer, len(entries), o.claim_idle_ms)
            self.counters.claimed += len(entries)
        return entries

    def _read(self) -> list[_Entry]:
        o = self.options
        start = "0" if self._read_backlog else ">"
        reply = self._call(self.client.xreadgroup, o.group, o.consumer, {o.input_stream: start},
                           count=self._room(), block=None if self._read_backlog else o.block_ms)
        messages = reply[0][1] if reply else []
        if self._read_backlog and not messages:
            self._read_backlog = False
        entries = [_Entry(i.decode(), f or None) for i, f in messages]
        self.counters.read += len(entries)
        return entries

    # ------------------------------------------------------------------ one batch
    async def _handle(self, entries: list[_Entry], stop: asyncio.Event) -> bool:
        """Answer, write and acknowledge one batch; False if Redis stayed down past a stop request."""
        ids = [e.entry_id for e in entries]
        grace = self.options.stop_grace_s
        try:
            done = await self._until_ok(lambda: self._done(ids), stop, grace)
            fresh = [e for e in entries if e.fields is not None and e.entry_id not in done]
            results = await self._answer(fresh)
            written = await self._until_ok(lambda: self._commit(results), stop, grace)
            await self._until_ok(lambda: self._ack(ids), stop, grace)
        except StoreUnavailable:
            log.error("stream consumer %s: stopping with %d entries not acknowledged (redis down); another "
                      "consumer will claim them", self.options.consumer, len(ids))
            return False
        self.counters.deleted += sum(e.fields is None for e in entries)
        self.counters.duplicates += len(entries) - len(written) - sum(e.fields is None for e in entries)
        self.counters.errors += sum(b"error" in results[i] for i in written)
        self.counters.predicted += sum(b"error" not in results[i] for i in written)
        self.counters.acked += len(ids)
        return True

    def _done(self, ids: list[str]) -> set[str]:
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.exists(done_key(self.options, entry_id))
        flags = self._call(pipe.execute)
        return {i for i, flag in zip(ids, flags, strict=True) if flag}

    async def _answer(self, entries: list[_Entry]) -> dict[str, dict[bytes, bytes]]:
        """Result fields per entry id: predictions for decodable entries, ``error`` for the others."""
        engine = self.engine
        size = engine.config.input_size

        def decode_all() -> list[np.ndarray | str]:
            out: list[np.ndarray | str] = []
            for e in entries:
                assert e.fields is not None
                try:
                    out.append(decode_entry(e.fields, size, self.max_image_pixels))
                except InvalidInput as exc:
                    out.append(str(exc))
            return out

        decoded = await asyncio.to_thread(decode_all) if entries else []
        good = [(e, d) for e, d in zip(entries, decoded, strict=True) if isinstance(d, np.ndarray)]
        predictions: list[Prediction] = []
        failure: str | None = None
        if good:
            images = uint8_nhwc_to_tensor(np.stack([d for _, d in good]))
            chunks = images.split(engine.config.max_images_per_request)
            try:
                for part in await asyncio.gather(*(engine.predict(c) for c in chunks)):
                    predictions.extend(part)
            except Exception as exc:  # an engine fault answers this batch with errors, it never wedges the group
                log.exception("stream consumer %s: prediction failed", self.options.consumer)
                failure, predictions = f"prediction failed ({type(exc).__name__}: {exc})", []
        answers = dict(zip((e.entry_id for e, _ in good), predictions, strict=False))
        results: dict[str, dict[bytes, bytes]] = {}
        for e, d in zip(entries, decoded, strict=True):
            p = answers.get(e.entry_id)
            error = None if p is not None else failure if isinstance(d, np.ndarray) else str(d)
            results[e.entry_id] = self._result_fields(e, p, error)
        return results

    def _result_fields(self, entry: _Entry, p: Prediction | None, error: str | None) -> dict[bytes, bytes]:
        assert entry.fields is not None
        out: dict[str, str | bytes] = {
            "result_id": result_id(self.options.input_stream, entry.entry_id),
            "entry_id": entry.entry_id,
            "id": _text(entry.fields.get(b"id")) or entry.entry_id,
            "model": self.engine.name,
            "consumer": self.options.consumer,
        }
        if p is not None:  # the one prediction shape, as flat text fields
            out.update({key: _field_text(value) for key, value in prediction_fields(p, self.engine.classes).items()})
        else:
            out["error"] = error or "unknown error"
        if b"meta" in entry.fields:
            out["meta"] = entry.fields[b"meta"]
        return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in out.items()}

    def _commit(self, results: dict[str, dict[bytes, bytes]]) -> list[str]:
        """Write result entries and done records atomically, skipping entries another consumer finished.

        WATCH on the done records makes the check-and-write one step: if a slow consumer and the one
        that claimed its entries race, exactly one of them writes each result.
        """
        if not results:
            return []
        keys = {entry_id: done_key(self.options, entry_id) for entry_id in results}

        def transaction(pipe: redis.client.Pipeline) -> list[str]:
            todo = list(keys)
            if pipe.exists(*keys.values()):  # rare: someone finished some of them; find which
                todo = [entry_id for entry_id, key in keys.items() if not pipe.exists(key)]
            pipe.multi()
            for entry_id in todo:
                pipe.xadd(self.options.output_stream, results[entry_id])  # type: ignore[arg-type]
                pipe.hset(keys[entry_id], mapping=results[entry_id])  # type: ignore[arg-type]
                pipe.expire(keys[entry_id], self.options.result_ttl_s)
            return todo

        written: list[str] = []

        def run() -> None:
            written[:] = self.client.transaction(transaction, *keys.values(), value_from_callable=True)

        self._call(run)
        return written

    def _ack(self, ids: list[str]) -> None:
        self._call(self.client.xack, self.options.input_stream, self.options.group, *ids)


# ---------------------------------------------------------------------------------------- running it
def redis_url(settings: Settings | None = None) -> str:
    """``TTA_REDIS_URL`` (or a ``redis_url`` setting), else the local default."""
    configured = settings.redis_url.get_secret_value() if settings is not None and settings.redis_url else None
    return os.environ.get("TTA_REDIS_URL") or configured or DEFAULT_REDIS_URL


async def run_stream(
    settings: Settings, options: StreamOptions, url: str, model: str | None = None,
    stop: asyncio.Event | None = None,
) -> bool:
    """Load the model as the server does, consume until stopped, then stop the engine."""
    from service.composition import build_registry
    from service.errors import ConfigError

    configs = settings.resolved_models()
    names = [c.name for c in configs]
    if model is None and len(configs) > 1:
        raise ConfigError(f"several models are configured; choose one with --model: {names}")
    chosen = [c for c in configs if model is None or c.name == model]
    if not chosen:
        raise ConfigError(f"unknown model {model!r}; configured models: {names}")
    registry = await asyncio.to_thread(build_registry, settings.model_copy(update={"models": chosen}))
    engine = registry.get(chosen[0].name)
    # the socket timeout must outlast XREADGROUP's BLOCK, or every idle read would look like an outage
    connection = RedisConnection(url, timeout=options.block_ms / 1000 + 1.0, max_backoff=options.retry_max_s)
    await registry.start()
    try:
        return await StreamConsumer(engine, connection, options, settings.max_image_pixels).run(stop)
    finally:
        await registry.stop()
        connection.client.close()


def serve_stream(settings: Settings, options: StreamOptions, url: str, model: str | None = None) -> int:
    """Run the consumer until SIGINT/SIGTERM (finishing and acknowledging the batch in hand); exit status."""

    async def main() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_stream(settings, options, url, model, stop)

    return 0 if asyncio.run(main()) else 1


def _field_text(value: object) -> str:
    """A prediction value as a stream field: numbers as text, booleans as true/false, lists as JSON, None empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)
