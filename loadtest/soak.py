"""Bounded soak with faults: keep serving through crashes and bad input, and lose no accepted request.

    python -m loadtest.soak                      # 2 minutes with faults, then a 2-minute fault-free baseline
    python -m loadtest.soak --minutes 0.5 --no-baseline --leader-kills 1 --json soak.json

Two ``tta-serve serve`` replicas of the built-in digits model (EATA, sync mode), a leader and a
follower sharing a private redis-server, take a steady open-loop stream of labelled good requests
(a drifting digits stream, as in ``loadtest.drift_load``) plus a trickle of bad requests, while
faults are injected on a schedule:

* Redis is killed (SIGKILL, no persistence) and restarted empty;
* the replica holding the leader lease is killed (SIGKILL) and restarted, ``--leader-kills`` times,
  one replica down at a time.

Every good request carries a unique id in the v2 ``id`` field. The client sends it to one replica;
when the connection is refused (the replica is down: *not accepted*), cut off (the replica died with
it in flight) or answered 503, it retries on the other replica. The report counts every attempt and
then checks the promise: each good request is answered exactly once, with its own id echoed and one
row of probabilities per image, no per-image server request id appears twice, and none is lost
(accepted but never answered) or failed (answered 4xx/5xx). Bad requests (malformed JSON, oversized
body, NaN, wrong shape, wrong byte count, traversal-style model name) must all get a 4xx.

The good stream is then replayed at the same rate on fresh replicas without faults or bad requests
(the baseline): the accuracy the good requests saw with faults should match it. Exit status 1 when
any check fails. Loopback only; everything is bounded by ``--minutes`` plus start-up and drain time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console

from adapters.models.digits import load_digits_model
from loadtest.drift_load import DEFAULT_SEGMENTS, HEADER_LENGTH, DriftStream, build_stream, encode, percentiles
from loadtest.processes import RedisServer, Replica, write_config
from service.v2_client import parse_response

MODEL = "digits"
MAX_BODY_BYTES = 256 * 1024  # small, so an oversized request is cheap to send
REFUSED = (httpx.ConnectError, httpx.ConnectTimeout)
CUT_OFF = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


# ------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Attempt:
    replica: int
    at: float  # seconds since the phase started
    result: str  # "answered", "refused", "cut_off", "unavailable", "timeout", "http NNN"


@dataclass
class GoodRequest:
    """One good request and every attempt to get it answered."""

    id: str
    k: int
    segment: int
    images: int
    attempts: list[Attempt] = field(default_factory=list)
    answers: int = 0  # 200s carrying this id
    correct: int = 0
    latency_ms: float | None = None  # from the first attempt to the answer, retries included
    failed: str | None = None  # a 4xx/5xx answer (never expected)


@dataclass
class BadRequest:
    kind: str
    status: int | None = None
    json_error: bool = False  # the body was {"error": "..."}
    refused: int = 0  # attempts to a replica that was down (retried on the other)


@dataclass
class Phase:
    """What one run (with or without faults) produced."""

    name: str
    good: list[GoodRequest] = field(default_factory=list)
    bad: list[BadRequest] = field(default_factory=list)
    misdelivered: int = 0  # answers whose echoed id was not the id sent
    server_ids: dict[str, int] = field(default_factory=dict)  # per-image request id -> times seen
    faults: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    start: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return time.monotonic() - self.start


# ------------------------------------------------------------------------------------ the replicas
@contextlib.contextmanager
def cluster(folder: Path, tag: str, threads: int) -> Iterator[tuple[RedisServer, list[Replica]]]:
    """A private Redis and two ready replicas (leader, follower); everything killed afterwards."""
    redis = RedisServer().start()
    replicas: list[Replica] = []
    try:
        for role in ("leader", "follower"):
            model = {"name": MODEL, "architecture": "digits", "method": "eata", "mode": "sync", "role": role}
            config = write_config(folder / f"{tag}-{role}.yaml", [model], redis_url=redis.url,
                                  lease_ttl_ms=1500, sync_interval_ms=200, max_body_bytes=MAX_BODY_BYTES)
            replicas.append(Replica(config, env={"TTA_THREADS": str(threads)}, name=role).start())
        for r in replicas:
            r.wait_ready()
        yield redis, replicas
    finally:
        for r in replicas:
            r.kill()
        redis.kill()


def leader_index(bases: list[str]) -> int | None:
    """Which replica holds the leader lease now (None when neither says so)."""
    for i, base in enumerate(bases):
        with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
            info = httpx.get(f"{base}/v1/models/{MODEL}/adaptation", timeout=5).json()
            if (info.get("replication") or {}).get("is_leader"):
                return i
    return None


# ------------------------------------------------------------------------------------ good requests
class Traffic:
    """The clients of both replicas and the phase's records."""

    def __init__(self, bases: list[str], phase: Phase, timeout: float, retry_s: float) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        to = httpx.Timeout(timeout, connect=2.0)
        self.clients = [httpx.AsyncClient(base_url=b, timeout=to, limits=limits) for b in bases]
        self.phase = phase
        self.retry_s = retry_s

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()

    async def good(self, stream: DriftStream, k: int) -> None:
        """Send good request ``k`` until one replica answers it (or the retry window closes)."""
        segment, images, labels = stream.request(k)
        req = GoodRequest(f"{self.phase.name}-{k:07d}", k, segment, len(labels))
        self.phase.good.append(req)
        body, headers = encode(images, req.id)
        replica = k % 2
        first = time.perf_counter()
        deadline = first + self.retry_s
        pause = 0.05
        while time.perf_counter() < deadline:
            at = self.phase.now()
            try:
                response = await self.clients[replica].post(f"/v2/models/{MODEL}/infer", content=body,
                                                            headers=headers)
            except REFUSED:
                result = "refused"
            except CUT_OFF:
                result = "cut_off"
            except httpx.TimeoutException:
                result = "timeout"
            else:
                if response.status_code == 200:
                    req.attempts.append(Attempt(replica, at, "answered"))
                    self._answer(req, response, labels)
                    req.latency_ms = (time.perf_counter() - first) * 1000
                    return
                result = "unavailable" if response.status_code == 503 else f"http {response.status_code}"
                if result != "unavailable":
                    req.attempts.append(Attempt(replica, at, result))
                    req.failed = result
                    return
            req.attempts.append(Attempt(replica, at, result))
            replica = 1 - replica  # the other replica takes it
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _answer(self, req: GoodRequest, response: httpx.Response, labels: np.ndarray) -> None:
        probs, meta = parse_response(response)
        if meta.get("id") != req.id or probs.shape[0] != req.images:
            self.phase.misdelivered += 1
            return
        req.answers += 1
        req.correct = int((probs.argmax(1) == labels).sum())
        for rid in (meta.get("parameters") or {}).get("request_ids", "").split(","):
            self.phase.server_ids[rid] = self.phase.server_ids.get(rid, 0) + 1

    # -------------------------------------------------------------------------------- bad requests
    async def bad(self, kind: str, k: int) -> None:
        """Send one bad request; it must be refused with a 4xx and a JSON error, never crash a replica."""
        record = BadRequest(kind)
        self.phase.bad.append(record)
        path, body, headers = bad_request(kind, f"{self.phase.name}-bad-{k}")
        replica = k % 2
        for _ in range(20):
            try:
                response = await self.clients[replica].post(path, content=body, headers=headers)
            except (*REFUSED, *CUT_OFF):
                record.refused += 1
                replica = 1 - replica
                await asyncio.sleep(0.1)
                continue
            except httpx.TimeoutException:
                record.status = None
                return
            record.status = response.status_code
            with contextlib.suppress(ValueError):
                record.json_error = isinstance(response.json().get("error"), str)
            return


def bad_request(kind: str, request_id: str) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of a bad request of ``kind`` (see ``BAD_KINDS``)."""
    infer = f"/v2/models/{MODEL}/infer"
    if kind == "malformed_json":
        truncated = b'{"id": "' + request_id.encode() + b'", "inputs": [{"name": '
        return infer, truncated, {"Content-Type": "application/json"}
    if kind == "oversized":
        return infer, b"\0" * (MAX_BODY_BYTES + 4096), {"Content-Type": "application/octet-stream"}
    if kind == "nan":
        x = np.full((2, 3, 32, 32), np.nan, dtype=np.float32)
        raw = x.tobytes()
        head = json.dumps({"id": request_id, "inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                                          "parameters": {"binary_data_size": len(raw)}}]}).encode()
        return infer, head + raw, {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}
    if kind == "wrong_shape":
        body, headers = encode(np.zeros((2, 16, 16, 3), np.uint8), request_id)
        return infer, body, headers
    if kind == "wrong_length":
        body, headers = encode(np.zeros((2, 32, 32, 3), np.uint8), request_id)
        return infer, body[:-7], headers  # binary_data_size no longer matches
    if kind == "traversal_name":
        body, headers = encode(np.zeros((1, 32, 32, 3), np.uint8), request_id)
        return "/v2/models/..%2F..%2Fetc%2Fpasswd/infer", body, headers
    raise ValueError(kind)


BAD_KINDS = ("malformed_json", "oversized", "nan", "wrong_shape", "wrong_length", "traversal_name")


async def paced(rate: float, seconds: float, launch: Callable[[int], Any]) -> list[asyncio.Task[Any]]:
    """Start ``launch(k)`` at a fixed ``rate`` for ``seconds`` (open loop: never waits for answers)."""
    tasks = []
    start = time.perf_counter()
    k = 0
    while k / rate < seconds:
        wait = start + k / rate - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(launch(k)))
        k += 1
    return tasks


# ------------------------------------------------------------------------------------ faults
async def inject_faults(phase: Phase, redis: RedisServer, replicas: list[Replica], seconds: float,
                        leader_kills: int, down_s: float) -> None:
    """Redis killed and restarted, then the leader killed and restarted ``leader_kills`` times.

    One thing is down at a time: each fault waits for the previous restart to be ready. A fault
    that cannot start before the load ends is recorded as skipped.
    """
    bases = [r.base for r in replicas]

    async def at(fraction: float) -> bool:
        wait = fraction * seconds - phase.now()
        if wait > 0:
            await asyncio.sleep(wait)
        return phase.now() < seconds - down_s

    def log(event: str, **detail: Any) -> None:
        phase.faults.append({"t": round(phase.now(), 2), "event": event, **detail})

    schedule = [0.45 + 0.45 * i / max(leader_kills, 1) for i in range(leader_kills)]
    if await at(0.12):
        await asyncio.to_thread(redis.kill)
        log("redis killed")
        await asyncio.sleep(down_s)
        await asyncio.to_thread(redis.start)
        log("redis restarted (empty)")
    else:
        log("redis kill skipped (no time left)")
    for i, fraction in enumerate(schedule):
        if not await at(fraction):
            log(f"leader kill {i + 1} skipped (no time left)")
            continue
        index = await asyncio.to_thread(leader_index, bases)
        victim = replicas[index if index is not None else 0]
        await asyncio.to_thread(victim.kill)
        log("replica killed (SIGKILL)", replica=victim.name, held_lease=index is not None)
        await asyncio.sleep(down_s)
        victim.start()
        log("replica restarting", replica=victim.name)
        took = await asyncio.to_thread(victim.wait_ready)
        log("replica ready", replica=victim.name, start_s=round(took, 1))


async def monitor(phase: Phase, bases: list[str], until: float) -> None:
    """Once a second: which replica leads, its parameter version and whether Redis is up (for the report)."""
    async with httpx.AsyncClient(timeout=2) as client:
        while phase.now() < until:
            row: dict[str, Any] = {"t": round(phase.now(), 1)}
            for i, base in enumerate(bases):
                try:
                    info = (await client.get(f"{base}/v1/models/{MODEL}/adaptation")).json()
                    rep = info.get("replication") or {}
                    row[f"r{i}"] = {"leader": rep.get("is_leader"), "version": info.get("parameter_version"),
                                    "store_up": rep.get("store_up")}
                except (httpx.HTTPError, ValueError):
                    row[f"r{i}"] = "down"
            phase.timeline.append(row)
            await asyncio.sleep(1.0)


# ------------------------------------------------------------------------------------ one phase
def run_phase(name: str, args: argparse.Namespace, stream: DriftStream, folder: Path, faults: bool) -> Phase:
    """Start a fresh cluster, drive the good (and, with faults, bad) traffic, inject faults, drain."""
    seconds = args.minutes * 60
    with cluster(folder, name, args.threads) as (redis, replicas):
        phase = Phase(name)

        async def drive() -> None:
            traffic = Traffic([r.base for r in replicas], phase, args.timeout, args.retry_s)
            phase.start = time.monotonic()
            try:
                jobs = [asyncio.create_task(paced(args.rate, seconds, lambda k: traffic.good(stream, k))),
                        asyncio.create_task(monitor(phase, [r.base for r in replicas], seconds + 5))]
                if faults:
                    jobs.append(asyncio.create_task(paced(args.bad_rate, seconds,
                                                          lambda k: traffic.bad(BAD_KINDS[k % len(BAD_KINDS)], k))))
                    jobs.append(asyncio.create_task(inject_faults(phase, redis, replicas, seconds,
                                                                  args.leader_kills, args.down_s)))
                launched = await asyncio.gather(*jobs)
                sent = [t for group in launched if isinstance(group, list) for t in group]
                await asyncio.gather(*sent)  # every request ends: answered, failed or out of retries
            finally:
                await traffic.aclose()
            phase.seconds = phase.now()

        asyncio.run(drive())
    return phase


# ------------------------------------------------------------------------------------ the report
def good_summary(phase: Phase, stream: DriftStream) -> dict[str, Any]:
    """Counts, the exactly-once checks and the accuracy the good requests saw."""
    good = sorted(phase.good, key=lambda r: r.k)
    answered = [r for r in good if r.answers == 1 and r.failed is None]
    attempts: dict[str, int] = {}
    for r in good:
        for a in r.attempts:
            attempts[a.result] = attempts.get(a.result, 0) + 1
    kill_windows = _down_windows(phase.faults)
    cut_outside = sum(1 for r in good for a in r.attempts if a.result == "cut_off"
                      and not any(lo <= a.at <= hi for lo, hi in kill_windows))
    images = sum(r.images for r in answered)
    segments = []
    for s, seg in enumerate(stream.segments):
        mine = [r for r in answered if r.segment == s]
        n = sum(r.images for r in mine)
        segments.append({"segment": seg, "requests": len(mine),
                         "accuracy": 100.0 * sum(r.correct for r in mine) / n if n else None})
    return {
        "sent": len(good),
        "answered": len(answered),
        "failed": sum(1 for r in good if r.failed is not None),
        "lost": sum(1 for r in good if r.answers == 0 and r.failed is None),
        "duplicates": sum(1 for r in good if r.answers > 1) + sum(n - 1 for n in phase.server_ids.values() if n > 1),
        "misdelivered": phase.misdelivered,
        "retried": sum(1 for r in good if len(r.attempts) > 1),
        "attempts": attempts,
        "cut_off_outside_kills": cut_outside,
        "accuracy": 100.0 * sum(r.correct for r in answered) / images if images else None,
        "segments": segments,
        "latency_ms": percentiles([r.latency_ms for r in answered if r.latency_ms is not None]),
        "requests_per_s": len(answered) / max(phase.seconds, 1e-9),
    }


def _down_windows(faults: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(kill, ready + 2 s) for each replica kill: where a cut-off connection is the kill's doing."""
    windows, start = [], None
    for f in faults:
        if f["event"].startswith("replica killed"):
            start = f["t"] - 1.0
        elif f["event"] == "replica ready" and start is not None:
            windows.append((start, f["t"] + 2.0))
            start = None
    if start is not None:
        windows.append((start, math.inf))
    return windows


def bad_summary(phase: Phase) -> dict[str, Any]:
    kinds: dict[str, dict[str, Any]] = {}
    for b in phase.bad:
        entry = kinds.setdefault(b.kind, {"sent": 0, "statuses": {}})
        entry["sent"] += 1
        key = str(b.status)
        entry["statuses"][key] = entry["statuses"].get(key, 0) + 1
    return {
        "sent": len(phase.bad),
        "not_4xx": sum(1 for b in phase.bad if b.status is None or not 400 <= b.status < 500),
        "without_json_error": sum(1 for b in phase.bad if not b.json_error),
        "refused_attempts": sum(b.refused for b in phase.bad),
        "kinds": kinds,
    }


def verdict(faulted: dict[str, Any], bad: dict[str, Any], baseline: dict[str, Any] | None,
            tolerance: float) -> dict[str, Any]:
    checks = {
        "all_good_answered_once": faulted["answered"] == faulted["sent"],
        "none_lost": faulted["lost"] == 0,
        "none_failed": faulted["failed"] == 0,
        "no_duplicates": faulted["duplicates"] == 0 and faulted["misdelivered"] == 0,
        "no_cut_off_outside_kills": faulted["cut_off_outside_kills"] == 0,
        "all_bad_4xx": bad["not_4xx"] == 0 and bad["without_json_error"] == 0,
    }
    out: dict[str, Any] = {"checks": checks}
    if baseline is not None and faulted["accuracy"] is not None and baseline["accuracy"] is not None:
        delta = faulted["accuracy"] - baseline["accuracy"]
        out["accuracy_delta"] = delta
        checks["accuracy_as_baseline"] = abs(delta) <= tolerance
    out["ok"] = all(checks.values())
    return out


def print_report(console: Console, report: dict[str, Any]) -> None:
    f, b, v = report["faulted"]["good"], report["faulted"]["bad"], report["verdict"]
    console.print(f"good requests: sent {f['sent']}, answered {f['answered']}, failed {f['failed']}, "
                  f"lost {f['lost']}, duplicates {f['duplicates']}, misdelivered {f['misdelivered']}, "
                  f"retried {f['retried']}; attempts {f['attempts']}")
    console.print(f"bad requests: sent {b['sent']}, not 4xx {b['not_4xx']}, "
                  f"statuses {({k: e['statuses'] for k, e in b['kinds'].items()})}")
    for event in report["faulted"]["faults"]:
        console.print(f"  t={event['t']:6.1f}s  {event['event']}  "
                      f"{ {k: x for k, x in event.items() if k not in ('t', 'event')} or ''}")
    acc = f"accuracy with faults {f['accuracy']:.1f}%" if f["accuracy"] is not None else "no answers"
    if report.get("baseline"):
        base = report["baseline"]["good"]
        acc += f", fault-free baseline {base['accuracy']:.1f}% (delta {v.get('accuracy_delta', 0):+.2f})"
    console.print(acc)
    console.print(f"checks: {v['checks']} -> {'OK' if v['ok'] else 'FAILED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="load per phase (the baseline runs as long)")
    parser.add_argument("--rate", type=float, default=20.0, help="good requests per second")
    parser.add_argument("--batch", type=int, default=8, help="images per good request")
    parser.add_argument("--bad-rate", type=float, default=2.0, help="bad requests per second (faulted phase)")
    parser.add_argument("--segment-s", type=float, default=10.0, help="seconds of stream per drift segment")
    parser.add_argument("--segments", default=",".join(DEFAULT_SEGMENTS))
    parser.add_argument("--leader-kills", type=int, default=2, help="times the leader replica is SIGKILLed")
    parser.add_argument("--down-s", type=float, default=4.0, help="seconds a killed process stays down")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also replay the good stream without faults and compare accuracy")
    parser.add_argument("--tolerance", type=float, default=3.0, help="accuracy points allowed off the baseline")
    parser.add_argument("--retry-s", type=float, default=60.0, help="how long a good request is retried")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-attempt read timeout, seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    console = Console(width=160)
    segments = tuple(s.strip() for s in args.segments.split(",") if s.strip())
    stream = build_stream("digits", segments, 5, int(args.segment_s * args.rate) * args.batch, args.batch,
                          seed=args.seed)
    load_digits_model()  # train (or read) the cached model once here, not in two replicas at the same time
    report: dict[str, Any] = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        faulted = run_phase("faulted", args, stream, Path(tmp), faults=True)
        report["faulted"] = {"seconds": faulted.seconds, "good": good_summary(faulted, stream),
                             "bad": bad_summary(faulted), "faults": faulted.faults, "timeline": faulted.timeline}
        if args.baseline:
            base = run_phase("baseline", args, stream, Path(tmp), faults=False)
            report["baseline"] = {"seconds": base.seconds, "good": good_summary(base, stream)}
    base_good = report["baseline"]["good"] if args.baseline else None
    report["verdict"] = verdict(report["faulted"]["good"], report["faulted"]["bad"], base_good, args.tolerance)
    print_report(console, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["verdict"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
