"""The Redis Streams consumer against a real Redis: answers, bad entries, redelivery after a consumer
dies (before or after writing), Redis going down and coming back, and the ``tta-serve stream`` command.

The shared server (127.0.0.1:6379) is used on db 11 with stream names unique to each test; the
fault test runs its own ``redis-server`` on a free port, which it kills and restarts.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from servers import RedisProcess
from typer.testing import CliRunner

from adapters.models.digits import digits_split
from service.cli import app as cli_app
from service.engine import ModelEngine
from service.model_sources import LoadedModel, load_model
from service.redis_state import RedisConnection
from service.settings import ModelConfig
from service.stream import StreamConsumer, StreamOptions, done_key, result_id

DB = 11
URL = f"redis://127.0.0.1:6379/{DB}"
CONFIG = ModelConfig(name="digits", architecture="digits", method="eata")
PIXELS = 4096 * 4096
T = TypeVar("T")


# ------------------------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cache = os.environ.get("TTA_CACHE_DIR") or str(tmp_path_factory.getbasetemp() / "tta-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTA_CACHE_DIR", cache)  # the digits model trains once per session
        yield cache


@pytest.fixture(scope="module")
def loaded(cache_dir: str) -> LoadedModel:
    return load_model(CONFIG, torch.device("cpu"))  # each engine's adapter copies the module


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    _, (x, y) = digits_split()
    return x, y


@pytest.fixture()
def r() -> redis.Redis:
    client = redis.Redis.from_url(URL)
    client.ping()
    return client


@pytest.fixture()
def streams(r: redis.Redis) -> Iterator[StreamOptions]:
    """Stream names of this test; its streams and done records are deleted afterwards."""
    tag = uuid.uuid4().hex[:8]
    options = StreamOptions(input_stream=f"test-stream:{tag}:in", output_stream=f"test-stream:{tag}:out",
                            group="g", consumer="A", batch=16, block_ms=100, claim_idle_ms=60_000)
    yield options
    r.delete(options.input_stream, options.output_stream)
    for key in r.scan_iter(match=f"tta:stream:{options.input_stream}:*", count=1000):
        r.delete(key)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def add_images(r: redis.Redis, stream: str, x: np.ndarray, start: int = 0) -> list[str]:
    return [r.xadd(stream, {"image": png(img), "id": f"img-{start + i}"}).decode() for i, img in enumerate(x)]


def outputs(r: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(stream)]


def consumer(engine: ModelEngine, url: str, options: StreamOptions, **changes: Any) -> StreamConsumer:
    opts = StreamOptions(**{**options.__dict__, **changes})
    return StreamConsumer(engine, RedisConnection(url, timeout=2.0, max_backoff=0.5), opts, PIXELS)


def with_engine(loaded: LoadedModel, body: Callable[[ModelEngine], Awaitable[T]]) -> T:
    """Run ``body`` with a started engine (its own event loop), then stop the engine."""

    async def main() -> T:
        engine = ModelEngine(CONFIG, loaded, device=torch.device("cpu"))
        await engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def samples_seen(engine: ModelEngine) -> int:
    return (await engine.adaptation_info())["samples_seen"]


# ------------------------------------------------------------------------------------ answers
def test_entries_are_answered_once_acknowledged_and_bad_ones_become_errors(r, streams, loaded, digits):
    x, y = digits
    n = 48
    ids = add_images(r, streams.input_stream, x[:n])
    tensor_ids = [r.xadd(streams.input_stream, {"tensor": x[n + i].tobytes(), "shape": "32,32,3",
                                                 "meta": json.dumps({"camera": i})}).decode() for i in range(8)]
    big = np.asarray(Image.fromarray(x[n + 8]).resize((64, 48)))  # resized to the model's input
    tensor_ids.append(r.xadd(streams.input_stream, {"tensor": big.tobytes(), "shape": "[48, 64, 3]"}).decode())
    bad = [r.xadd(streams.input_stream, {"image": b"not a png", "id": "broken", "meta": "m"}).decode(),
           r.xadd(streams.input_stream, {"tensor": b"\0" * 10, "shape": "32,32,3"}).decode(),
           r.xadd(streams.input_stream, {"nothing": b"here"}).decode()]
    total = n + 9 + len(bad)

    async def body(engine: ModelEngine) -> StreamConsumer:
        c = consumer(engine, URL, streams, max_messages=total)
        assert await c.run()
        return c

    c = with_engine(loaded, body)
    out = outputs(r, streams.output_stream)
    assert len(out) == total and c.counters.acked == total and c.counters.predicted == n + 9
    by_entry = {o["entry_id"]: o for o in out}
    for entry_id in ids + tensor_ids + bad:
        assert by_entry[entry_id]["result_id"] == result_id(streams.input_stream, entry_id)
        assert r.exists(done_key(streams, entry_id))
    answered = [by_entry[i] for i in ids]
    assert [o["id"] for o in answered] == [f"img-{i}" for i in range(n)]
    labels = [int(o["label"]) for o in answered] + [int(by_entry[i]["label"]) for i in tensor_ids]
    accuracy = np.mean(np.array(labels) == y[: n + 9])
    assert accuracy > 0.9, accuracy
    first = answered[0]
    assert first["class_name"] == first["label"] and first["consumer"] == "A" and first["model"] == "digits"
    assert 0 < float(first["confidence"]) <= 1 and float(first["entropy"]) >= 0 and int(first["parameter_version"]) >= 0
    assert first["divergence"] == ""  # eata has no model divergence (EATA-C's is tests/test_divergence.py's)
    top = json.loads(first["top_k"])  # the same prediction shape as /v1, as text fields
    assert top[0]["label"] == int(first["label"]) and len(top) == 3 and len(first["request_id"]) == 32
    assert json.loads(by_entry[tensor_ids[3]]["meta"]) == {"camera": 3}
    assert by_entry[tensor_ids[3]]["id"] == tensor_ids[3]  # no client id: the entry id
    assert "cannot be decoded" in by_entry[bad[0]]["error"] and by_entry[bad[0]]["id"] == "broken"
    assert by_entry[bad[0]]["meta"] == "m" and "label" not in by_entry[bad[0]]
    assert "needs 3072" in by_entry[bad[1]]["error"]
    assert "neither an 'image' nor a 'tensor'" in by_entry[bad[2]]["error"]
    assert r.xpending(streams.input_stream, "g")["pending"] == 0


# ------------------------------------------------------------------------------------ redelivery
class Crash(Exception):
    """A consumer dying at a chosen point."""


class DiesBeforeAck(StreamConsumer):
    def _ack(self, ids: list[str]) -> None:
        raise Crash


def test_redelivery_after_writing_neither_duplicates_results_nor_counts_twice(r, streams, loaded, digits):
    """A writes results and dies before XACK; B claims them: same result ids, no new adaptation."""
    x, _ = digits
    ids = add_images(r, streams.input_stream, x[:32])

    async def body(engine: ModelEngine) -> tuple[int, int, StreamConsumer]:
        a = DiesBeforeAck(engine, RedisConnection(URL, timeout=2.0), streams, PIXELS)
        with pytest.raises(Crash):
            await a.run()
        seen_after_a = await samples_seen(engine)
        assert r.xpending(streams.input_stream, "g")["pending"] == 16
        await asyncio.sleep(0.1)  # A's entries are now idle longer than B's claim threshold
        b = consumer(engine, URL, streams, consumer="B", claim_idle_ms=50, max_messages=32)
        assert await b.run()
        return seen_after_a, await samples_seen(engine), b

    seen_after_a, seen_after_b, b = with_engine(loaded, body)
    out = outputs(r, streams.output_stream)
    assert len(out) == 32  # one result per input entry: the claimed ones were not written again
    assert sorted(o["result_id"] for o in out) == sorted(result_id(streams.input_stream, i) for i in ids)
    assert [o["consumer"] for o in out] == ["A"] * 16 + ["B"] * 16
    assert b.counters.claimed == 16 and b.counters.duplicates == 16 and b.counters.predicted == 16
    assert seen_after_a == 16 and seen_after_b == 32  # the redelivered 16 were not adapted on again
    assert r.xpending(streams.input_stream, "g")["pending"] == 0


def test_redelivery_before_writing_answers_once(r, streams, loaded, digits):
    """A reads and dies before writing; B claims and answers each entry exactly once."""
    x, _ = digits
    ids = add_images(r, streams.input_stream, x[:16])
    r.xgroup_create(streams.input_stream, "g", id="0")
    assert len(r.xreadgroup("g", "A", {streams.input_stream: ">"}, count=16)[0][1]) == 16  # ... and A dies

    async def body(engine: ModelEngine) -> tuple[int, StreamConsumer]:
        await asyncio.sleep(0.1)
        b = consumer(engine, URL, streams, consumer="B", claim_idle_ms=50, max_messages=16)
        assert await b.run()
        # a slow A finishing the same entries now writes nothing: the done records win
        late = consumer(engine, URL, streams, consumer="A")
        assert late._commit({i: {b"result_id": b"late"} for i in ids}) == []
        return await samples_seen(engine), b

    seen, b = with_engine(loaded, body)
    out = outputs(r, streams.output_stream)
    assert [o["entry_id"] for o in out] == ids and {o["consumer"] for o in out} == {"B"}
    assert b.counters.claimed == 16 and b.counters.predicted == 16 and seen == 16
    assert r.xpending(streams.input_stream, "g")["pending"] == 0


# ------------------------------------------------------------------------------------ Redis faults
@pytest.fixture()
def own_redis() -> Iterator[RedisProcess]:
    """A private redis-server without persistence: a restart loses every key, as a crash would."""
    server = RedisProcess()
    server.start()
    yield server
    server.kill()


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_consumer_rides_out_redis_restarts(own_redis, streams, loaded, digits, caplog):
    """Redis dies while idle (group lost: recreated) and with a batch in hand (written once, when back)."""
    x, _ = digits
    caplog.set_level(logging.INFO)
    rr = redis.Redis(port=own_redis.port)

    def length(stream: str = streams.output_stream) -> int:
        try:
            return rr.xlen(stream)
        except redis.ConnectionError:
            return -1

    class DownWithBatchInHand(StreamConsumer):
        """Kills Redis once, after predicting a batch and before writing it; restarts it a bit later."""

        armed = False

        async def _answer(self, entries):
            results = await super()._answer(entries)
            if self.armed and entries:
                type(self).armed = False
                own_redis.kill()
                threading.Timer(0.5, own_redis.start).start()
            return results

    async def body(engine: ModelEngine) -> tuple[int, int, StreamConsumer]:
        stop = asyncio.Event()
        opts = StreamOptions(**{**streams.__dict__, "retry_max_s": 0.3, "block_ms": 200})
        c = DownWithBatchInHand(engine, RedisConnection(own_redis.url, timeout=1.5, max_backoff=0.3), opts, PIXELS)
        task = asyncio.create_task(c.run(stop))
        add_images(rr, streams.input_stream, x[:16])
        await until(lambda: length() == 16)
        own_redis.kill()  # idle consumer: blocked in XREADGROUP
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_redis.start)  # empty: stream and group are gone
        DownWithBatchInHand.armed = True
        add_images(rr, streams.input_stream, x[16:32], start=16)
        await until(lambda: length() == 16)
        seen = await samples_seen(engine)
        await asyncio.sleep(0.3)
        assert length() == 16  # written once
        stop.set()
        assert await asyncio.wait_for(task, 10)
        return seen, await samples_seen(engine), c

    seen, seen_at_stop, c = with_engine(loaded, body)
    assert seen == seen_at_stop == 32  # the batch in hand was written, not predicted (adapted on) again
    assert c.counters.acked == 32 and c.counters.predicted == 32
    out = outputs(rr, streams.output_stream)
    assert [o["id"] for o in out] == [f"img-{i}" for i in range(16, 32)]
    messages = caplog.text
    assert "is down" in messages and "is back" in messages and "redis unavailable" in messages
    assert "recreating it" in messages


# ------------------------------------------------------------------------------------ the command
def test_stream_command_refuses_unknown_model(cache_dir):
    result = CliRunner().invoke(cli_app, ["stream", "--input-stream", "a", "--output-stream", "b",
                                          "--model", "nope", "--redis-url", URL])
    assert result.exit_code == 2
    assert "unknown model 'nope'" in result.output


def test_stream_command_answers_and_stops_cleanly_on_sigterm(r, streams, digits, cache_dir, tmp_path):
    x, y = digits
    add_images(r, streams.input_stream, x[:24])
    config = tmp_path / "models.yaml"  # tent: no Fisher estimate, so the process starts faster
    config.write_text("models:\n  - {name: cam, architecture: digits, method: tent}\n")
    cmd = [sys.executable, "-m", "service.cli", "stream", "--input-stream", streams.input_stream,
           "--output-stream", streams.output_stream, "--group", "cli", "--consumer", "cli-1",
           "--redis-url", URL, "--config", str(config), "--model", "cam", "--batch", "8", "--block-ms", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TTA_CACHE_DIR": cache_dir, "TTA_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while r.xlen(streams.output_stream) < 24 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log
    out = outputs(r, streams.output_stream)
    assert len(out) == 24, log
    assert np.mean([int(o["label"]) == int(t) for o, t in zip(out, y, strict=False)]) > 0.9
    assert {o["model"] for o in out} == {"cam"} and {o["consumer"] for o in out} == {"cli-1"}
    assert r.xpending(streams.input_stream, "cli")["pending"] == 0
    assert "24 acked in all" in log and "created consumer group cli" in log
