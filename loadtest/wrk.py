"""Drive an HTTP server with ``wrk``, the widely used independent load client, posting binary bodies.

A comparison between servers is only fair when the client is the same and is neither server's own:
``wrk`` (Debian package ``wrk``) keeps N connections, each sending its next request as soon as the
previous answer arrived (closed loop, as the project's raw client), and records every latency. The
bodies come from the caller (for tta-serve the very bytes of :func:`service.v2_client.binary_request`),
so the client changes, never the request. ``loadtest/wrk_bodies.lua`` formats them once and prints a JSON
summary that :func:`run_wrk` parses.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from loadtest.processes import require_binary

LUA_SCRIPT = Path(__file__).with_name("wrk_bodies.lua")
MARKER = "WRK_JSON "


class WrkError(RuntimeError):
    """wrk is missing, failed, or printed no summary (the message says which)."""


def wrk_binary() -> str:
    """The ``wrk`` executable, or a clear error naming the package to install."""
    return require_binary("wrk", "the side-by-side benchmark drives every server with it", "wrk", WrkError)


def write_bodies(path: Path, bodies: Sequence[bytes]) -> int:
    """Write equally long ``bodies`` back to back (the Lua script splits them); returns one body's length."""
    if not bodies:
        raise ValueError("no request bodies")
    size = len(bodies[0])
    if any(len(body) != size for body in bodies):
        raise ValueError("wrk bodies must all have the same length")
    path.write_bytes(b"".join(bodies))
    return size


def wrk_command(url: str, path: str, bodies_file: Path, body_size: int, headers: Mapping[str, str],
                clients: int, seconds: float, threads: int = 1, timeout_s: float = 30.0) -> list[str]:
    """The wrk command line: ``clients`` connections over ``threads`` event-loop threads for ``seconds``."""
    threads = max(1, min(threads, clients))
    return [wrk_binary(), "--latency", "-t", str(threads), "-c", str(clients), "-d", f"{max(1, round(seconds))}s",
            "--timeout", f"{round(timeout_s)}s", "-s", str(LUA_SCRIPT), url, "--", str(bodies_file), str(body_size),
            path, *(f"{name}:{value}" for name, value in headers.items())]


def parse_summary(stdout: str) -> dict[str, float]:
    """The Lua ``done()`` JSON line as the project's load-result keys (images/s, latency in ms, errors)."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise WrkError(f"wrk printed no summary:\n{stdout[-2000:]}")
    raw = json.loads(lines[-1][len(MARKER):])
    errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    ok = raw["requests"] - raw["status_errors"]
    return {"images_per_second": ok / (raw["duration_us"] / 1e6), "p50_ms": raw["p50_us"] / 1000,
            "p95_ms": raw["p95_us"] / 1000, "p99_ms": raw["p99_us"] / 1000, "requests": raw["requests"],
            "errors": errors, "status_errors": raw["status_errors"]}


def run_wrk(url: str, path: str, bodies_file: Path, body_size: int, headers: Mapping[str, str], clients: int,
            seconds: float, threads: int = 1) -> dict[str, float]:
    """One closed-loop measurement with wrk; bounded by ``seconds`` plus a minute of grace."""
    command = wrk_command(url, path, bodies_file, body_size, headers, clients, seconds, threads)
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {seconds + 60:.0f} s") from exc
    if out.returncode != 0:
        raise WrkError(f"wrk exited with {out.returncode}:\n{out.stderr[-2000:]}{out.stdout[-2000:]}")
    return parse_summary(out.stdout)
