"""Load generator: a drifting stream (clean, then corruption after corruption) against live replicas.

    python -m loadtest.drift_load --rate 100 --duration 40 --adaptation on,off --replicas 1,2
    python -m loadtest.drift_load --max-rate --clients 16 --duration 40 --adaptation on,off --replicas 1,2
    python -m loadtest.drift_load --model cifar --rate 20 --batch 8 --json drift.json

Serving with adaptation is only worth it if it holds up under live traffic, so this measures what a
client sees while the input drifts: throughput, p50/p95/p99 latency, error rate and the accuracy of
the answers, per drift segment and overall, with adaptation on (EATA) and off (the frozen source).

Each configuration starts its own servers (``tta-serve serve`` on 127.0.0.1, one torch thread each):
one replica, or two on a private redis-server as leader and follower, with requests alternated (or
randomly assigned) between them. Requests are binary Open Inference Protocol v2 (UINT8 NHWC, the
cheapest encoding to produce), so the client costs less than the server it measures.

* ``--rate R``: open loop. Requests are fired at R per second (Poisson arrivals by default, or a fixed
  interval) whatever the server does; latency counts from the scheduled send time, so a server that
  falls behind shows it in the tail instead of slowing the client down (no coordinated omission).
* ``--max-rate``: closed loop. ``--clients`` concurrent clients each send the next request as soon as
  the previous one is answered.

The stream is the built-in digits model's held-out split (no files needed), or with ``--model cifar``
the shared CIFAR-10 test set and ResNet-20 (``benchmarks.data``). Segment ``s`` of the stream is the
same images corrupted by ``adapters.corruptions.corrupt`` at ``--severity``; a run cycles through
the segments in order for ``--duration`` seconds. Everything is bounded in time and loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from loadtest.processes import RedisServer, Replica, write_config
from service.v2_client import binary_request, parse_response

DEFAULT_SEGMENTS = ("clean", "impulse_noise", "snow", "brightness", "frost", "contrast", "fog")
HEADER_LENGTH = "Inference-Header-Content-Length"


# ------------------------------------------------------------------------------------ the stream
@dataclass
class DriftStream:
    """Labelled images per drift segment; request ``k`` takes ``batch`` images of its segment."""

    segments: tuple[str, ...]
    images: list[np.ndarray]  # per segment, uint8 N x H x W x 3 (the same images, corrupted)
    labels: np.ndarray
    batch: int
    requests_per_segment: int

    def segment_of(self, k: int) -> int:
        return (k // self.requests_per_segment) % len(self.segments)

    def request(self, k: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(segment, images, labels) of request ``k``; deterministic, so a rerun replays the same stream."""
        s = self.segment_of(k)
        n = len(self.labels)
        rows = (k * self.batch + np.arange(self.batch)) % n
        return s, self.images[s][rows], self.labels[rows]


def load_images(model: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Clean labelled images: the digits held-out split, or the end of the shared CIFAR-10 test set
    (its start is what ``fisher_data`` uses, so the stream never repeats the Fisher images)."""
    if model == "digits":
        from adapters.models.digits import digits_split

        _, (x, y) = digits_split()
    else:
        from adapters.datasets import load_npz
        from benchmarks.data import cifar10_test_path

        x, y = load_npz(cifar10_test_path())
        x, y = x[-limit:], y[-limit:]
    return x[:limit], y[:limit]


def build_stream(model: str, segments: tuple[str, ...], severity: int, images_per_segment: int, batch: int,
                 limit: int = 2000, seed: int = 0) -> DriftStream:
    """The drifting stream: the images shuffled once, then corrupted per segment (same seed each time)."""
    from adapters.corruptions import CORRUPTIONS, corrupt

    unknown = [s for s in segments if s != "clean" and s not in CORRUPTIONS]
    if unknown:
        raise SystemExit(f"unknown segments {unknown}; use 'clean' or one of {list(CORRUPTIONS)}")
    x, y = load_images(model, limit)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    images = [x if s == "clean" else corrupt(x, s, severity, seed=seed) for s in segments]
    return DriftStream(segments, images, y, batch, max(1, images_per_segment // batch))


def encode(images: np.ndarray, request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary v2 infer request (UINT8 NHWC in, FP32 probabilities back as binary), with ``id`` set."""
    return binary_request(np.ascontiguousarray(images, dtype=np.uint8), request_id=request_id)


# ------------------------------------------------------------------------------------ servers
def model_fields(model: str, adaptation: str) -> dict[str, Any]:
    """The served model's config: EATA when adapting, the frozen source otherwise."""
    method = "eata" if adaptation == "on" else "source"
    if model == "digits":
        return {"name": "digits", "architecture": "digits", "method": method}
    from benchmarks.data import checkpoint_path, cifar10_test_path

    fields: dict[str, Any] = {"name": "resnet20", "architecture": "resnet20",
                              "weights": str(checkpoint_path("resnet20")), "method": method}
    if method == "eata":
        fields["fisher_data"] = str(cifar10_test_path())
    return fields


@contextlib.contextmanager
def replicas_running(folder: Path, model: dict[str, Any], count: int, threads: int,
                     **settings: Any) -> Iterator[list[Replica]]:
    """``count`` ready replicas of ``model`` (two: leader and follower on a private Redis); stopped after."""
    redis = RedisServer().start() if count > 1 else None
    started: list[Replica] = []
    try:
        roles = ["leader", "follower"][:count] if count > 1 else ["independent"]
        for role in roles:
            fields = {**model, "role": role}
            extra = {"redis_url": redis.url} if redis is not None else {}
            config = write_config(folder / f"{model['name']}-{role}.yaml", [fields], **settings, **extra)
            started.append(Replica(config, env={"TTA_THREADS": str(threads)}, name=role).start())
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()
        if redis is not None:
            redis.kill()


def adaptation_state(base: str, model: str) -> dict[str, Any]:
    """The few counters of ``/v1/models/{name}/adaptation`` worth reporting."""
    try:
        info = httpx.get(f"{base}/v1/models/{model}/adaptation", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}
    replication = info.get("replication") or {}
    return {k: info.get(k) for k in ("steps", "updates", "parameter_version", "images_served", "batches",
                                     "frozen_fallbacks", "samples_selected")} | {
        "is_leader": replication.get("is_leader")}


async def watch_leader(bases: list[str], model: str, timeline: list[dict[str, Any]], every: float = 2.0) -> None:
    """Every ``every`` s: which replica leads and the parameter version each serves (changes only)."""
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            row: list[Any] = []
            for base in bases:
                try:
                    info = (await client.get(f"{base}/v1/models/{model}/adaptation")).json()
                    row.append(((info.get("replication") or {}).get("is_leader"), info.get("parameter_version")))
                except (httpx.HTTPError, ValueError):
                    row.append(None)
            leaders = [i for i, r in enumerate(row) if r and r[0]]
            if not timeline or timeline[-1]["leaders"] != leaders:
                timeline.append({"t": round(time.perf_counter() - start, 1), "leaders": leaders,
                                 "versions": [r[1] if r else None for r in row]})
            await asyncio.sleep(every)


# ------------------------------------------------------------------------------------ the load
@dataclass
class Outcome:
    """One request as the client saw it."""

    segment: int
    images: int
    replica: int
    latency_ms: float | None = None  # answered requests only
    correct: int = 0
    error: str | None = None  # "http 5xx", "timeout", "connect", ... ; None when answered
    lag_ms: float = 0.0  # open loop: how late the client fired it (the client's own overload)
    sent_at: float = 0.0  # perf_counter when it was due


@dataclass
class LoadRun:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0


class Target:
    """The replicas' clients and how requests are spread over them."""

    def __init__(self, bases: list[str], assign: str, connections: int, timeout: float, seed: int = 0) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self.clients = [httpx.AsyncClient(base_url=b, timeout=timeout, limits=limits) for b in bases]
        self.assign = assign
        self.rng = random.Random(seed)

    def pick(self, k: int) -> int:
        n = len(self.clients)
        return k % n if self.assign == "alternate" else self.rng.randrange(n)

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


async def send(target: Target, model: str, stream: DriftStream, k: int, fired: float, lag: float) -> Outcome:
    """Send request ``k`` of the stream and score its answer against the labels."""
    segment, images, labels = stream.request(k)
    replica = target.pick(k)
    outcome = Outcome(segment, len(labels), replica, lag_ms=lag * 1000, sent_at=fired)
    body, headers = encode(images, f"load-{k}")
    try:
        response = await target.clients[replica].post(f"/v2/models/{model}/infer", content=body, headers=headers)
    except httpx.TimeoutException:
        outcome.error = "timeout"
        return outcome
    except httpx.HTTPError as exc:
        outcome.error = type(exc).__name__
        return outcome
    if response.status_code != 200:
        outcome.error = f"http {response.status_code}"
        return outcome
    probs, _ = parse_response(response)
    outcome.latency_ms = (time.perf_counter() - fired) * 1000
    outcome.correct = int((probs.argmax(1) == labels).sum())
    return outcome


async def open_loop(target: Target, model: str, stream: DriftStream, rate: float, seconds: float,
                    poisson: bool, seed: int = 0) -> LoadRun:
    """Fire requests at ``rate``/s for ``seconds`` regardless of answers; latency from the schedule."""
    rng = np.random.default_rng(seed)
    tasks: list[asyncio.Task[Outcome]] = []
    start = time.perf_counter()
    due, k = 0.0, 0
    while due < seconds:
        wait = start + due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        scheduled = start + due
        tasks.append(asyncio.create_task(send(target, model, stream, k, scheduled,
                                              max(0.0, time.perf_counter() - scheduled))))
        k += 1
        due += rng.exponential(1 / rate) if poisson else 1 / rate
    outcomes = await asyncio.gather(*tasks)
    return LoadRun(list(outcomes), time.perf_counter() - start)


async def closed_loop(target: Target, model: str, stream: DriftStream, clients: int, seconds: float) -> LoadRun:
    """``clients`` concurrent clients, each sending its next request when the last one is answered."""
    outcomes: list[Outcome] = []
    counter = iter(range(1 << 62))
    start = time.perf_counter()
    stop_at = start + seconds

    async def client() -> None:
        while time.perf_counter() < stop_at:
            outcomes.append(await send(target, model, stream, next(counter), time.perf_counter(), 0.0))

    await asyncio.gather(*[client() for _ in range(clients)])
    return LoadRun(outcomes, time.perf_counter() - start)


# ------------------------------------------------------------------------------------ the report
def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "max": float(a.max())}


def summarize(run: LoadRun, stream: DriftStream) -> dict[str, Any]:
    """Throughput, latency, errors and the accuracy the clients saw, per segment and overall."""
    answered = [o for o in run.outcomes if o.error is None]
    errors: dict[str, int] = {}
    for o in run.outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    segments = []
    for s, name in enumerate(stream.segments):
        mine = [o for o in answered if o.segment == s]
        images = sum(o.images for o in mine)
        segments.append({"segment": name, "requests": len(mine), "images": images,
                         "accuracy": 100.0 * sum(o.correct for o in mine) / images if images else None})
    images = sum(o.images for o in answered)
    return {
        "seconds": run.seconds,
        "slowest_seconds": slowest_seconds(run),
        "sent": len(run.outcomes),
        "answered": len(answered),
        "errors": errors,
        "error_rate": 1 - len(answered) / max(len(run.outcomes), 1),
        "requests_per_s": len(answered) / run.seconds,
        "images_per_s": images / run.seconds,
        "latency_ms": percentiles([o.latency_ms for o in answered if o.latency_ms is not None]),
        "client_lag_ms_p99": percentiles([o.lag_ms for o in run.outcomes])["p99"],
        "accuracy": 100.0 * sum(o.correct for o in answered) / images if images else None,
        # Mean over the segments seen: comparable across runs that got through different shares of the stream.
        "accuracy_segment_mean": float(np.mean(seen)) if (seen := [s["accuracy"] for s in segments
                                                                    if s["accuracy"] is not None]) else None,
        "segments": segments,
        "per_replica": [{"requests": len(mine), "latency_ms": percentiles([o.latency_ms for o in mine
                                                                             if o.latency_ms is not None])}
                        for r in sorted({o.replica for o in answered})
                        if (mine := [o for o in answered if o.replica == r])],
    }


def slowest_seconds(run: LoadRun, count: int = 3) -> list[dict[str, float]]:
    """The seconds of the run (by send time) with the worst maximum latency: where a tail comes from."""
    if not run.outcomes:
        return []
    start = min(o.sent_at for o in run.outcomes)
    worst: dict[int, float] = {}
    for o in run.outcomes:
        if o.latency_ms is not None:
            second = int(o.sent_at - start)
            worst[second] = max(worst.get(second, 0.0), o.latency_ms)
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:count]
    return [{"second": float(sec), "max_latency_ms": ms} for sec, ms in top]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(console: Console, rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for col in ("adaptation", "replicas", "load", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors",
                "accuracy %", "segment mean %"):
        table.add_column(col, justify="right")
    for r in rows:
        lat = r["latency_ms"]
        table.add_row(r["adaptation"], str(r["replicas"]), r["load"], _fmt(r["requests_per_s"]),
                      _fmt(r["images_per_s"]), _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]),
                      f"{100 * r['error_rate']:.2f}%", _fmt(r["accuracy"]),
                      _fmt(r["accuracy_segment_mean"]))
    console.print(table)
    seg = Table(title="accuracy seen by the clients per drift segment (%)")
    seg.add_column("adaptation / replicas")
    for s in rows[0]["segments"] if rows else []:
        seg.add_column(s["segment"], justify="right")
    for r in rows:
        seg.add_row(f"{r['adaptation']} / {r['replicas']}", *[_fmt(s["accuracy"]) for s in r["segments"]])
    console.print(seg)


# ------------------------------------------------------------------------------------ main
def run_configuration(args: argparse.Namespace, stream: DriftStream, adaptation: str, replicas: int,
                      folder: Path) -> dict[str, Any]:
    """Start the servers for one configuration, warm up on clean images, drive the load, report."""
    model = model_fields(args.model, adaptation)
    settings = {"max_body_bytes": 8 * 1024 * 1024}
    model.update({"max_delay_ms": args.max_delay_ms, "max_batch_size": args.max_batch})
    with replicas_running(folder, model, replicas, args.threads, **settings) as running:
        bases = [r.base for r in running]

        async def drive() -> tuple[LoadRun, list[dict[str, Any]], list[dict[str, Any]]]:
            connections = args.clients if args.max_rate else args.connections
            target = Target(bases, args.assign, connections, args.timeout, args.seed)
            timeline: list[dict[str, Any]] = []
            watcher = None
            try:
                warm = DriftStream(("clean",), stream.images[:1], stream.labels, stream.batch, 1 << 30)
                await closed_loop(target, model["name"], warm, 4, args.warmup)  # not counted
                if len(bases) > 1:
                    watcher = asyncio.create_task(watch_leader(bases, model["name"], timeline))
                if args.max_rate:
                    run = await closed_loop(target, model["name"], stream, args.clients, args.duration)
                else:
                    run = await open_loop(target, model["name"], stream, args.rate, args.duration,
                                          args.arrivals == "poisson", args.seed)
            finally:
                if watcher is not None:
                    watcher.cancel()
                await target.aclose()
            states = [await asyncio.to_thread(adaptation_state, b, model["name"]) for b in bases]
            return run, states, timeline

        run, states, timeline = asyncio.run(drive())
    load = f"{args.clients} clients" if args.max_rate else f"{args.rate:g}/s {args.arrivals}"
    return {"adaptation": adaptation, "replicas": replicas, "load": load, **summarize(run, stream),
            "servers": states, "leader_timeline": timeline}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("digits", "cifar"), default="digits")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, default=100.0, help="open loop: requests per second (default 100)")
    mode.add_argument("--max-rate", action="store_true", help="closed loop: --clients as fast as answered")
    parser.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients with --max-rate")
    parser.add_argument("--connections", type=int, default=256, help="connection pool size with --rate")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of load per configuration")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of clean warm-up, not counted")
    parser.add_argument("--replicas", default="1", help="comma list of 1 and/or 2")
    parser.add_argument("--adaptation", default="on,off", help="comma list of on (EATA) and/or off (source)")
    parser.add_argument("--assign", choices=("alternate", "random"), default="alternate")
    parser.add_argument("--segments", default=",".join(DEFAULT_SEGMENTS))
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--images-per-segment", type=int, default=500, help="stream images before the next drift")
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--limit", type=int, default=2000, help="clean images in the stream (CIFAR)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    console = Console(width=160)
    segments = tuple(s.strip() for s in args.segments.split(",") if s.strip())
    stream = build_stream(args.model, segments, args.severity, args.images_per_segment, args.batch, args.limit,
                          args.seed)
    if args.model == "digits":
        from adapters.models.digits import load_digits_model

        load_digits_model()  # train (or read) the cached model once here, not in two replicas at once
    rows = []
    with tempfile.TemporaryDirectory(prefix="drift-load-") as tmp:
        for replicas in (int(r) for r in args.replicas.split(",")):
            if replicas not in (1, 2):
                raise SystemExit("--replicas takes 1 and/or 2")
            for adaptation in (a.strip() for a in args.adaptation.split(",")):
                if adaptation not in ("on", "off"):
                    raise SystemExit("--adaptation takes on and/or off")
                rows.append(run_configuration(args, stream, adaptation, replicas, Path(tmp)))
                r = rows[-1]
                console.print(f"adaptation {adaptation}, {replicas} replica(s): {r['requests_per_s']:.1f} req/s, "
                              f"p99 {_fmt(r['latency_ms']['p99'])} ms, errors {r['errors']}, "
                              f"accuracy {_fmt(r['accuracy'])}%")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"config": config, "rows": rows}
    print_tables(console, rows, f"drifting {args.model} stream, {args.batch} image(s)/request, {args.duration:g} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
