"""Real processes for the load and soak tools: a private ``redis-server`` and ``tta-serve serve`` replicas.

The soak kills and restarts them on purpose, so each wraps one ``Popen`` and can be killed with
SIGKILL (no clean shutdown, as in a crash) and started again on the same port. Everything listens on
127.0.0.1 only. Unlike ``tests/servers.py`` nothing here depends on pytest: failures raise
``ProcessError`` so the command-line tools can report them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"


class ProcessError(RuntimeError):
    """A helper process that would not start (the message says which, and its log's tail)."""


def require_binary(name: str, why: str, package: str, error: type[Exception] = ProcessError) -> str:
    """The ``name`` executable, or ``error`` saying why it is needed and which Debian package has it."""
    path = shutil.which(name)
    if path is None:
        raise error(f"{name} is not installed: {why} (Debian/Ubuntu: apt-get install -y {package})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class RedisServer:
    """A private redis-server without persistence: a restart comes back empty, like a lost pod."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ProcessError("redis-server is not installed (.ci/run installs it)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _port_open(self.port):
                return self
            time.sleep(0.05)
        self.kill()
        raise ProcessError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Replica:
    """One ``tta-serve serve --config`` process on a fixed port, restartable after a kill."""

    def __init__(self, config: Path, port: int | None = None, env: dict[str, str] | None = None,
                 name: str = "replica", threads: int | None = 1) -> None:
        """``threads``: TTA_THREADS of the server (one by default; None: the server's own choice)."""
        self.config = config
        self.port = port or free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.name = name
        self.env = {k: v for k, v in os.environ.items() if k != "TTA_THREADS" or threads is not None}
        if threads is not None:
            self.env["TTA_THREADS"] = str(threads)
        self.env.update(env or {})
        self.log = config.with_name(f"{config.stem}.{name}.{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Replica:
        """Spawn the server (returns at once; :meth:`wait_ready` waits for readiness)."""
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n--- start {self.starts} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--config", str(self.config),
                 "--host", HOST, "--port", str(self.port), "--log-level", "warning"],
                stdout=out, stderr=subprocess.STDOUT, env=self.env,
            )
        return self

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds until ``/v2/health/ready`` answers 200 (a cold cache trains the digits model first)."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ProcessError(f"{self.name} exited with {code}:\n{_tail(self.log)}")
            try:
                if httpx.get(f"{self.base}/v2/health/ready", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise ProcessError(f"{self.name} not ready after {timeout:.0f} s:\n{_tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: in-flight requests are cut off."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful), SIGKILL if it hangs."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def write_config(path: Path, models: list[dict[str, Any]], **settings: Any) -> Path:
    """A server config file (JSON is valid YAML) with ``models`` and top-level settings."""
    path.write_text(json.dumps({**settings, "models": models}, indent=2))
    return path
