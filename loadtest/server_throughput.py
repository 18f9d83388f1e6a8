"""Server throughput and latency against a plain in-process forward pass of the same model.

    python -m loadtest.server_throughput [--clients 1,8,32] [--duration 10] [--modes off,sync,async] [--workers 1,2]

Serves CIFAR ResNet-20 (32x32 inputs, micro-batches up to 64, the server's default batching delay
and thread count) in a ``tta-serve serve`` subprocess, drives it with N concurrent one-image
clients sending CIFAR-10 test images (binary FP32 NCHW, the Triton client's default encoding) over
kept-alive connections for a fixed time, and reports images/s, its ratio to the plain forward pass
(NCHW, batch 32, ``--threads``, re-measured in a fresh process just before each row while the server idles,
with glibc's default allocator thresholds and with the server's tuned ones), p50/p95/p99 latency and,
once ``off`` was measured, each p50 against off's at the same clients and workers, and the share of the
served images that adaptation stepped on (``adapted``; with several workers only worker 0 adapts). ``--workers 1,2``
measures each mode with ``tta-serve serve --workers 1`` then ``--workers 2`` (alternating, so a busy
machine's drift hits both alike).
Loopback only, bounded in time. Results go to a table and, with ``--json``, a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from adapters.models import build_cifar_resnet
from benchmarks.data import checkpoint_path, cifar10_test_path
from service.v2_client import binary_request
from service.workers import WORKER_HEADER

MODES = {
    "off": {"method": "source"},  # the served default: onnxruntime on the CPU (runtime: auto)
    "off-torch": {"method": "source", "runtime": "torch"},
    "off-onnx": {"method": "source", "runtime": "onnx"},
    "sync": {"method": "eata", "mode": "sync"},
    "sync-papers": {"method": "eata", "mode": "sync", "correlated_traffic": "never"},
    "sync-efficient": {"method": "eata", "mode": "sync", "efficiency": "efficient"},
    "async": {"method": "eata", "mode": "async"},
}


def mode_fields(mode: str) -> dict[str, Any]:
    """A mode's model config fields; ``async-N`` is async mode adapting on N % of the served images even
    under saturation (``adapt_traffic_share``)."""
    if mode in MODES:
        return MODES[mode]
    name, _, percent = mode.rpartition("-")
    if name == "async" and percent.isdigit() and 0 < int(percent) <= 100:
        return {**MODES["async"], "adapt_traffic_share": int(percent) / 100}
    raise SystemExit(f"unknown mode {mode!r}: any of {', '.join(MODES)}, or async-N (N % of the images adapted on)")


def plain_forward(weights: Path, batch: int, seconds: float, channels_last: bool) -> float:
    """Images/s of ``model(x)`` under inference_mode at a fixed batch size."""
    model = build_cifar_resnet("resnet20", weights)
    x = torch.rand(batch, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            done += batch
    return done / (time.perf_counter() - start)


def plain_in_fresh_process(weights: Path, seconds: float, threads: int, tuned_allocator: bool) -> float:
    """:func:`plain_forward` (NCHW, batch 32) in a new interpreter: the reference must not inherit this
    process's heap. In a fresh process glibc's default thresholds page-fault every batch's activations in
    again (the state the issue's 858 img/s was measured in); ``tuned_allocator`` applies the server's own
    thresholds first (service/allocator.py), the fastest plain forward pass found here."""
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from service.allocator import tune_allocator\n"
        "from loadtest.server_throughput import plain_forward\n"
        "if sys.argv[3] == '1':\n"
        "    tune_allocator()\n"
        "torch.set_num_threads(int(sys.argv[2]))\n"
        "print(plain_forward(Path(sys.argv[1]), 32, float(sys.argv[4]), channels_last=False))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(weights), str(threads), "1" if tuned_allocator else "0",
                          str(seconds)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def write_config(folder: Path, mode: str, weights: Path, max_batch: int, max_delay_ms: float | None,
                 fisher_data: Path) -> Path:
    fields: dict[str, Any] = {"name": "resnet20", "architecture": "resnet20", "weights": str(weights),
                              "max_batch_size": max_batch, **mode_fields(mode)}
    if max_delay_ms is not None:
        fields["max_delay_ms"] = max_delay_ms
    if fields["method"] != "source":
        fields["fisher_data"] = str(fisher_data)
    path = folder / f"{mode}.json"  # JSON is valid YAML
    path.write_text(json.dumps({"models": [fields]}))
    return path


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become ready")


def wait_workers(base: str, workers: int, timeout: float = 180) -> None:
    """Until every worker of a ``--workers`` server has answered (the kernel picks one per connection)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only workers {sorted(seen)} of {workers} answered")
        seen.add(httpx.get(f"{base}/v2/health/ready", timeout=5).headers.get(WORKER_HEADER, "0"))


def adapted_samples(base: str, model: str) -> int:
    """Images the adapting worker (worker 0 of a ``--workers`` server) has stepped on so far."""
    for _ in range(200):  # new connections until worker 0 answers (the kernel picks one per connection)
        response = httpx.get(f"{base}/v1/models/{model}/adaptation", timeout=10)
        if response.headers.get(WORKER_HEADER, "0") == "0":
            return int(response.json()["samples_seen"])
    raise RuntimeError("worker 0 never answered")


def raw_post_requests(path: str, bodies: list[bytes], headers: dict[str, str]) -> list[bytes]:
    """Complete HTTP/1.1 POST requests of ``bodies`` to ``path``, built once so the client costs little."""
    requests = []
    for body in bodies:
        head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        requests.append(head.encode() + body)
    return requests


def v2_bodies(images: np.ndarray) -> tuple[list[bytes], dict[str, str]]:
    """Binary v2 bodies of one image each (:func:`binary_request`) and their headers (the same for all)."""
    built = [binary_request(image[None]) for image in images]
    return [body for body, _ in built], built[0][1]


def raw_requests(images: np.ndarray, model: str) -> list[bytes]:
    """Complete HTTP/1.1 requests (binary v2, one image each), built once so the client costs little."""
    bodies, headers = v2_bodies(images)
    return raw_post_requests(f"/v2/models/{model}/infer", bodies, headers)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bytes:
    """Send one request on a kept-alive connection and read its response; raises on a non-200 answer."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200"):
        status = head.partition(b"\r\n")[0].decode()
        raise RuntimeError(f"{status}: {body[:200]!r}")
    return body


async def drive(port: int, clients: int, seconds: float, requests: list[bytes]) -> dict[str, float]:
    """``clients`` concurrent loops of one-image requests for ``seconds``; latency in ms.

    The client is raw HTTP/1.1 over asyncio streams with prebuilt requests: on these 2 cores an httpx
    client needed more CPU per request than the server, so it measured itself (docs/benchmarks.md).
    """
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client_loop(offset: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        try:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    await _exchange(reader, writer, requests[i % len(requests)])
                    latencies.append((time.perf_counter() - started) * 1000)
                except RuntimeError:
                    errors += 1
                i += clients
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*[client_loop(k) for k in range(clients)])
    elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {"images_per_second": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "requests": len(latencies), "errors": errors}


def run_loop(coroutine: Any) -> Any:
    """``asyncio.run`` on uvloop when installed (as the server uses): less client CPU per request."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def cifar_uint8_images(path: Path, count: int = 1024) -> np.ndarray:
    """CIFAR-10 test images as stored: uint8 NHWC (the v2 UINT8 layout and TorchServe's raw bytes)."""
    with np.load(path) as data:
        return np.ascontiguousarray(data["x"][:count], dtype=np.uint8)


def cifar_images(path: Path, count: int = 1024) -> np.ndarray:
    """CIFAR-10 test images as float32 NCHW in [0, 1] (real images: EATA's filters select as in use)."""
    x = cifar_uint8_images(path, count)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="ResNet-20 checkpoint (default: $TTA_MODELS_DIR or $TTA_SHARED)")
    parser.add_argument("--data", type=Path, help="CIFAR-10 npz: images sent, and Fisher data "
                        "(default: $TTA_CIFAR10 or $TTA_SHARED)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--modes", default="off,off-torch,sync,async",
                        help=f"any of {', '.join(MODES)}, or async-N: async adapting on N %% of the served images "
                        "even under saturation (adapt_traffic_share)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain forward pass")
    parser.add_argument("--server-threads", type=int, help="TTA_THREADS of the server (default: the server's "
                        "own: every core with a sync-adapting model, else one per core less one)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, help="the server's max_delay_ms (default: the server's, 0)")
    parser.add_argument("--workers", default="1", help="server processes (tta-serve serve --workers), "
                        "comma-separated: each mode is measured with each, in turn")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.weights = checkpoint_path("resnet20", args.weights)
    args.data = cifar10_test_path(args.data, "--data")
    console = Console(width=200)
    requests = raw_requests(cifar_images(args.data), "resnet20")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, workers in ((m, int(w)) for m in args.modes.split(",") for w in args.workers.split(",")):
            config = write_config(Path(tmp), mode, args.weights, args.max_batch, args.max_delay_ms, args.data)
            port = 18000 + os.getpid() % 1000
            env = dict(os.environ)
            if args.server_threads:
                env["TTA_THREADS"] = str(args.server_threads)
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config),
                                     "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
                                    env=env)
            try:
                wait_ready(f"http://127.0.0.1:{port}", proc)
                wait_workers(f"http://127.0.0.1:{port}", workers)
                run_loop(drive(port, 8, 2.0, requests))  # warm-up
                for clients in (int(c) for c in args.clients.split(",")):
                    # The references are re-measured next to each row (the server idles meanwhile): on a shared
                    # machine the plain forward pass itself varies by 30 % from one minute to the next.
                    default, tuned = (plain_in_fresh_process(args.weights, args.duration / 4, args.threads, t)
                                      for t in (False, True))
                    seen = adapted_samples(f"http://127.0.0.1:{port}", "resnet20")
                    result = run_loop(drive(port, clients, args.duration, requests))
                    # The share of served images that adaptation stepped on: with N workers only worker 0 adapts.
                    result["adapted_share"] = ((adapted_samples(f"http://127.0.0.1:{port}", "resnet20") - seen)
                                               / max(1, result["requests"]))
                    rows.append({"mode": mode, "workers": workers, "clients": clients, **result,
                                 "plain_default_allocator": default, "plain_tuned_allocator": tuned,
                                 "ratio_to_plain": result["images_per_second"] / default,
                                 "ratio_to_tuned_plain": result["images_per_second"] / tuned})
                    console.print(rows[-1])
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    table = Table(title="tta-serve, ResNet-20, one-image clients; plain: a forward pass (NCHW, batch 32, "
                  f"{args.threads} threads) in a fresh process just before the row, with glibc's default "
                  "allocator thresholds and with the server's")
    columns = ("adaptation", "workers", "clients", "img/s", "plain", "x plain", "plain tuned", "x tuned", "p50 ms",
               "p50 / off", "p95 ms", "p99 ms", "adapted", "errors")
    for col in columns:
        table.add_column(col, justify="right")
    off_p50 = {(r["workers"], r["clients"]): r["p50_ms"] for r in rows if r["mode"] == "off"}
    for r in rows:
        key = (r["workers"], r["clients"])
        r["p50_vs_off"] = r["p50_ms"] / off_p50[key] if key in off_p50 else None
        table.add_row(r["mode"], str(r["workers"]), str(r["clients"]), f"{r['images_per_second']:.0f}",
                      f"{r['plain_default_allocator']:.0f}", f"{r['ratio_to_plain']:.2f}",
                      f"{r['plain_tuned_allocator']:.0f}", f"{r['ratio_to_tuned_plain']:.2f}", f"{r['p50_ms']:.1f}",
                      "" if r["p50_vs_off"] is None else f"{r['p50_vs_off']:.2f}", f"{r['p95_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", f"{r['adapted_share']:.2f}", str(r["errors"]))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "server_threads": args.server_threads,
                                         "max_delay_ms": args.max_delay_ms, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
