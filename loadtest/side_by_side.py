"""tta-serve and TorchServe side by side, driven by the same independent client (wrk), in one table.

    python -m loadtest.side_by_side [--clients 1,8,32] [--duration 10] [--servers ts-1x2,ts-2x1,off,sync,async]

Every server serves the project's CIFAR ResNet-20 with the same weights, batches up to 64 images and
gets one CIFAR-10 test image per request from N closed-loop ``wrk`` connections: tta-serve the binary
v2 UINT8 request of :func:`service.v2_client.binary_request`, TorchServe the same pixels as raw bytes
to ``/predictions/resnet20`` (loadtest/torchserve_handler.py). Reported per server: images/s at each
client count, its ratio to a plain PyTorch forward pass (batch 32, in a fresh process, measured before
and after all servers, the mean of both), wrk's p50/p99 at the largest count and, as a cross-check,
the project's own raw client at that count. TorchServe is installed on first use into a cached venv
(loadtest/torchserve.py), never into the project. Loopback only; every process started is stopped,
also on Ctrl-C or SIGTERM. Results go to a table and, with ``--json``, a file.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.data import DataNotGiven, checkpoint_path, cifar10_test_path
from loadtest import torchserve
from loadtest.processes import ProcessError, Replica
from loadtest.server_throughput import (
    cifar_uint8_images,
    drive,
    plain_in_fresh_process,
    raw_post_requests,
    run_loop,
    v2_bodies,
    wait_workers,
    write_config,
)
from loadtest.wrk import WrkError, run_wrk, write_bodies, wrk_binary

TS = f"TorchServe {torchserve.TORCHSERVE_VERSION.rsplit('.', 1)[0]}"
SERVERS: dict[str, tuple[str, torchserve.TorchServeConfig | str]] = {
    "ts-1x2": (f"{TS}, 1 worker x 2 threads, batch 64, 5 ms delay, raw uint8", torchserve.TorchServeConfig(1, 2)),
    "ts-2x1": (f"{TS}, 2 workers x 1 thread, batch 64, 5 ms delay, raw uint8", torchserve.TorchServeConfig(2, 1)),
    "off": ("tta-serve, adaptation off (binary v2 uint8)", "off"),
    "sync": ("tta-serve, EATA sync (binary v2 uint8)", "sync"),
    "sync-eff": ("tta-serve, EATA sync, efficiency: efficient", "sync-efficient"),
    "async": ("tta-serve, EATA async (binary v2 uint8)", "async"),
    "async-25": ("tta-serve, EATA async, adapt_traffic_share 0.25", "async-25"),
    "off-2w": ("tta-serve, adaptation off, 2 worker processes (--workers 2)", "off:2"),
    "sync-2w": ("tta-serve, EATA sync, 2 worker processes (worker 0 adapts)", "sync:2"),
}
WARMUP_S = 2.0


@dataclass
class Target:
    """A running server as the clients see it: where to POST, and the bodies wrk and the own client send."""

    port: int
    path: str
    bodies_file: Path
    body_size: int
    headers: dict[str, str]
    own_requests: list[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def tta_serve(kind: str, folder: Path, weights: Path, data: Path, images: np.ndarray) -> Iterator[Target]:
    """``tta-serve serve`` in ``kind`` = ``mode`` or ``mode:workers`` (server_throughput's configs: batch 64, the
    server's own threads and delay; with workers, each worker takes its share of the cores)."""
    mode, _, workers = kind.partition(":")
    config = write_config(folder, mode, weights, 64, None, data)
    env = {"TTA_WORKERS": workers or "1"}  # the single-process rows stay single-process
    replica = Replica(config, name=kind.replace(":", "-"), threads=None, env=env).start()
    try:
        replica.wait_ready()
        if workers:
            wait_workers(replica.base, int(workers))
        bodies, headers = v2_bodies(images)
        path = "/v2/models/resnet20/infer"
        bodies_file = folder / f"{replica.name}.bodies"
        size = write_bodies(bodies_file, bodies)
        yield Target(replica.port, path, bodies_file, size, headers,
                     raw_post_requests(path, bodies, headers))
    finally:
        replica.stop()


@contextmanager
def torchserve_server(name: str, config: torchserve.TorchServeConfig, bindir: Path, folder: Path, weights: Path,
                      images: np.ndarray) -> Iterator[Target]:
    """TorchServe with ``config``; requests are the raw uint8 HWC pixels."""
    server = torchserve.TorchServe(bindir, folder / name, config, weights).start()
    try:
        bodies = [image.tobytes() for image in images]
        server.wait_ready(bodies[0])
        headers = {"Content-Type": "application/octet-stream"}
        size = write_bodies(folder / f"{name}.bodies", bodies)
        yield Target(server.port, server.path, folder / f"{name}.bodies", size, headers,
                     raw_post_requests(server.path, bodies, headers))
    finally:
        server.stop()


def measure(target: Target, clients: list[int], seconds: float, own_client: bool, log: Console) -> dict[str, Any]:
    """wrk at each client count (after a short warm-up), then the own raw client at the largest."""
    run_wrk(target.url, target.path, target.bodies_file, target.body_size, target.headers, 8, WARMUP_S)
    result: dict[str, Any] = {"wrk": {}}
    for n in clients:
        r = run_wrk(target.url, target.path, target.bodies_file, target.body_size, target.headers, n, seconds)
        result["wrk"][n] = r
        log.print(f"  wrk, {n:>3} clients: {r['images_per_second']:7.0f} img/s, p50 {r['p50_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms, {r['errors']} errors")
    if own_client:
        r = run_loop(drive(target.port, clients[-1], seconds, target.own_requests))
        result["own"] = r
        log.print(f"  own client, {clients[-1]:>3} clients: {r['images_per_second']:7.0f} img/s, "
                  f"p50 {r['p50_ms']:.1f} ms, {r['errors']} errors")
    return result


def results_table(rows: list[dict[str, Any]], clients: list[int], plain: float, own_client: bool) -> Table:
    top = clients[-1]
    table = Table(title=f"ResNet-20 CIFAR, one image per request, closed-loop wrk clients; x plain: images/s at {top} "
                  f"/ a plain forward pass (batch 32, fresh process) of {plain:.0f} img/s")
    table.add_column("server")
    for n in clients:
        table.add_column(f"{n} client{'s' if n > 1 else ''}", justify="right")
    for col in (f"x plain at {top}", f"p50 at {top}", f"p99 at {top}", *((f"own client at {top}",) if own_client
                                                                         else ()), "errors"):
        table.add_column(col, justify="right")
    for row in rows:
        wrk = row["wrk"]
        cells = [row["label"], *(f"{wrk[n]['images_per_second']:.0f}" for n in clients),
                 f"{row['ratio_to_plain']:.2f}", f"{wrk[top]['p50_ms']:.0f} ms", f"{wrk[top]['p99_ms']:.0f} ms"]
        if own_client:
            cells.append(f"{row['own']['images_per_second']:.0f}")
        cells.append(str(sum(r["errors"] for r in wrk.values()) + (row["own"]["errors"] if own_client else 0)))
        table.add_row(*cells)
    return table


def markdown_table(rows: list[dict[str, Any]], clients: list[int]) -> str:
    """The issue's format: images/s per client count, the ratio to plain and p50 at the largest count."""
    top = clients[-1]
    head = ["server", *(f"{n} client{'s' if n > 1 else ''}" for n in clients), f"x plain at {top}", f"p50 at {top}"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        wrk = row["wrk"]
        cells = [row["label"], *(f"{wrk[n]['images_per_second']:.0f}" for n in clients),
                 f"{row['ratio_to_plain']:.2f}", f"{wrk[top]['p50_ms']:.0f} ms"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops the servers this process started."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="ResNet-20 checkpoint (default: $TTA_MODELS_DIR or $TTA_SHARED)")
    parser.add_argument("--data", type=Path, help="CIFAR-10 npz: the images sent, and the EATA modes' Fisher data "
                        "(default: $TTA_CIFAR10 or $TTA_SHARED)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent connections, comma-separated (ascending)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (wrk rounds to whole s)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"any of {', '.join(SERVERS)}")
    parser.add_argument("--plain-seconds", type=float, default=5.0, help="seconds of each plain forward-pass run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain forward pass")
    parser.add_argument("--no-own-client", action="store_true", help="skip the project's raw client column")
    parser.add_argument("--cache-dir", type=Path, default=torchserve.default_cache_dir(),
                        help="where the TorchServe venv is kept between runs (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown or not args.servers:
        parser.error(f"unknown --servers {unknown}; choose from {', '.join(SERVERS)}")
    if args.duration < 1 or min(args.clients) < 1:
        parser.error("--duration must be at least 1 s and every client count at least 1")
    try:
        args.weights = checkpoint_path("resnet20", args.weights)
        args.data = cifar10_test_path(args.data, "--data")
    except DataNotGiven as exc:
        parser.error(str(exc))
    return args


def run(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    """Every selected server in turn, between two plain forward-pass references; rows for the table."""
    wrk_binary()  # every missing tool is reported before anything starts
    uses_torchserve = any(isinstance(SERVERS[s][1], torchserve.TorchServeConfig) for s in args.servers)
    bindir = None
    if uses_torchserve:
        torchserve.require_java()
        bindir = torchserve.ensure_venv(args.cache_dir, log=console.print)
    per_server = 25 + WARMUP_S + len(args.clients) * (args.duration + 1) + (0 if args.no_own_client else args.duration)
    console.print(f"about {(len(args.servers) * per_server + 2 * (args.plain_seconds + 5)) / 60:.1f} minutes "
                  f"for {len(args.servers)} servers x {len(args.clients)} client counts x {args.duration:.0f} s")
    images = cifar_uint8_images(args.data)
    own = not args.no_own_client
    plain_before = plain_in_fresh_process(args.weights, args.plain_seconds, args.threads, False)
    console.print(f"plain forward pass before: {plain_before:.0f} img/s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tta-side-by-side-") as tmp:
        for name in args.servers:
            label, kind = SERVERS[name]
            console.print(f"[bold]{label}[/bold]")
            started = time.monotonic()
            if isinstance(kind, torchserve.TorchServeConfig):
                assert bindir is not None
                server = torchserve_server(name, kind, bindir, Path(tmp), args.weights, images)
            else:
                server = tta_serve(kind, Path(tmp), args.weights, args.data, images)
            with server as target:
                console.print(f"  ready after {time.monotonic() - started:.0f} s")
                rows.append({"server": name, "label": label, **measure(target, args.clients, args.duration, own,
                                                                       console)})
    plain_after = plain_in_fresh_process(args.weights, args.plain_seconds, args.threads, False)
    console.print(f"plain forward pass after: {plain_after:.0f} img/s")
    plain = (plain_before + plain_after) / 2
    for row in rows:
        row.update(plain_before=plain_before, plain_after=plain_after,
                   ratio_to_plain=row["wrk"][args.clients[-1]]["images_per_second"] / plain)
    return rows


def main(argv: list[str] | None = None) -> int:
    _terminate_on_sigterm()
    args = parse_args(argv)
    console = Console(width=200)
    try:
        rows = run(args, console)
    except (ProcessError, WrkError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: every server started was stopped")
        return 130
    plain = rows[0]["plain_before"] / 2 + rows[0]["plain_after"] / 2
    console.print(results_table(rows, args.clients, plain, not args.no_own_client))
    console.print(markdown_table(rows, args.clients), markup=False, highlight=False)
    if args.json:
        args.json.write_text(json.dumps({"clients": args.clients, "duration_s": args.duration,
                                         "plain_threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
