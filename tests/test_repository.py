"""The model repository API under traffic: load, reload and unload without failing the other models."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
from servers import running_server

from adapters.models.digits import digits_split


def _infer(client: httpx.Client, base: str, model: str, x: np.ndarray) -> httpx.Response:
    body = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}]}
    return client.post(f"{base}/v2/models/{model}/infer", json=body, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = tmp_path_factory.mktemp("repo") / "models.yaml"
    config.write_text("models:\n  - name: a\n    architecture: digits\n    method: source\n"
                      "  - name: b\n    architecture: digits\n    method: eata\n")
    with running_server(config) as (base, _):
        yield base


def test_load_reload_and_unload_under_traffic_fail_no_request_of_the_other_models(server):
    _, (x, _) = digits_split()
    x = x[:16]
    stop, answered, failed = threading.Event(), [], []

    def traffic() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                r = _infer(client, server, "a", x[:4])
                (answered if r.status_code == 200 else failed).append(r.status_code)

    hammer = threading.Thread(target=traffic)
    hammer.start()
    try:
        with httpx.Client(base_url=server, timeout=120) as c:
            index = {e["name"]: e for e in c.post("/v2/repository/index").json()}
            assert index["a"]["state"] == index["b"]["state"] == "READY"

            config = {"name": "c", "architecture": "digits", "method": "eata"}
            assert c.post("/v2/repository/models/c/load", json={"parameters": {"config": config}}).status_code == 200
            assert _infer(c, server, "c", x).status_code == 200
            assert c.post("/v2/repository/models/b/load").status_code == 200  # a reload, from the configuration
            metrics = c.get("/metrics").text  # the reloaded engine's health is what /metrics reads
            assert 'tta_model_info{method="eata",mode="sync",model="b",role="standalone"} 1.0' in metrics

            for _ in range(3):  # adapt c a little, then keep its state on unload
                _infer(c, server, "c", x)
            before = c.get("/v1/models/c/adaptation").json()["parameter_version"]
            unloaded = c.post("/v2/repository/models/c/unload", json={"parameters": {"snapshot": "kept"}})
            assert unloaded.status_code == 200 and unloaded.json()["snapshot"] == "kept"
            assert _infer(c, server, "c", x).status_code == 404
            index = {e["name"]: e for e in c.post("/v2/repository/index").json()}
            assert index["c"]["state"] == "UNAVAILABLE" and index["c"]["reason"] == "unloaded"
            assert [e["name"] for e in c.post("/v2/repository/index", json={"ready": True}).json()] == ["a", "b"]

            again = c.post("/v2/repository/models/c/load", json={"parameters": {"snapshot": "kept"}})
            assert again.status_code == 200  # the config posted earlier is remembered
            assert c.get("/v1/models/c/adaptation").json()["parameter_version"] == before

            unknown = c.post("/v2/repository/models/zzz/load")
            assert unknown.status_code == 404 and "zzz" in unknown.json()["error"]
            bad = c.post("/v2/repository/models/d/load",
                         json={"parameters": {"config": '{"name": "d", "architecture": "digits", "methd": "x"}'}})
            assert bad.status_code == 400 and "methd" in bad.json()["error"]
            assert c.post("/v2/repository/models/zzz/unload").status_code == 404
    finally:
        stop.set()
        hammer.join()
    assert failed == [] and len(answered) > 10
