"""What the model thread alone can serve: each mode's compute ceiling, without HTTP, clients or batching.

    python -m loadtest.model_thread_cost [--modes off,off-torch,sync,sync-efficient,async] [--seconds 5]

Builds each mode's engine exactly as ``tta-serve serve`` does (the same config as
``loadtest.server_throughput``, the server's thread count and allocator thresholds, in a fresh process
per mode) and times, on real CIFAR-10 test images at batch 32 (what 32 one-image clients make):

* ``answer``: a no-update answer (the frozen model, or the adapted one as async mode answers);
* ``step``: a sync batch, answer and update (EATA's forward and backward; for ``efficient`` the no-gradient
  answer, then forward and backward of the selected quarter).

Each is reported in images/s and against the plain forward pass (batch 32, 2 threads, a fresh process with
glibc's default allocator thresholds, as in the side-by-side table). The ceiling of a mode is what its
model thread would serve if the event loop, the clients and the agreement check cost nothing: off, the
answer; sync, the step; async adapting on a share s of the images, 1 / (1/answer + s/step).
``loadtest.side_by_side`` measures what the server reaches; the difference is what the rest of the
process and the machine take (docs/benchmarks.md, "The model thread's ceiling").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.data import checkpoint_path, cifar10_test_path
from loadtest.server_throughput import cifar_images, plain_in_fresh_process, write_config

BATCH = 32
ASYNC_SHARES = (0.05, 0.25)


def images_per_second(fn: Callable[[torch.Tensor], object], images: torch.Tensor, seconds: float) -> float:
    """``fn`` on successive batches of ``BATCH`` images for ``seconds`` (after a warm-up)."""
    batches = images.split(BATCH)[:-1] if images.shape[0] % BATCH else images.split(BATCH)
    for x in batches[:5]:
        fn(x)
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn(batches[i % len(batches)])
        done, i = done + BATCH, i + 1
    return done / (time.perf_counter() - start)


def measure_mode(mode: str, weights: Path, data: Path, seconds: float) -> dict[str, float]:
    """The engine of ``mode`` as the server builds it; its answer (and step) rates on the calling thread."""
    from service.composition import EngineFactory, configure_torch
    from service.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(write_config(Path(tmp), mode, weights, 64, None, data))
        configure_torch(settings)
        engine = EngineFactory(settings)(settings.resolved_models()[0])
    images = torch.from_numpy(cifar_images(data, 2048))
    result = {"threads": torch.get_num_threads()}
    if engine.adapter.uses_batch_statistics:
        result["answer"] = images_per_second(lambda x: engine.small_batch.predict(x), images, seconds)
    else:
        result["answer"] = images_per_second(engine.source.predict, images, seconds)
    if engine.adapts and engine.config.mode == "sync":
        result["step"] = images_per_second(lambda x: engine.run_batch(x, lambda answers: None), images, seconds)
    elif engine.adapts:  # async: its steps, as the worker runs them
        result["step"] = images_per_second(lambda x: engine._step(x), images, seconds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="off,off-torch,sync,sync-efficient,async")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--weights", type=Path, help="ResNet-20 checkpoint (default: $TTA_MODELS_DIR or $TTA_SHARED)")
    parser.add_argument("--data", type=Path, help="CIFAR-10 npz (default: $TTA_CIFAR10 or $TTA_SHARED)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode, print JSON
    args = parser.parse_args()
    weights = checkpoint_path("resnet20", args.weights)
    data = cifar10_test_path(args.data, "--data")
    if args.one:
        print(json.dumps(measure_mode(args.one, weights, data, args.seconds)))
        return
    console = Console(width=160)
    plain = plain_in_fresh_process(weights, args.seconds, 2, False)
    console.print(f"plain forward pass (batch {BATCH}, 2 threads, fresh process, default allocator): "
                  f"{plain:,.0f} img/s")
    rows = {}
    for mode in args.modes.split(","):
        console.print(f"measuring {mode} ...")
        out = subprocess.run([sys.executable, "-m", "loadtest.model_thread_cost", "--one", mode,
                              "--seconds", str(args.seconds), "--weights", str(weights), "--data", str(data)],
                             capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    table = Table(title=f"the model thread alone, batch {BATCH}, CIFAR ResNet-20; x plain: against {plain:,.0f} img/s")
    for column in ("mode", "threads", "answer img/s", "x plain", "step img/s", "x plain", "ceiling img/s",
                   "x plain"):
        table.add_column(column, justify="right")
    for mode, r in rows.items():
        answer, step = r["answer"], r.get("step")
        ceilings = [("", answer)] if step is None else [("", step)]
        if mode.startswith("async") and step is not None:
            ceilings = [(f"share {s:g}: ", 1 / (1 / answer + s / step)) for s in ASYNC_SHARES]
        table.add_row(mode, str(r["threads"]), f"{answer:,.0f}", f"{answer / plain:.2f}",
                      "" if step is None else f"{step:,.0f}", "" if step is None else f"{step / plain:.2f}",
                      ", ".join(f"{label}{c:,.0f}" for label, c in ceilings),
                      ", ".join(f"{c / plain:.2f}" for _, c in ceilings))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"plain": plain, "batch": BATCH, "modes": rows}, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
