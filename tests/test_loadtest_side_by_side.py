"""The side-by-side benchmark (loadtest/side_by_side.py) without TorchServe: what a user would notice.

- wrk, driven by loadtest/wrk_bodies.lua, sends byte for byte the binary v2 request of
  ``service.v2_client.binary_request`` (path, headers, body), cycling through the bodies given;
- the one command runs end to end against a real tta-serve (adaptation off) and every wrk request is
  answered 200 (a body the server refused would count as an error);
- the TorchServe handler turns raw uint8 HWC bytes into the same logits as the model on those pixels.

TorchServe itself is never installed here. ``loadtest`` is a checkout tool, not part of the installed
package, so the command runs as a subprocess from the checkout (as tests/test_soak.py does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from adapters.models import build_cifar_resnet
from benchmarks.data import cifar10_test_path
from service.v2_client import binary_request

REPO = Path(__file__).resolve().parent.parent
LUA = REPO / "loadtest" / "wrk_bodies.lua"


@pytest.fixture(scope="module")
def cifar10_path(shared) -> Path:
    return cifar10_test_path()


def _wrk() -> str:
    binary = shutil.which("wrk")
    assert binary, "wrk is not installed (.ci/run installs it: apt-get install -y wrk)"
    return binary


class CaptureServer:
    """A loopback HTTP/1.1 server that answers 200 to every POST and keeps the first requests it read."""

    def __init__(self, keep: int = 8) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.keep = keep
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    while len(buffer) < length:
                        buffer += conn.recv(65536)
                    body, buffer = buffer[:length], buffer[length:]
                    if len(self.requests) < self.keep:
                        self.requests.append((head, body))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def test_wrk_sends_the_v2_client_bytes(tmp_path, cifar10_path):
    images = np.load(cifar10_path)["x"][:3]
    built = [binary_request(image[None]) for image in images]
    bodies = [body for body, _ in built]
    headers = built[0][1]
    (tmp_path / "bodies").write_bytes(b"".join(bodies))
    server = CaptureServer()
    try:
        out = subprocess.run(
            [_wrk(), "-t", "1", "-c", "1", "-d", "1s", "-s", str(LUA), f"http://127.0.0.1:{server.port}", "--",
             str(tmp_path / "bodies"), str(len(bodies[0])), "/v2/models/resnet20/infer",
             *(f"{k}:{v}" for k, v in headers.items())],
            capture_output=True, text=True, timeout=60, check=True)
    finally:
        server.close()
    summary = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("WRK_JSON "))[9:])
    assert summary["requests"] > 0 and summary["status_errors"] == 0
    assert len(server.requests) >= 3
    start = bodies.index(server.requests[0][1])  # wrk may draw a request of its own first
    for i, (head, body) in enumerate(server.requests):
        assert body == bodies[(start + i) % 3]  # the very bytes of binary_request, in turn
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /v2/models/resnet20/infer HTTP/1.1"
        sent = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        for name, value in headers.items():
            assert sent[name.lower()] == value


def test_side_by_side_command_against_tta_serve(tmp_path, resnet20_weights, cifar10_path):
    _wrk()
    out_json = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "loadtest.side_by_side", "--servers", "off", "--clients", "1,2", "--duration", "1",
         "--plain-seconds", "0.3", "--no-own-client", "--weights", str(resnet20_weights), "--data", str(cifar10_path),
         "--json", str(out_json)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| tta-serve, adaptation off (binary v2 uint8) |" in out.stdout
    (row,) = json.loads(out_json.read_text())["rows"]
    for clients in ("1", "2"):
        assert row["wrk"][clients]["requests"] > 0
        assert row["wrk"][clients]["errors"] == 0
    assert row["plain_before"] > 0 and row["ratio_to_plain"] > 0


class _Context:
    """The one attribute of TorchServe's context the handler reads."""

    def __init__(self, weights: Path) -> None:
        self.model_yaml_config = {"handler": {"repo": str(REPO), "weights": str(weights), "threads": 1}}


def test_torchserve_handler_decodes_raw_uint8_pixels(resnet20_weights, cifar10_path):
    spec = importlib.util.spec_from_file_location("torchserve_handler", REPO / "loadtest" / "torchserve_handler.py")
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    images = np.load(cifar10_path)["x"][:4]
    answers = handler.handle([{"body": bytearray(image.tobytes())} for image in images], _Context(resnet20_weights))
    model = build_cifar_resnet("resnet20", resnet20_weights).eval()
    with torch.inference_mode():
        expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0))
    assert [a["class"] for a in answers] == expected.argmax(1).tolist()
    np.testing.assert_allclose([a["logits"] for a in answers], expected.numpy(), rtol=1e-4, atol=1e-4)
