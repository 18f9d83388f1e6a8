"""Camera load test: every client is a camera with its own class-correlated stream.

    python -m loadtest.cameras --cameras 4 --order correlated --adaptation on,off
    python -m loadtest.cameras --order dirichlet --dirichlet 0.1 --json cameras.json

A camera does not send a shuffled dataset: it sees one kind of object for a while, then another.
Each camera here owns a disjoint share of the CIFAR-10 test images and sends them, corruption after
corruption (CIFAR-10-C at ``--severity``), in its own order (``benchmarks.streams``: sorted by class,
Dirichlet blocks, or shuffled), ``--batch`` images per request, the next request once the previous one
is answered. The cameras run at the same time, so the server's micro-batches mix them as a real
deployment would. The table is the accuracy the clients see, per corruption and overall, with
adaptation off (the frozen source model), papers (``--method`` as published: batch statistics), on (the
served defaults of ``--method``: ``correlated_traffic: auto``) and robust (``correlated_traffic:
always``).

Each configuration starts its own ``tta-serve serve`` (ResNet-20 on 127.0.0.1); loopback only,
bounded by the number of images.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

import adapters
from benchmarks.streams import ORDERS, stream_order
from loadtest.drift_load import adaptation_state, encode, load_images, replicas_running
from service.v2_client import parse_response

DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "snow", "fog", "jpeg_compression")


@dataclass
class Camera:
    """One camera's stream: (corruption index, images, labels) per request, in sending order."""

    requests: list[tuple[int, np.ndarray, np.ndarray]]


def build_cameras(cameras: int, corruptions: tuple[str, ...], severity: int, images: int, batch: int,
                  order: str, alpha: float | None, seed: int = 0) -> list[Camera]:
    """``cameras`` disjoint streams over the first ``images`` test images of each corruption."""
    from adapters.corruptions import corrupt

    x, y = load_images("cifar", images)
    corrupted = [corrupt(x, name, severity, seed=seed) for name in corruptions]
    streams = []
    for c in range(cameras):
        own = np.arange(c, len(y), cameras)  # the camera's share of the scene
        requests = []
        for k, images_k in enumerate(corrupted):
            ordered = own[stream_order(y[own], order, seed + 1000 * c + k, alpha)]  # type: ignore[arg-type]
            requests += [(k, images_k[ordered[i : i + batch]], y[ordered[i : i + batch]])
                         for i in range(0, len(ordered), batch)]
        streams.append(Camera(requests))
    return streams


async def run_cameras(base: str, model: str, cameras: list[Camera]) -> dict[str, Any]:
    """Every camera sends its requests in order, all cameras at once; returns correct counts and timing."""
    correct = np.zeros((len(cameras), 1 + max(k for cam in cameras for k, _, _ in cam.requests)), dtype=np.int64)
    seen = np.zeros_like(correct)
    failures = 0

    async def camera(index: int, cam: Camera, client: httpx.AsyncClient) -> None:
        nonlocal failures
        for k, images, labels in cam.requests:
            body, headers = encode(images)
            response = await client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
            if response.status_code != 200:
                failures += 1
                continue
            predicted = parse_response(response)[0].argmax(1)
            correct[index, k] += int((predicted == labels).sum())
            seen[index, k] += len(labels)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await asyncio.gather(*(camera(i, cam, client) for i, cam in enumerate(cameras)))
    seconds = time.perf_counter() - started
    return {"correct": correct, "seen": seen, "failures": failures, "seconds": seconds}


def summarize(result: dict[str, Any], corruptions: tuple[str, ...]) -> dict[str, Any]:
    correct, seen = result["correct"], result["seen"]
    per_corruption = {
        name: 100.0 * correct[:, k].sum() / max(seen[:, k].sum(), 1) for k, name in enumerate(corruptions)
    }
    per_camera = [100.0 * c.sum() / max(s.sum(), 1) for c, s in zip(correct, seen, strict=True)]
    return {
        "accuracy": 100.0 * correct.sum() / max(seen.sum(), 1),
        "per_corruption": per_corruption,
        "per_camera": per_camera,
        "images": int(seen.sum()),
        "failed_requests": result["failures"],
        "images_per_second": float(seen.sum()) / result["seconds"],
    }


#: The server's ``correlated_traffic`` for each ``--adaptation`` value (``off`` serves ``source``: unused).
CORRELATED_TRAFFIC_OF = {"off": "never", "papers": "never", "on": "auto", "robust": "always"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--images", type=int, default=2000, help="test images per corruption, shared by the cameras")
    parser.add_argument("--corruptions", default=",".join(DEFAULT_CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--order", choices=ORDERS, default="correlated")
    parser.add_argument("--dirichlet", type=float, default=None, help="alpha of --order dirichlet (e.g. 0.1)")
    parser.add_argument("--batch", type=int, default=16, help="images per request")
    parser.add_argument("--adaptation", default="off,papers,on,robust",
                        help="off: the frozen model; papers: --method as published (correlated_traffic never); on: "
                        "--method with the served defaults (correlated_traffic auto); robust: correlated_traffic "
                        "always (auto's correlated mode throughout: the probe's statistics, no update, gated LAME)")
    parser.add_argument("--method", default="eata", help="the adapting method (its served defaults)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.order == "dirichlet" and args.dirichlet is None:
        parser.error("--order dirichlet needs --dirichlet ALPHA (e.g. 0.1)")
    from benchmarks.data import checkpoint_path, cifar10_test_path

    corruptions = tuple(c for c in args.corruptions.split(",") if c)
    cameras = build_cameras(args.cameras, corruptions, args.severity, args.images, args.batch, args.order,
                            args.dirichlet)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tta-cameras-") as tmp:
        for adaptation in args.adaptation.split(","):
            method = "source" if adaptation == "off" else args.method
            fields: dict[str, Any] = {"name": "resnet20", "architecture": "resnet20",
                                      "weights": str(checkpoint_path("resnet20")), "method": method,
                                      "correlated_traffic": CORRELATED_TRAFFIC_OF[adaptation]}
            if adapters.METHODS[method].uses_fisher:
                fields["fisher_data"] = str(cifar10_test_path())
            with replicas_running(Path(tmp), fields, 1, args.threads) as (replica,):
                result = run_cameras(replica.base, "resnet20", cameras)
                summary = summarize(asyncio.run(result), corruptions)
                summary |= {"adaptation": adaptation, "method": method,
                            "state": adaptation_state(replica.base, "resnet20")}
            rows.append(summary)
    table = Table(title=f"{args.cameras} cameras, order {args.order}"
                        f"{f' (alpha {args.dirichlet})' if args.dirichlet else ''}, {args.batch} images per request, "
                        f"severity {args.severity}: accuracy % the clients see")
    for column in ("adaptation", *corruptions, "all", "img/s", "failed"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['adaptation']} ({r['method']})", *(f"{r['per_corruption'][c]:.1f}" for c in corruptions),
                      f"{r['accuracy']:.1f}", f"{r['images_per_second']:.0f}", str(r["failed_requests"]))
    Console(width=200).print(table)
    report = {"config": vars(args) | {"json": str(args.json) if args.json else None}, "runs": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=float))
    return report


if __name__ == "__main__":
    main()
