"""End to end: a real ``tta-serve serve`` process on a free port, driven over HTTP.

The server serves two models from a YAML config: ``digits`` (EATA) and ``digits-frozen`` (the same
network, method ``source``). The frozen model has no batch dependence, so under concurrent load each
answer must equal the one the same image got alone: the check that every client got its own answer.
The official Triton HTTP client (``tritonclient[http]``) talks to the v2 routes unchanged.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import free_port, serve_command, stop, wait_ready

from adapters.models.digits import digits_split

TOKEN = "e2e-secret"


def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One digits-model cache per test session (shared with test_api), or the caller's TTA_CACHE_DIR."""
    return Path(os.environ.get("TTA_CACHE_DIR") or tmp_path_factory.getbasetemp() / "tta-cache")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a running server; the process is always terminated."""
    config = tmp_path_factory.mktemp("e2e") / "models.yaml"
    config.write_text(
        "models:\n"
        "  - {name: digits, architecture: digits, method: eata, max_delay_ms: 5}\n"
        "  - {name: digits-frozen, architecture: digits, method: source, max_delay_ms: 5}\n"
    )
    port = free_port()
    env = {**os.environ, "TTA_CACHE_DIR": str(_cache_dir(tmp_path_factory)), "TTA_ADMIN_TOKEN": TOKEN,
           "TTA_THREADS": "1"}
    log = config.parent / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command("--config", str(config), "--port", str(port), "--log-level", "warning"),
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, log)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits: uint8 N x 32 x 32 x 3 images and their labels."""
    _, (x, y) = digits_split()
    return x, y


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_predict_files_feedback_adaptation_and_metrics(server, digits):
    x, y = digits
    n = 32
    files = [("files", (f"{i}.png", _png(x[i]), "image/png")) for i in range(n)]
    r = httpx.post(f"{server}/v1/models/digits/predict", files=files, data={"top_k": "2"}, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == n and all(len(p["top_k"]) == 2 for p in preds)
    assert np.mean([p["label"] == t for p, t in zip(preds, y[:n], strict=True)]) >= 0.9

    labels = {p["request_id"]: int(t) for p, t in zip(preds, y[:n], strict=True)}
    denied = httpx.post(f"{server}/v1/models/digits/feedback", json={"labels": labels})
    assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Bearer")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    fb = httpx.post(f"{server}/v1/models/digits/feedback", json={"labels": labels}, headers=auth)
    assert fb.status_code == 200, fb.text
    assert fb.json()["accepted"] == n and fb.json()["feedback_accuracy_ratio"] >= 0.9

    info = httpx.get(f"{server}/v1/models/digits/adaptation").json()
    assert info["method"] == "eata" and info["samples_seen"] >= n and info["health"]["feedback_window_samples"] == n

    metrics = httpx.get(f"{server}/metrics").text
    assert 'tta_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"}' in metrics
    assert 'tta_batch_size_count{model="digits"}' in metrics


def test_the_official_triton_client_works_binary_and_json(server, digits):
    tritonclient_http = pytest.importorskip("tritonclient.http")
    x, y = digits
    n = 40
    client = tritonclient_http.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits-frozen") and client.is_model_ready("digits", "1")
        meta = client.get_model_metadata("digits-frozen")
        assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32] and meta["outputs"][0]["name"] == "probabilities"

        fp32 = (x[:n].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
        answers = []
        for binary_in in (True, False):
            for binary_out in (True, False):
                inp = tritonclient_http.InferInput("images", list(fp32.shape), "FP32")
                inp.set_data_from_numpy(fp32, binary_data=binary_in)
                out = tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary_out)
                result = client.infer("digits-frozen", [inp], outputs=[out], request_id="req-1")
                probs = result.as_numpy("probabilities")
                assert probs.shape == (n, 10) and result.get_response()["id"] == "req-1"
                answers.append(probs)
        # no requested outputs: the client asks for binary outputs; UINT8 NHWC input
        inp = tritonclient_http.InferInput("images", [n, 32, 32, 3], "UINT8")
        inp.set_data_from_numpy(x[:n])
        answers.append(client.infer("digits-frozen", [inp]).as_numpy("probabilities"))
        for probs in answers:
            np.testing.assert_allclose(probs, answers[0], atol=1e-5)
        assert (answers[0].argmax(1) == y[:n]).mean() >= 0.95

        bad = tritonclient_http.InferInput("images", [1, 3, 16, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        with pytest.raises(tritonclient_http.InferenceServerException, match=r"\[-1, 3, 32, 32\]"):
            client.infer("digits-frozen", [bad])
    finally:
        client.close()


def test_triton_classification_and_encoded_images_with_the_official_client(server, digits):
    """Triton's classification extension ("score:index:label" strings) and BYTES inputs of PNG files,
    binary and JSON, with ``tritonclient[http]`` unchanged."""
    import tritonclient.http as tritonclient_http

    x, y = digits
    n = 12
    pngs = []
    for image in x[:n]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    client = tritonclient_http.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    try:
        assert "classification" in client.get_server_metadata()["extensions"]
        reference = tritonclient_http.InferInput("images", [n, 32, 32, 3], "UINT8")
        reference.set_data_from_numpy(x[:n])
        probs = client.infer("digits-frozen", [reference]).as_numpy("probabilities")
        for binary in (True, False):
            out = tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
            inp = tritonclient_http.InferInput("images", [n, 32, 32, 3], "UINT8")
            inp.set_data_from_numpy(x[:n])
            top = client.infer("digits-frozen", [inp], outputs=[out]).as_numpy("probabilities")
            assert top.shape == (n, 3)
            for row, expected in zip(top, probs, strict=True):
                first = row[0].decode() if isinstance(row[0], bytes) else row[0]  # binary: bytes; JSON: str
                score, index, label = first.split(":")
                assert int(index) == expected.argmax() and label == str(expected.argmax())
                assert float(score) == pytest.approx(expected.max(), abs=1e-6)

        encoded = tritonclient_http.InferInput("images", [n], "BYTES")
        encoded.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
        from_png = client.infer("digits-frozen", [encoded]).as_numpy("probabilities")
        np.testing.assert_allclose(from_png, probs, atol=1e-5)  # PNG is lossless: the same images
        assert (from_png.argmax(1) == y[:n]).mean() >= 0.9

        broken = tritonclient_http.InferInput("images", [1], "BYTES")
        broken.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_), binary_data=True)
        with pytest.raises(tritonclient_http.InferenceServerException, match="cannot be decoded"):
            client.infer("digits-frozen", [broken])
    finally:
        client.close()

    # JSON: base64 strings of the same files, and the classification strings as JSON data
    body = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                        "data": [base64.b64encode(png).decode() for png in pngs[:2]]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}
    answer = httpx.post(f"{server}/v2/models/digits-frozen/infer", json=body, timeout=60).json()
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 2] and len(output["data"]) == 4
    assert int(output["data"][0].split(":")[1]) == probs[0].argmax()
    for bad in (0, "three", True):
        body["outputs"][0]["parameters"]["classification"] = bad
        refused = httpx.post(f"{server}/v2/models/digits-frozen/infer", json=body, timeout=60)
        assert refused.status_code == 400 and "classification must be a positive integer" in refused.json()["error"]


def _infer_one(base: str, image: np.ndarray, model: str, client: httpx.Client) -> tuple[np.ndarray, str]:
    """One image through the v2 binary path; (probabilities, request id)."""
    header = (
        '{"inputs":[{"name":"images","shape":[1,32,32,3],"datatype":"UINT8",'
        f'"parameters":{{"binary_data_size":{image.nbytes}}}}}],"parameters":{{"binary_data_output":true}}}}'
    ).encode()
    r = client.post(
        f"{base}/v2/models/{model}/infer",
        content=header + image.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    meta = httpx.Response(200, content=r.content[:length]).json()
    probs = np.frombuffer(r.content[length:], dtype="<f4").reshape(meta["outputs"][0]["shape"])
    return probs[0], meta["parameters"]["request_ids"]


@pytest.mark.parametrize("model", ["digits-frozen", "digits"])
def test_concurrent_clients_each_get_their_own_answer(server, digits, model):
    x, y = digits
    clients, per_client = 6, 20
    order = np.random.default_rng(0).permutation(len(x))[: clients * per_client].reshape(clients, per_client)
    with httpx.Client(timeout=60) as c:
        alone = {int(i): _infer_one(server, x[i], "digits-frozen", c)[0] for i in order.ravel()}

    def client_run(indices: np.ndarray) -> list[tuple[int, np.ndarray, str]]:
        with httpx.Client(timeout=60) as c:
            return [(int(i), *_infer_one(server, x[i], model, c)) for i in indices]

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client_run, order))

    assert [len(r) for r in results] == [per_client] * clients
    ids = [rid for r in results for _, _, rid in r]
    assert len(set(ids)) == len(ids)
    answers = [(i, probs) for r in results for i, probs, _ in r]
    if model == "digits-frozen":  # no batch dependence: identical to the image's answer alone
        for i, probs in answers:
            np.testing.assert_allclose(probs, alone[i], atol=1e-5)
    accuracy = np.mean([probs.argmax() == y[i] for i, probs in answers])
    assert accuracy >= 0.95, accuracy


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, digits):
    x, _ = digits
    bad = [
        httpx.post(f"{server}/v2/models/nope/infer", json={"inputs": []}),
        httpx.post(f"{server}/v2/models/digits/infer", content=b"{not json",
                   headers={"Content-Type": "application/json"}),
        httpx.post(f"{server}/v1/models/digits/predict", files=[("files", ("x.png", b"not an image", "image/png"))]),
        httpx.post(f"{server}/v1/models/digits/feedback", json={"labels": {"nope": 1}},
                   headers={"Authorization": f"Bearer {TOKEN}"}),
    ]
    assert [r.status_code for r in bad] == [404, 400, 400, 404]
    assert all(set(r.json()) == {"error"} for r in bad)
    r = httpx.post(f"{server}/v1/models/digits-frozen/predict", files=[("files", ("a.png", _png(x[0]), "image/png"))])
    assert r.status_code == 200


def test_cli_exits_2_with_a_message_for_bad_configuration(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: m, architecture: resnet20, method: nope}\n")
    env = {**os.environ, "TTA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run(serve_command("--config", str(bad)), capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "models.0" in run.stderr
    missing = subprocess.run(
        serve_command("--architecture", "resnet20", "--weights", str(tmp_path / "missing.th")),
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert missing.returncode == 2 and "resnet20" in missing.stderr


def test_json_logs_carry_the_request_id_the_response_returns(tmp_path):
    """``TTA_LOG_FORMAT=json``: one JSON object per line; a request's lines carry its X-Request-Id."""
    port = free_port()
    log = tmp_path / "server.log"
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: digits\n    architecture: digits\n    method: source\n")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command("--config", str(config), "--port", str(port), "--log-level", "info"),
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TTA_THREADS": "1", "TTA_LOG_FORMAT": "json"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        given = httpx.get(f"{base}/v2/models/digits", headers={"X-Request-Id": "camera-7.frame-42"})
        made = httpx.post(f"{base}/v2/models/digits/infer", json={"inputs": [
            {"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}]})
        junk = httpx.get(f"{base}/v2/models/digits", headers={"X-Request-Id": "no spaces allowed"})
    finally:
        stop(proc)
    assert given.headers["x-request-id"] == "camera-7.frame-42"
    assert made.status_code == 200 and len(made.headers["x-request-id"]) == 32  # made up when not given
    assert junk.headers["x-request-id"] != "no spaces allowed"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message", "request_id"} <= set(entry) for entry in lines)
    ids = {entry["request_id"] for entry in lines if entry["logger"] == "uvicorn.access"}
    assert {"camera-7.frame-42", made.headers["x-request-id"]} <= ids
