"""``tta-serve demo``: start the server and stream drifting digits through its HTTP API.

Two copies of the built-in digits model are served: ``digits`` adapts with EATA, ``digits-frozen`` is
the frozen source model. Every batch goes to both over the Open Inference Protocol (binary UINT8
tensors, as the Triton client sends them), and a live table shows their accuracy per drift segment.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from service.v2_client import infer

DEFAULT_SEGMENTS = ("clean", "impulse_noise", "snow", "brightness", "frost", "contrast", "fog")
ADAPTING, FROZEN = "digits", "digits-frozen"


@dataclass
class SegmentResult:
    name: str
    images: int = 0
    frozen_correct: int = 0
    adapting_correct: int = 0
    selected: int = 0

    @property
    def frozen_accuracy(self) -> float:
        return 100.0 * self.frozen_correct / max(self.images, 1)

    @property
    def adapting_accuracy(self) -> float:
        return 100.0 * self.adapting_correct / max(self.images, 1)


@dataclass
class DemoResult:
    segments: list[SegmentResult] = field(default_factory=list)
    adaptation: dict = field(default_factory=dict)

    @property
    def images(self) -> int:
        return sum(s.images for s in self.segments)

    @property
    def frozen_accuracy(self) -> float:
        return 100.0 * sum(s.frozen_correct for s in self.segments) / max(self.images, 1)

    @property
    def adapting_accuracy(self) -> float:
        return 100.0 * sum(s.adapting_correct for s in self.segments) / max(self.images, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(settings) -> Iterator[str]:
    """Run the tta-serve app under uvicorn in a background thread; yield its base URL."""
    import uvicorn

    from service.http.app import create_app

    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="tta-demo-server", daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if not thread.is_alive():
                raise RuntimeError("the server stopped during start-up (see the log above)")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready within 120 s")
            time.sleep(0.2)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def drifting_stream(
    segments: tuple[str, ...], per_segment: int, seed: int
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Held-out digits, each segment under one corruption at severity 5 ('clean' = none)."""
    from adapters.corruptions import corrupt
    from adapters.models.digits import digits_split

    _, (x, y) = digits_split()
    rng = np.random.default_rng(seed)
    for i, name in enumerate(segments):
        order = rng.permutation(len(x))[:per_segment]
        images = x[order] if name == "clean" else corrupt(x[order], name, 5, seed=(seed, i))
        yield name, images, y[order]


def results_table(result: DemoResult) -> Table:
    table = Table(title="tta-serve demo: frozen vs adapting (EATA) digits model, served over HTTP")
    for column in ("drift segment", "images", "frozen acc %", "adapting acc %", "gain", "adapted on"):
        table.add_column(column, justify="left" if column == "drift segment" else "right")
    for s in result.segments:
        gain = s.adapting_accuracy - s.frozen_accuracy
        style = "green" if gain > 0.5 else ("red" if gain < -0.5 else "")
        table.add_row(s.name, str(s.images), f"{s.frozen_accuracy:.1f}", f"{s.adapting_accuracy:.1f}",
                      f"[{style}]{gain:+.1f}[/]" if style else f"{gain:+.1f}", str(s.selected))
    table.add_row("all", str(result.images), f"{result.frozen_accuracy:.1f}", f"{result.adapting_accuracy:.1f}",
                  f"{result.adapting_accuracy - result.frozen_accuracy:+.1f}", "", style="bold")
    return table


def run_demo(
    segments: tuple[str, ...] = DEFAULT_SEGMENTS,
    per_segment: int = 400,
    batch: int = 32,
    port: int | None = None,
    seed: int = 0,
    console: Console | None = None,
) -> DemoResult:
    """Serve both models, stream the drifting digits through HTTP, show and return the accuracies."""
    from service.settings import ModelConfig, Settings

    console = console or Console()
    settings = Settings(
        host="127.0.0.1",
        port=port or free_port(),
        models=[
            ModelConfig(name=ADAPTING, architecture="digits", method="eata"),
            ModelConfig(name=FROZEN, architecture="digits", method="source"),
        ],
    )
    result = DemoResult()
    console.print(f"Starting tta-serve on port {settings.port} (the digits model trains on first use)...")
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        with Live(results_table(result), console=console, refresh_per_second=4) as live:
            for name, images, labels in drifting_stream(segments, per_segment, seed):
                segment = SegmentResult(name)
                result.segments.append(segment)
                for i in range(0, len(images), batch):
                    xb, yb = images[i : i + batch], labels[i : i + batch]
                    before = client.get(f"/v1/models/{ADAPTING}/adaptation").json()["samples_selected"]
                    adapting = infer(client, ADAPTING, xb).argmax(1)
                    frozen = infer(client, FROZEN, xb).argmax(1)
                    after = client.get(f"/v1/models/{ADAPTING}/adaptation").json()
                    segment.images += len(xb)
                    segment.adapting_correct += int((adapting == yb).sum())
                    segment.frozen_correct += int((frozen == yb).sum())
                    segment.selected += after["samples_selected"] - before
                    live.update(results_table(result))
        result.adaptation = client.get(f"/v1/models/{ADAPTING}/adaptation").json()
    console.print()
    info = result.adaptation
    console.print(
        f"Adapting model: {info['steps']} steps, adapted on {info['samples_selected']} of {info['samples_seen']} "
        f"images ({info['samples_reliable']} reliable), parameter version {info['parameter_version']}, "
        f"resets {info['resets'] or 'none'}."
    )
    verdict = "ahead of" if result.adapting_accuracy > result.frozen_accuracy else "NOT ahead of"
    console.print(
        f"[bold]Adapting model {result.adapting_accuracy:.1f}% vs frozen {result.frozen_accuracy:.1f}% "
        f"over {result.images} images: adaptation is {verdict} the frozen model.[/bold]"
    )
    return result
