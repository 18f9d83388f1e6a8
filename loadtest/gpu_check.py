"""GPU check: serve a ResNet-50-shaped model on CUDA, check that it adapts there, print throughput.

    python -m loadtest.gpu_check                                   # on a machine with a CUDA GPU
    python -m loadtest.gpu_check --device cpu --size 64 --duration 4 --clients 2   # a dry run anywhere

For each mode (adaptation off = method source; EATA sync; EATA async) it starts ``tta-serve serve``
with ``TTA_DEVICE`` set, a ResNet-50-shaped network at ``--size`` px (random weights,
``adapters.models.imagenet_resnet``) and ``--clients`` closed-loop clients sending ``--batch`` UINT8
images per binary v2 request for ``--duration`` seconds. It checks that the server put the model on the
requested device (its start-up log names it) and that the adapting modes ran adaptation steps, then
prints images/s and latency per mode. Exit status 1 when a check fails. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from loadtest.processes import Replica, write_config
from service.v2_client import binary_request

MODES = {"off": ("source", "sync"), "sync": ("eata", "sync"), "async": ("eata", "async")}


async def closed_loop(base: str, model: str, images: np.ndarray, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` clients, each sending the next request when the previous one is answered."""
    body, headers = binary_request(images)
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            response = await http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                failures += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"images_per_second": len(latencies) * len(images) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "requests": len(latencies), "failed": failures}


def run_mode(folder: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    method, adapt_mode = MODES[mode]
    model = {"name": "r50", "factory": "adapters.models.imagenet_resnet:resnet50", "input_size": [args.size] * 2,
             "method": method, "mode": adapt_mode, "max_batch_size": args.max_batch, "agreement_fraction": 0,
             "probe_every_s": 0, "max_images_per_request": max(args.batch, 1)}
    if method != "source":  # random weights: an E0 above ln(1000) makes every sample reliable, so backward runs
        model["options"] = {"e0": 10.0}
    config = write_config(folder / f"{mode}.json", [model])
    env = {"TTA_DEVICE": args.device, "TTA_THREADS": str(args.threads)}
    replica = Replica(config, env=env, name=mode).start()
    try:
        replica.wait_ready(timeout=600)
        images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
        asyncio.run(closed_loop(replica.base, "r50", images, 1, min(3.0, args.duration)))  # warm-up
        result = asyncio.run(closed_loop(replica.base, "r50", images, args.clients, args.duration))
        info = httpx.get(f"{replica.base}/v1/models/r50/adaptation", timeout=30).json()
    finally:
        replica.stop()
    return result | {"mode": mode, "steps": info.get("steps", 0), "samples_selected": info.get("samples_selected", 0),
                     "device": info.get("device", "?")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="TTA_DEVICE of the server (cuda, cuda:N or cpu)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="images per request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per mode")
    parser.add_argument("--max-batch", type=int, default=64, help="the server's max_batch_size")
    parser.add_argument("--threads", type=int, default=4, help="the server's torch threads (CPU side)")
    parser.add_argument("--modes", default="off,sync,async")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tta-gpu-check-") as tmp:
        for mode in args.modes.split(","):
            rows.append(run_mode(Path(tmp), mode, args))
    table = Table(title=f"ResNet-50-shaped model, {args.size} px, {args.batch} images/request, {args.clients} "
                        f"clients, TTA_DEVICE={args.device}")
    for column in ("mode", "device", "img/s", "p50 ms", "p95 ms", "steps", "selected", "failed"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["mode"], r["device"], f"{r['images_per_second']:.1f}", f"{r['p50_ms']:.1f}",
                      f"{r['p95_ms']:.1f}", str(r["steps"]), str(r["samples_selected"]), str(r["failed"]))
    Console(width=160).print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=2))
    problems = [f"{r['mode']}: served on {r['device']!r}, not {args.device!r}" for r in rows
                if not r["device"].startswith(args.device.split(":")[0])]
    problems += [f"{r['mode']}: no adaptation step ran" for r in rows if r["mode"] != "off" and r["steps"] == 0]
    problems += [f"{r['mode']}: {r['failed']} failed requests" for r in rows if r["failed"]]
    for problem in problems:
        print(f"CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
