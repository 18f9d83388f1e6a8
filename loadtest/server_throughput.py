"""Server throughput and latency against a plain in-process forward pass of the same model.

    python -m loadtest.server_throughput [--clients 1,8,32] [--duration 10] [--modes off,sync,async]

Serves CIFAR ResNet-20 (32x32 inputs, micro-batches up to 64) in a ``tta-serve serve`` subprocess,
drives it with N concurrent one-image clients (binary FP32 NCHW, the Triton client's default
encoding) for a fixed time, and reports images/s, its ratio to the plain forward pass (batch 32,
measured first in this process with the same thread count) and p50/p95/p99 latency. Loopback only,
bounded in time. Results go to a table and, with ``--json``, a file.
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

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from adapters.models import build_cifar_resnet
from benchmarks.data import checkpoint_path, cifar10_test_path
from service.v2_client import binary_request, parse_response

MODES = {
    "off": {"method": "source"},
    "off-onnx": {"method": "source", "runtime": "onnx"},
    "sync": {"method": "eata", "mode": "sync"},
    "async": {"method": "eata", "mode": "async"},
}


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


def write_config(folder: Path, mode: str, weights: Path, max_batch: int, fisher_data: Path) -> Path:
    fields = {"name": "resnet20", "architecture": "resnet20", "weights": str(weights), "max_batch_size": max_batch,
              "max_delay_ms": 2, **MODES[mode]}
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


async def drive(base: str, clients: int, seconds: float, images: np.ndarray) -> dict[str, float]:
    """``clients`` concurrent loops of one-image requests for ``seconds``; latency in ms."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient, offset: int) -> None:
        nonlocal errors
        i = offset
        while time.perf_counter() < stop_at:
            body, headers = binary_request(images[i % len(images)][None])
            started = time.perf_counter()
            try:
                parse_response(await client.post("/v2/models/resnet20/infer", content=body, headers=headers))
                latencies.append((time.perf_counter() - started) * 1000)
            except (RuntimeError, httpx.HTTPError):
                errors += 1
            i += clients

    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[client_loop(client, k) for k in range(clients)])
        elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {"images_per_second": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
            "requests": len(latencies), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=checkpoint_path("resnet20"))
    parser.add_argument("--fisher-data", type=Path, default=cifar10_test_path())
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--modes", default="off,off-onnx,sync,async", help=f"any of {', '.join(MODES)}")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, server and plain forward")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console()
    torch.set_num_threads(args.threads)
    plain = plain_forward(args.weights, 32, args.duration / 2, channels_last=False)
    plain_cl = plain_forward(args.weights, 32, args.duration / 2, channels_last=True)
    console.print(f"plain forward, batch 32, {args.threads} threads: {plain:.0f} img/s "
                  f"({plain_cl:.0f} with channels_last)")
    images = (np.random.default_rng(0).random((256, 3, 32, 32)) ).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            config = write_config(Path(tmp), mode, args.weights, args.max_batch, args.fisher_data)
            port = 18000 + os.getpid() % 1000
            env = {**os.environ, "TTA_THREADS": str(args.threads)}
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(config),
                                     "--port", str(port), "--log-level", "warning"], env=env)
            base = f"http://127.0.0.1:{port}"
            try:
                wait_ready(base, proc)
                asyncio.run(drive(base, 8, 2.0, images))  # warm-up
                for clients in (int(c) for c in args.clients.split(",")):
                    result = asyncio.run(drive(base, clients, args.duration, images))
                    rows.append({"mode": mode, "clients": clients, **result,
                                 "ratio_to_plain": result["images_per_second"] / plain})
                    console.print(rows[-1])
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    table = Table(title=f"tta-serve, ResNet-20, one-image clients, plain forward {plain:.0f} img/s (batch 32)")
    for col in ("adaptation", "clients", "img/s", "x plain", "p50 ms", "p95 ms", "p99 ms", "errors"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], str(r["clients"]), f"{r['images_per_second']:.0f}", f"{r['ratio_to_plain']:.2f}",
                      f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", str(r["errors"]))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"plain_forward": plain, "plain_forward_channels_last": plain_cl,
                                         "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
