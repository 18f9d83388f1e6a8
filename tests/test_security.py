"""The attack surface, point by point (docs/reliability.md, "Security review").

* Every admin route, found by walking the app's routes for the ``require_admin`` dependency rather
  than from a list, is 401 without the token, with a wrong one or another scheme, and works with it.
* Bodies over ``max_body_bytes`` are 413 however they arrive (declared, chunked, multipart, gzip).
* Model and snapshot names from URLs are only looked up in memory: traversal attempts are 404 and no
  file is opened for them (checked with an audit hook on ``open``).
* Pickled code in a checkpoint, a Fisher file or a published state is refused and never runs.
* The admin token never reaches the logs (a real server at debug level), responses or settings dumps,
  and neither does a password in the Redis URL.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.routing import APIRoute
from PIL import Image
from servers import free_port, serve_command, stop, wait_ready

with warnings.catch_warnings():  # Starlette suggests httpx2 for its TestClient; httpx is what we ship with
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from adapters.fisher import FisherInfo
from adapters.models import CheckpointError, load_state_dict_file
from adapters.serialization import StateDecodeError, state_from_bytes
from service.errors import ModelLoadError
from service.http.app import create_app
from service.http.auth import require_admin
from service.model_sources import load_model
from service.settings import ModelConfig, Settings

TOKEN = "adm-7Qx9-security-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024
MAX_PIXELS = 64 * 64
# The admin routes the API documents (docs/api.md); the walk below must find at least these.
DOCUMENTED_ADMIN = {
    ("POST", "/v1/models/{name}/feedback"),
    ("POST", "/v1/models/{name}/reset"),
    ("POST", "/v1/models/{name}/snapshots"),
    ("POST", "/v1/models/{name}/snapshots/{snapshot}/restore"),
    ("POST", "/v2/repository/models/{name}/load"),
    ("POST", "/v2/repository/models/{name}/unload"),
}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(admin_token=TOKEN, max_body_bytes=MAX_BODY, max_image_pixels=MAX_PIXELS,
                    models=[ModelConfig(name="digits", architecture="digits", method="eata", agreement_fraction=0,
                                               max_images_per_request=4)])


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def digits_images(n: int) -> np.ndarray:
    from adapters.models.digits import digits_split

    _, (x, _) = digits_split()
    return x[:n]


def infer_body(images: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.reshape(-1).tolist()}]}


# ------------------------------------------------------------------------------------ admin routes
def walk_routes(
    routes: list[Any], prefix: str = "", deps: tuple[Any, ...] = ()
) -> Iterator[tuple[str, APIRoute, tuple[Any, ...]]]:
    """(full path, route, dependencies added by include_router) for every API route, nested routers too."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield prefix + route.path, route, deps
        elif hasattr(route, "original_router"):  # FastAPI keeps included routers as a branch
            context = getattr(route, "include_context", None)
            yield from walk_routes(route.original_router.routes, prefix + getattr(context, "prefix", ""),
                                   deps + tuple(getattr(context, "dependencies", ())))


def dependency_calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from dependency_calls(sub)


def admin_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path) of every route whose dependency tree contains ``require_admin``."""
    found = set()
    for path, route, deps in walk_routes(app.router.routes):
        calls = [*dependency_calls(route.dependant), *(d.dependency for d in deps)]
        if require_admin in calls:
            found.update((m, path) for m in route.methods)
    return found


def test_admin_routes_are_found_by_walking_the_app(client):
    found = admin_routes(client.app)
    assert found >= DOCUMENTED_ADMIN, f"documented admin routes without the token check: {DOCUMENTED_ADMIN - found}"
    assert not any(method == "GET" for method, _ in found), "reading routes stay open"


def valid_admin_call(client: TestClient, method: str, path: str) -> httpx.Response:
    """A request that must succeed on ``path`` when authorised (one per admin route)."""
    url = path.replace("{name}", "digits")
    if path.endswith("/feedback"):
        answer = client.post("/v2/models/digits/infer", json=infer_body(digits_images(2))).json()
        ids = answer["parameters"]["request_ids"].split(",")
        return client.post(url, json={"labels": {ids[0]: 1, ids[1]: "0"}}, headers=AUTH)
    if path.endswith("/snapshots"):
        return client.post(url, json={"name": "sec-snap"}, headers=AUTH)
    if path.endswith("/restore"):
        client.post(url.rsplit("/", 3)[0] + "/snapshots", json={"name": "sec-snap"}, headers=AUTH)
        return client.post(url.replace("{snapshot}", "sec-snap"), headers=AUTH)
    if path.endswith("/reset"):
        return client.post(url, headers=AUTH)
    if path.endswith("/load"):
        return client.post(url, headers=AUTH)  # reloads the configured model
    if path.endswith("/unload"):
        unloaded = client.post(url, json={}, headers=AUTH)
        client.post(url.replace("/unload", "/load"), headers=AUTH)  # served again for the checks that follow
        return unloaded
    raise AssertionError(f"new admin route {method} {path}: add a valid request for it to this test")


def test_every_admin_route_needs_the_token_and_works_with_it(client):
    for method, path in sorted(admin_routes(client.app)):
        url = path.replace("{name}", "digits").replace("{snapshot}", "sec-snap")
        for headers, why in [({}, "missing"), ({"Authorization": "Bearer wrong-token"}, "invalid"),
                             ({"Authorization": f"Basic {TOKEN}"}, "expected"),
                             ({"Authorization": f"Bearer {TOKEN}x"}, "invalid"),
                             ({"Authorization": "Bearer "}, "expected")]:
            r = client.request(method, url, json={}, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer") and why in r.json()["error"]
            assert TOKEN not in r.text
        ok = valid_admin_call(client, method, path)
        assert 200 <= ok.status_code < 300, (method, path, ok.status_code, ok.text)


@pytest.mark.parametrize(
    ("host", "allow", "expected"),
    [("0.0.0.0", False, 403), ("10.1.2.3", False, 403), ("tta.example", False, 403), ("::", False, 403),
     ("0.0.0.0", True, 200), ("127.0.0.1", False, 200), ("127.0.0.2", False, 200), ("::1", False, 200),
     ("localhost", False, 200)],
)
def test_without_a_token_admin_routes_are_open_only_on_loopback(settings, host, allow, expected, caplog):
    """An exposed server without a token refuses every admin call, whoever calls (the image binds 0.0.0.0)."""
    exposed = settings.model_copy(update={"admin_token": None, "host": host, "allow_unauthenticated_admin": allow})
    with TestClient(create_app(exposed)) as c:
        for method, path in sorted(admin_routes(c.app)):
            r = valid_admin_call(c, method, path)
            if expected == 403:
                assert r.status_code == 403, (host, path, r.text)
                assert "TTA_ADMIN_TOKEN" in r.json()["error"] and host in r.json()["error"]
            else:
                assert 200 <= r.status_code < 300, (host, path, r.text)
        assert c.get("/v1/models/digits/adaptation").status_code == 200  # reading routes stay open
    if expected == 403 or allow:
        assert any("admin routes" in m and "TTA_ADMIN_TOKEN" in m for m in caplog.messages)  # said at start-up


# ------------------------------------------------------------------------------------ body limits
def test_bodies_over_the_limit_are_413_however_they_arrive(client):
    declared = client.post("/v2/models/digits/infer", content=b"{" * (MAX_BODY + 1),
                           headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and str(MAX_BODY) in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it arrives
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    chunked = client.post("/v2/models/digits/infer", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    files = [("files", (f"{i}.png", b"\0" * (MAX_BODY // 4), "image/png")) for i in range(5)]
    assert client.post("/v1/models/digits/predict", files=files).status_code == 413
    bomb = gzip.compress(b" " * (MAX_BODY * 16))  # ~1 KB that inflates to 1 MiB
    assert len(bomb) < MAX_BODY
    r = client.post("/v2/models/digits/infer", content=bomb,
                    headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.get("/v2/health/ready").status_code == 200


def test_images_over_the_pixel_limit_and_too_many_images_are_refused(client):
    buf = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buf, format="PNG")  # small file, 40,000 pixels > 4,096
    r = client.post("/v1/models/digits/predict", files=[("files", ("big.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 413 and "pixels" in r.json()["error"]
    too_many = client.post("/v2/models/digits/infer", json=infer_body(digits_images(5)))  # the limit is 4
    assert too_many.status_code == 400 and "limit is 4" in too_many.json()["error"]


# ------------------------------------------------------------------------------------ names and the file system
class OpenedFiles:
    """Paths opened while armed (a process-wide audit hook; hooks cannot be removed, so it disarms)."""

    def __init__(self) -> None:
        self.armed = False
        self.paths: list[str] = []
        self.lock = threading.Lock()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.armed and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], str | bytes):
            with self.lock:
                self.paths.append(os.fsdecode(args[0]))


TRAVERSALS = ["..%2F..%2Fetc%2Fpasswd", "..%2f..%2fetc%2fpasswd", "%2e%2e%2F%2e%2e%2Fetc%2Fpasswd",
              "....%2F%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "etc%5Cpasswd", "passwd%00digits", "digits%2F..%2Fpasswd"]


def test_model_and_snapshot_names_never_reach_the_file_system(client):
    opened = OpenedFiles()
    body = infer_body(digits_images(1))
    opened.armed = True
    try:
        Path(__file__).read_bytes()  # the hook itself works
        assert any(p.endswith("test_security.py") for p in opened.paths)
        for name in TRAVERSALS:
            for method, path in [("GET", f"/v2/models/{name}"), ("GET", f"/v2/models/{name}/ready"),
                                 ("POST", f"/v2/models/{name}/infer"), ("GET", f"/v1/models/{name}"),
                                 ("POST", f"/v1/models/{name}/predict"), ("GET", f"/v1/models/{name}/adaptation"),
                                 ("POST", f"/v1/models/digits/snapshots/{name}/restore"),
                                 ("GET", f"/v2/models/digits/versions/{name}")]:
                r = client.request(method, path, json=body, headers=AUTH)
                assert r.status_code == 404, (method, path, r.status_code, r.text)
        bad_name = client.post("/v1/models/digits/snapshots", json={"name": "../../etc/passwd"}, headers=AUTH)
        assert bad_name.status_code == 422
    finally:
        opened.armed = False
    suspicious = [p for p in opened.paths if "passwd" in p or "/etc/" in p]
    assert not suspicious, suspicious


# ------------------------------------------------------------------------------------ no unpickling
class RunsCode:
    """Unpickling this calls ``Path.touch`` on the marker: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_in_checkpoints_fisher_files_and_published_states(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"conv.weight": torch.zeros(1), "payload": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        load_state_dict_file(evil)
    config = ModelConfig(name="evil", architecture="resnet20", weights=evil, method="source")
    with pytest.raises(ModelLoadError, match="evil"):
        load_model(config, torch.device("cpu"))
    fisher = tmp_path / "fisher.safetensors"
    fisher.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match="cannot read Fisher file"):
        FisherInfo.load(fisher)
    with pytest.raises(StateDecodeError):
        state_from_bytes(pickle.dumps(RunsCode(marker)))  # what a forged Redis state would hold
    assert not marker.exists(), "unpickling ran code"


# ------------------------------------------------------------------------------------ secrets in logs
def test_the_token_never_appears_in_logs_responses_or_settings(tmp_path, client, settings, caplog):
    assert TOKEN not in repr(settings) and TOKEN not in settings.model_dump_json()
    with caplog.at_level(logging.DEBUG):
        for headers in (AUTH, {"Authorization": "Bearer wrong"}, {}):
            client.post("/v1/models/digits/reset", headers=headers)
        for path in ("/openapi.json", "/metrics", "/v1/models/digits/adaptation", "/v1/models"):
            assert TOKEN not in client.get(path).text
    assert TOKEN not in caplog.text

    # A real server at debug level, configured from the environment as operators do.
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "TTA_ADMIN_TOKEN": TOKEN, "TTA_THREADS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(serve_command("--architecture", "digits", "--port", str(port), "--log-level", "debug"),
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.post("/v1/models/digits/reset", headers=AUTH).status_code == 200
            assert http.post("/v1/models/digits/reset", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert http.post("/v1/models/digits/feedback", json={"labels": {"unknown": 1}},
                             headers=AUTH).status_code == 404
            assert http.post("/v2/models/digits/infer", content=b"{", headers=AUTH).status_code == 400
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert "POST /v1/models/digits/reset" in text  # the access log was captured
    assert TOKEN not in text


def test_a_redis_password_never_appears_in_logs_or_responses(caplog):
    """With Redis down, its URL is in log lines, 503 bodies and readiness reasons: never its password."""
    secret = "redis-pw-9f3k"
    url = f"redis://:{secret}@127.0.0.1:{free_port()}/0"  # nothing listens: the store is down
    settings = Settings(redis_url=url, models=[ModelConfig(name="digits", architecture="digits", method="eata",
                                                           agreement_fraction=0)])
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)) as client:
        bodies = [client.get(path).text for path in ("/v2/health/ready", "/v1/models/digits/snapshots",
                                                     "/v1/models/digits/adaptation", "/metrics")]
    assert not [b for b in bodies if secret in b], "a response shows the Redis password"
    assert secret not in caplog.text, "the log shows the Redis password"


def test_the_redis_url_is_a_secret_in_the_settings():
    settings = Settings(redis_url="redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in repr(settings) and "hunter2" not in settings.model_dump_json()
    assert settings.redis_url is not None and "hunter2" in settings.redis_url.get_secret_value()
