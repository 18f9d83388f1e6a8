"""The HTTP API in-process (FastAPI's TestClient over httpx): routes, errors, limits, auth, metrics.

One app serves ``digits`` (EATA, at most 8 images per request) and ``digits-frozen`` (``source``,
deterministic, used wherever an exact answer is checked).
"""

from __future__ import annotations

import base64
import io
import json
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from helpers import small_bn_cnn
from PIL import Image

with warnings.catch_warnings():  # Starlette suggests httpx2 for its TestClient; httpx is what we ship with
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from adapters.models.digits import digits_split
from service.engine import EngineRegistry, ModelEngine
from service.http.app import create_app
from service.metrics import ServiceMetrics
from service.model_sources import LoadedModel
from service.preprocess import decode_image
from service.settings import ModelConfig, Settings

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 4 * 1024 * 1024
MAX_PIXELS = 300 * 300


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(
        admin_token=TOKEN,
        max_body_bytes=MAX_BODY,
        max_image_pixels=MAX_PIXELS,
        models=[
            ModelConfig(name="digits", architecture="digits", method="eata", max_images_per_request=8),
            ModelConfig(name="digits-frozen", architecture="digits", method="source"),
        ],
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:  # the digits model's cache: conftest's, one per session
        yield c


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    _, (x, y) = digits_split()
    return x, y


def encode(pixels: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kwargs)
    return buf.getvalue()


def v2_json(x: np.ndarray, datatype: str = "UINT8", **extra) -> dict:
    return {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}],
            **extra}


def v2_binary(x: np.ndarray, datatype: str = "UINT8", **extra) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": x.nbytes}}], **extra}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def error_of(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


# ------------------------------------------------------------------------------------ health and metadata
def test_health_metadata_and_docs(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True, "status": "ok"}
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    meta = client.get("/v2/models/digits").json()
    assert meta == {
        "name": "digits", "versions": ["1"], "platform": "tta-serve-pytorch",
        "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get("/v2/models/digits/versions/1").json() == meta
    assert client.get("/v2/models/digits/ready").status_code == 200
    assert "no version '7'" in error_of(client.get("/v2/models/digits/versions/7/ready"))
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["digits", "digits-frozen"] and models[0]["classes"][3] == "3"
    schema = client.get("/openapi.json").json()
    assert "/v2/models/{name}/infer" in schema["paths"] and "InferRequest" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_unknown_model_is_404_naming_the_served_models(client):
    for r in (client.get("/v2/models/resnet"), client.post("/v2/models/resnet/infer", json={}),
              client.post("/v1/models/resnet/feedback", json={"labels": {"a": 1}}, headers=AUTH)):
        assert r.status_code == 404
        assert "served models: ['digits', 'digits-frozen']" in error_of(r)
    assert client.post("/v1/models/..%2F..%2Fetc/predict", json={"images": []}).status_code == 404
    assert error_of(client.get("/nowhere")) == "Not Found"


def test_readiness_is_503_until_every_engine_runs(settings):
    config = ModelConfig(name="tiny", factory="helpers:small_bn_cnn", input_size=(8, 8), method="source")
    engine = ModelEngine(config, LoadedModel(small_bn_cnn(), [str(i) for i in range(10)], None),
                         device=torch.device("cpu"))
    client = TestClient(create_app(settings, EngineRegistry([engine])))  # no lifespan: never started
    assert client.get("/v2/health/live").status_code == 200
    r = client.get("/v2/health/ready")
    assert r.status_code == 503 and "tiny" in error_of(r)
    assert client.get("/v2/models/tiny/ready").status_code == 503
    assert client.post("/v2/models/tiny/infer", json={}).status_code == 503


# ------------------------------------------------------------------------------------ v2 inference
def test_v2_json_uint8_and_fp32_agree_and_classify(client, digits):
    x, y = digits
    n = 48
    r = client.post("/v2/models/digits-frozen/infer", json=v2_json(x[:n], id="abc"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "digits-frozen" and body["model_version"] == "1" and body["id"] == "abc"
    out = body["outputs"][0]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [n, 10]
    probs = np.array(out["data"]).reshape(n, 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs.argmax(1) == y[:n]).mean() >= 0.95
    assert len(body["parameters"]["request_ids"].split(",")) == n

    fp32 = (x[:n].transpose(0, 3, 1, 2) / 255).astype(np.float32)
    r2 = client.post("/v2/models/digits-frozen/infer", json=v2_json(fp32, "FP32"))
    np.testing.assert_allclose(np.array(r2.json()["outputs"][0]["data"]).reshape(n, 10), probs, atol=1e-5)


def test_v2_binary_request_and_binary_response(client, digits):
    x, _ = digits
    n = 16
    expected = np.array(client.post("/v2/models/digits-frozen/infer", json=v2_json(x[:n])).json()
                        ["outputs"][0]["data"]).reshape(n, 10)
    fp32 = (x[:n].transpose(0, 3, 1, 2) / 255).astype(np.float32)
    for binary_request in (
        v2_binary(fp32, "FP32", outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}]),
        v2_binary(x[:n], "UINT8", parameters={"binary_data_output": True}),
    ):
        content, headers = binary_request
        r = client.post("/v2/models/digits-frozen/infer", content=content, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        length = int(r.headers["inference-header-content-length"])
        header = json.loads(r.content[:length])
        assert header["outputs"][0]["parameters"]["binary_data_size"] == n * 10 * 4
        got = np.frombuffer(r.content[length:], "<f4").reshape(header["outputs"][0]["shape"])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # binary input, JSON output
    content, headers = v2_binary(x[:n], outputs=[{"name": "probabilities"}])
    r = client.post("/v2/models/digits-frozen/infer", content=content, headers=headers)
    assert r.headers["content-type"] == "application/json"
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(n, 10), expected, atol=1e-5)


def test_v2_gzip_request_body(client, digits):
    import gzip

    x, _ = digits
    content, headers = v2_binary(x[:2])
    r = client.post("/v2/models/digits-frozen/infer", content=gzip.compress(content),
                    headers={**headers, "Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    bomb = gzip.compress(b"\0" * (MAX_BODY * 4))
    r = client.post("/v2/models/digits/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": []}, 400, "exactly one input tensor"),
        ({"inputs": [{"name": "a", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [0] * 3072}] * 2}, 400,
         "exactly one input tensor ('images'), got 2: ['a', 'a']"),
        ({"inputs": [{"name": "i", "shape": [1, 3, 32, 32], "datatype": "INT64", "data": [0] * 3072}]}, 400,
         "datatype 'INT64' is not supported"),
        ({"inputs": [{"name": "i", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": [0] * 2352}]}, 400,
         "FP32 input must have shape [-1, 3, 32, 32] (NCHW, N >= 1), got [1, 3, 28, 28]"),
        ({"inputs": [{"name": "i", "shape": [1, 3, 32, 32], "datatype": "UINT8", "data": [0] * 3072}]}, 400,
         "UINT8 input must have shape [-1, 32, 32, 3] (NHWC, N >= 1), got [1, 3, 32, 32]"),
        ({"inputs": [{"name": "i", "shape": [3072], "datatype": "FP32", "data": [0] * 3072}]}, 400, "got [3072]"),
        ({"inputs": [{"name": "i", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3000}]}, 400,
         "data has 3000 values but shape [1, 3, 32, 32] needs 3072"),
        ({"inputs": [{"name": "i", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [256] * 3072}]}, 400,
         "UINT8 data must be integers in 0..255"),
        ({"inputs": [{"name": "i", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ["x"] * 3072}]}, 400,
         "data must be a list of numbers"),
        ({"inputs": [{"name": "i", "shape": [1, 3, 32, 32], "datatype": "FP32"}]}, 400, "neither 'data'"),
        ({"inputs": [{"name": "i", "shape": [9, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 9 * 3072}]}, 400,
         "9 images in one request; the limit is 8"),
        ({"inputs": [{"name": "i", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}],
          "outputs": [{"name": "logits"}]}, 400, "unknown output 'logits'"),
        ({"inputs": [{"name": "i", "datatype": "FP32"}]}, 422, "inputs.0.shape: Field required"),
    ],
)
def test_v2_bad_tensors_are_4xx_naming_the_problem(client, body, status, message):
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == status, r.text
    assert message in error_of(r)


def test_v2_nan_inf_and_malformed_bodies(client, digits):
    for literal in ("NaN", "Infinity", "-Infinity"):
        data = ",".join(["0.5"] * 3071 + [literal])
        body = '{"inputs":[{"name":"i","shape":[1,3,32,32],"datatype":"FP32","data":[' + data + "]}]}"
        r = client.post("/v2/models/digits/infer", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "NaN or infinite" in error_of(r)
    nan = np.full((1, 3, 32, 32), np.nan, np.float32)
    content, headers = v2_binary(nan, "FP32")
    assert "NaN or infinite" in error_of(client.post("/v2/models/digits/infer", content=content, headers=headers))

    r = client.post("/v2/models/digits/infer", content=b'{"inputs": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in error_of(r)

    x, _ = digits
    content, headers = v2_binary(x[:1])
    short = client.post("/v2/models/digits/infer", content=content[:-10], headers=headers)
    assert short.status_code == 400 and "binary_data_size is 3072 but 3062 bytes" in error_of(short)
    wrong = client.post("/v2/models/digits/infer", content=content,
                        headers={"Inference-Header-Content-Length": "nine"})
    assert "must be an integer" in error_of(wrong)
    beyond = client.post("/v2/models/digits/infer", content=content,
                         headers={"Inference-Header-Content-Length": str(len(content) + 1)})
    assert beyond.status_code == 400
    stray = client.post("/v2/models/digits/infer", content=json.dumps(v2_json(x[:1])).encode() + b"\0" * 8,
                        headers={"Inference-Header-Content-Length": str(len(json.dumps(v2_json(x[:1]))))})
    assert stray.status_code == 400 and "no input sets parameters.binary_data_size" in error_of(stray)


# ------------------------------------------------------------------------------------ limits
def test_json_inference_bodies_have_their_own_smaller_limit_and_binary_ones_do_not(settings, client):
    max_json = 256 * 1024
    x = np.full((8, 3, 32, 32), 0.123456789, np.float32)  # about 100 KB as binary, 300 KB as JSON text
    body = json.dumps(v2_json(x, "FP32"))
    assert max_json < len(body) < MAX_BODY
    with TestClient(create_app(settings.model_copy(update={"max_json_body_bytes": max_json}))) as small:
        r = small.post("/v2/models/digits/infer", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert f"the limit is {max_json} (max_json_body_bytes)" in error_of(r) and "binary" in error_of(r)
        content, headers = v2_binary(x, "FP32")
        assert small.post("/v2/models/digits/infer", content=content, headers=headers).status_code == 200
    assert client.post("/v2/models/digits/infer", content=body, headers={"Content-Type": "application/json"}) \
        .status_code == 200  # under the default limit


def test_body_over_the_limit_is_413_declared_or_chunked(client):
    big = b"0" * (MAX_BODY + 1)
    r = client.post("/v2/models/digits/infer", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and str(MAX_BODY) in error_of(r)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"0" * 4096

    r = client.post("/v1/models/digits/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    files = [("files", (f"{i}.png", b"0" * (MAX_BODY // 8 + 1), "image/png")) for i in range(8)]
    assert client.post("/v1/models/digits/predict", files=files).status_code == 413
    assert client.get("/v2/health/ready").status_code == 200  # and it keeps serving


# ------------------------------------------------------------------------------------ v1 predict
def test_v1_predict_multipart_png_and_jpeg(client, digits):
    x, y = digits
    files = [("files", ("a.png", encode(x[0]), "image/png")), ("files", ("b.jpg", encode(x[1], "JPEG", quality=95),
                                                                          "image/jpeg"))]
    r = client.post("/v1/models/digits-frozen/predict", files=files, data={"top_k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "digits-frozen"
    first, second = body["predictions"]
    assert set(first) == {"request_id", "label", "class_name", "confidence", "entropy", "top_k", "reliable",
                          "selected", "parameter_version", "divergence"}
    assert first["divergence"] is None  # a frozen model has no model divergence
    assert first["label"] == y[0] and second["label"] == y[1] and first["class_name"] == str(y[0])
    assert len(first["top_k"]) == 4 and first["top_k"][0]["label"] == first["label"]
    assert first["top_k"][0]["probability"] == pytest.approx(first["confidence"])
    assert first["request_id"] != second["request_id"]


def test_v1_predict_base64_json(client, digits):
    x, y = digits
    png = base64.b64encode(encode(x[0])).decode()
    r = client.post("/v1/models/digits-frozen/predict",
                    json={"images": [png, "data:image/png;base64," + png], "top_k": 50})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == [y[0], y[0]] and len(preds[0]["top_k"]) == 10
    # the adapting model reports selection and the adapter's parameter version
    r = client.post("/v1/models/digits/predict", json={"images": [png] * 8})
    assert r.status_code == 200
    assert all(isinstance(p["parameter_version"], int) for p in r.json()["predictions"])


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"json": {"images": ["not base64!"]}}, 400, "images[0] is not valid base64"),
        ({"json": {"images": [base64.b64encode(b"hello").decode()]}}, 400, "images[0] cannot be decoded"),
        ({"json": {"images": []}}, 400, "no images in the request"),
        ({"json": {"images": ["AAAA"] * 9}}, 400, "9 images in one request; the limit is 8"),
        ({"json": {"images": ["AAAA"], "top_k": 0}}, 422, "top_k"),
        ({"json": {"pictures": []}}, 422, "images: Field required"),
        ({"files": [("files", ("x.png", b"garbage", "image/png"))]}, 400, "file x.png cannot be decoded"),
        ({"files": [("other", ("x.png", b"garbage", "image/png"))]}, 400, "no image files in the 'files' field"),
        ({"files": [("files", ("x.png", b"garbage", "image/png"))] * 9}, 400, "Too many files"),
        ({"files": [("files", ("x.png", b"garbage", "image/png"))], "data": {"top_k": "many"}}, 400, "top_k"),
        ({"content": b"raw", "headers": {"Content-Type": "image/png"}}, 415, "unsupported content type"),
    ],
)
def test_v1_predict_bad_input_is_4xx_naming_the_problem(client, kwargs, status, message):
    r = client.post("/v1/models/digits/predict", **kwargs)
    assert r.status_code == status, r.text
    assert message in error_of(r)


def test_oversized_images_are_refused_before_decoding(client):
    big = encode(np.zeros((400, 400, 3), np.uint8))
    r = client.post("/v1/models/digits/predict", files=[("files", ("big.png", big, "image/png"))])
    assert r.status_code == 413 and "400x400 pixels; the limit is 90000" in error_of(r)
    truncated = encode(np.full((64, 64, 3), 128, np.uint8), "JPEG")[:200]
    r = client.post("/v1/models/digits/predict", files=[("files", ("t.jpg", truncated, "image/jpeg"))])
    assert r.status_code == 400 and "cannot be decoded" in error_of(r)


def test_decode_applies_exif_orientation_and_resizes():
    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall: left half red, right half blue
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", exif=exif)
    upright = decode_image(buf.getvalue(), (40, 20), 10**6)
    assert upright.shape == (40, 20, 3)
    assert upright[:20, :, 0].mean() > 200 and upright[20:, :, 2].mean() > 200  # the left half is now on top
    gray = encode(np.full((64, 48), 200, np.uint8))
    assert decode_image(gray, (32, 32), 10**6).shape == (32, 32, 3)


# ------------------------------------------------------------------------------------ admin routes
def test_admin_routes_need_the_bearer_token(client):
    for method, path, body in [
        ("post", "/v1/models/digits/reset", None),
        ("post", "/v1/models/digits/feedback", {"labels": {"x": 1}}),
        ("post", "/v1/models/digits/snapshots", {"name": "s"}),
        ("post", "/v1/models/digits/snapshots/s/restore", None),
    ]:
        missing = client.request(method, path, json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert "missing" in error_of(missing)
        wrong = client.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "invalid bearer token" in error_of(wrong)
        basic = client.request(method, path, json=body, headers={"Authorization": "Basic abc"})
        assert basic.status_code == 401
    assert client.get("/v1/models/digits/snapshots").status_code == 200  # reading is open


def test_admin_routes_are_open_without_a_configured_token(client, settings):
    client.app.state.settings = settings.model_copy(update={"admin_token": None})
    try:
        assert client.post("/v1/models/digits-frozen/reset").status_code == 200
    finally:
        client.app.state.settings = settings


def test_feedback_updates_online_accuracy(client, digits):
    x, y = digits
    n = 20
    r = client.post("/v2/models/digits-frozen/infer", json=v2_json(x[:n]))
    ids = r.json()["parameters"]["request_ids"].split(",")
    labels: dict[str, int | str] = {rid: int(t) for rid, t in zip(ids[:-1], y[: n - 1], strict=True)}
    labels[ids[-1]] = str(y[n - 1])  # a class name works too
    fb = client.post("/v1/models/digits-frozen/feedback", json={"labels": labels}, headers=AUTH)
    assert fb.status_code == 200, fb.text
    body = fb.json()
    assert body["accepted"] == n and body["feedback_window_samples"] >= n and body["feedback_accuracy_ratio"] >= 0.9
    assert 0 <= body["feedback_ece_ratio"] <= 1  # ratios, as in the health snapshot and the metrics
    again = client.post("/v1/models/digits-frozen/feedback", json={"labels": {ids[0]: 1, "bogus": 2}}, headers=AUTH)
    assert again.status_code == 404 and "bogus" in error_of(again) and ids[0] in error_of(again)

    fresh = client.post("/v2/models/digits-frozen/infer", json=v2_json(x[:1])).json()["parameters"]["request_ids"]
    for label, message in [(10, "out of range 0..9"), (-1, "out of range"), ("cat", "unknown class name 'cat'")]:
        r = client.post("/v1/models/digits-frozen/feedback", json={"labels": {fresh: label}}, headers=AUTH)
        assert r.status_code == 400 and message in error_of(r)
    empty = client.post("/v1/models/digits-frozen/feedback", json={"labels": {}}, headers=AUTH)
    assert empty.status_code == 422 and "labels" in error_of(empty)


def test_adaptation_reset_and_snapshots(client, digits):
    x, _ = digits
    for start in range(0, 32, 8):  # full batches adapt in sync mode
        assert client.post("/v2/models/digits/infer", json=v2_json(x[start : start + 8])).status_code == 200
    info = client.get("/v1/models/digits/adaptation").json()
    for key in ("method", "options", "steps", "samples_seen", "samples_reliable", "samples_selected", "resets",
                "adapt_dropped_samples", "health"):
        assert key in info
    for key in ("entropy_ema_nats", "parameter_drift_ratio", "parameter_version", "feedback_accuracy_ratio"):
        assert key in info["health"]  # each number once, under its metric's name
    assert not {"entropy_ema", "parameter_drift", "e0", "online"} & set(info)
    assert info["method"] == "eata" and info["samples_seen"] > 0

    saved = client.post("/v1/models/digits/snapshots", json={"name": "before-reset"}, headers=AUTH)
    assert saved.status_code == 201 and saved.json()["name"] == "before-reset"
    assert client.post("/v1/models/digits/reset", headers=AUTH).json() == {"model": "digits", "reset": True}
    after = client.get("/v1/models/digits/adaptation").json()
    assert after["resets"].get("manual", 0) >= 1 and after["health"]["parameter_drift_ratio"] == 0
    listed = client.get("/v1/models/digits/snapshots").json()["snapshots"]
    assert [s["name"] for s in listed] == ["before-reset"]
    restored = client.post("/v1/models/digits/snapshots/before-reset/restore", headers=AUTH)
    assert restored.status_code == 200 and restored.json()["restored"]["name"] == "before-reset"

    missing = client.post("/v1/models/digits/snapshots/nope/restore", headers=AUTH)
    assert missing.status_code == 404 and "no snapshot named 'nope'" in error_of(missing)
    for bad in ("../etc", "", "a" * 65, "-x"):
        r = client.post("/v1/models/digits/snapshots", json={"name": bad}, headers=AUTH)
        assert r.status_code == 422 and "name" in error_of(r)


# ------------------------------------------------------------------------------------ metrics
def test_metrics_use_route_templates_and_count_batches(client, digits):
    x, _ = digits
    client.post("/v2/models/digits-frozen/infer", json=v2_json(x[:3]))
    client.get("/v2/models/not-a-model")
    client.post("/v1/models/digits/reset", headers=AUTH)
    text = client.get("/metrics").text
    assert 'tta_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}' in text
    assert 'route="/v2/models/{name}",status="404"' in text
    assert "not-a-model" not in text  # raw paths never become labels
    assert 'tta_request_duration_seconds_bucket{le="0.005",route="/v2/models/{name}/infer"}' in text
    assert 'tta_batch_size_count{model="digits-frozen"}' in text
    assert 'tta_resets_total{model="digits",reason="manual"}' in text
    for name in ("tta_batch_duration_seconds", "tta_adapt_dropped_samples_total", "tta_queue_depth_images"):
        assert f"# TYPE {name}" in text


def test_infer_requests_are_counted_once_by_route_whether_or_not_the_fast_path_answers(client, digits):
    def count(route: str, status: int) -> float:
        line = f'tta_requests_total{{method="POST",route="{route}",status="{status}"}} '
        text = client.get("/metrics").text
        return next((float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)), 0.0)

    plain, versioned = "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"
    before = {(r, s): count(r, s) for r in (plain, versioned) for s in (200, 400)}
    x, _ = digits
    content, headers = v2_binary(x[:2])
    assert client.post("/v2/models/digits/infer", content=content, headers=headers).status_code == 200
    assert client.post("/v2/models/digits/versions/1/infer", content=content, headers=headers).status_code == 200
    bad = client.post("/v2/models/digits/infer", content=content[:-1], headers=headers)  # refused, then replayed
    assert bad.status_code == 400 and "binary_data_size is 6144 but 6143 bytes" in error_of(bad)
    after = {key: count(*key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        (plain, 200): 1, (plain, 400): 1, (versioned, 200): 1, (versioned, 400): 0}


def test_service_metrics_registries_are_independent():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.observe_request("/x", "GET", 200, 0.01)
    a.on_reset("m", "manual")
    assert b"tta_requests_total{" in a.render() and b"tta_requests_total{" not in b.render()


def test_a_model_fault_is_a_500_naming_only_its_type_and_the_server_keeps_serving():
    # PyTorch on purpose: the model raises from Python, which an exported (or traced) graph would not keep.
    settings = Settings(models=[ModelConfig(name="fragile", factory="helpers:exploding_cnn", input_size=(8, 8),
                                            method="source", trace_source=False, runtime="torch",
                                            classes=[str(i) for i in range(10)])])
    with TestClient(create_app(settings)) as c:
        x = np.full((1, 3, 8, 8), 0.5, np.float32)
        content, headers = v2_binary(x, "FP32")
        assert c.post("/v2/models/fragile/infer", content=content, headers=headers).status_code == 200
        x[0, 0, 0, 0] = 1.0
        content, headers = v2_binary(x, "FP32")
        r = c.post("/v2/models/fragile/infer", content=content, headers=headers)
        assert r.status_code == 500 and error_of(r) == "internal error: RuntimeError"  # no details leak
        x[0, 0, 0, 0] = 0.5
        content, headers = v2_binary(x, "FP32")
        assert c.post("/v2/models/fragile/infer", content=content, headers=headers).status_code == 200
        assert 'route="/v2/models/{name}/infer",status="500"} 1.0' in c.get("/metrics").text


def test_a_non_ascii_binary_header_length_is_a_400(client, digits):
    x, _ = digits
    content, _ = v2_binary(x[:1])
    r = client.post("/v2/models/digits/infer", content=content,
                    headers={"Inference-Header-Content-Length": "1\xe9".encode("latin-1")})
    assert r.status_code == 400 and "must be an integer" in error_of(r)
