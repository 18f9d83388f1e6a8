"""Real processes for tests: a ``tta-serve serve`` server and a private ``redis-server``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT_S = 180.0  # a cold cache trains the digits model first (~10-20 s on a busy machine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "serve", *args]


def wait_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_server(config: Path, env: dict[str, str] | None = None, port: int | None = None) -> Iterator[
    tuple[str, subprocess.Popen]
]:
    """A ``tta-serve serve --config`` process on a free port; yields (base URL, process); always stopped."""
    port = port or free_port()
    log = config.with_suffix(f".{port}.log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command("--config", str(config), "--port", str(port), "--log-level", "warning"),
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "TTA_THREADS": "1", "TTA_WORKERS": "1", **(env or {})},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, log)
            yield base, proc
        finally:
            stop(proc)


class RedisProcess:
    """A private redis-server on its own port, which tests may kill and restart."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        pytest.fail(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
