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

``--contend thread`` measures every row again beside a Python thread of the same process that is busy
``CONTENDER_BUSY_MS`` out of every ``CONTENDER_PERIOD_MS`` (holding the GIL and a core, as the event loop
does when it parses requests); ``--contend process`` beside a separate process with the same duty cycle
(a core only, as a co-located load client does).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.data import checkpoint_path, cifar10_test_path
from loadtest.server_throughput import cifar_images, plain_in_fresh_process, write_config

BATCH = 32
ASYNC_SHARES = (0.05, 0.25)
CONTENDER_BUSY_MS = 2.0
CONTENDER_PERIOD_MS = 13.0  # busy about 15 % of the time: the sync server's event loop thread, measured with top


def busy_duty_cycle(stop: threading.Event | None = None) -> None:
    """Spin in Python for CONTENDER_BUSY_MS, sleep the rest of CONTENDER_PERIOD_MS, until ``stop``."""
    while stop is None or not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < CONTENDER_BUSY_MS / 1000:
            sum(range(100))
        time.sleep((CONTENDER_PERIOD_MS - CONTENDER_BUSY_MS) / 1000)


class Contender:
    """A duty-cycle load beside the measurement: a thread of this process or a separate process."""

    def __init__(self, kind: str | None) -> None:
        self.kind = kind
        self._stop = threading.Event()
        self._worker: threading.Thread | multiprocessing.Process | None = None

    def __enter__(self) -> Contender:
        if self.kind == "thread":
            self._worker = threading.Thread(target=busy_duty_cycle, args=(self._stop,), daemon=True)
        elif self.kind == "process":
            self._worker = multiprocessing.get_context("spawn").Process(target=busy_duty_cycle, daemon=True)
        if self._worker is not None:
            self._worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if isinstance(self._worker, multiprocessing.Process):
            self._worker.terminate()
        if self._worker is not None:
            self._worker.join(5)


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


def measure_mode(mode: str, weights: Path, data: Path, seconds: float, contend: str | None) -> dict[str, float]:
    """The engine of ``mode`` as the server builds it; its answer (and step) rates on the calling thread,
    beside ``contend`` (None, ``thread`` or ``process``)."""
    from service.composition import EngineFactory, configure_torch
    from service.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(write_config(Path(tmp), mode, weights, 64, None, data))
        configure_torch(settings)
        engine = EngineFactory(settings)(settings.resolved_models()[0])
    images = torch.from_numpy(cifar_images(data, 2048))
    result = {"threads": torch.get_num_threads()}
    with Contender(contend):
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
    parser.add_argument("--contend", choices=("thread", "process"), help="measure beside a duty-cycle load: a "
                        "Python thread of the same process, or a separate process (see above)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode, print JSON
    args = parser.parse_args()
    weights = checkpoint_path("resnet20", args.weights)
    data = cifar10_test_path(args.data, "--data")
    if args.one:
        print(json.dumps(measure_mode(args.one, weights, data, args.seconds, args.contend)))
        return
    console = Console(width=160)
    plain = plain_in_fresh_process(weights, args.seconds, 2, False)
    console.print(f"plain forward pass (batch {BATCH}, 2 threads, fresh process, default allocator): "
                  f"{plain:,.0f} img/s")
    rows = {}
    for mode in args.modes.split(","):
        console.print(f"measuring {mode} ...")
        out = subprocess.run([sys.executable, "-m", "loadtest.model_thread_cost", "--one", mode,
                              "--seconds", str(args.seconds), "--weights", str(weights), "--data", str(data),
                              *(["--contend", args.contend] if args.contend else [])],
                             capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    beside = f", beside a busy {args.contend}" if args.contend else ""
    table = Table(title=f"the model thread alone{beside}, batch {BATCH}, CIFAR ResNet-20; x plain: against "
                  f"{plain:,.0f} img/s")
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
        args.json.write_text(json.dumps({"plain": plain, "batch": BATCH, "contend": args.contend, "modes": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
