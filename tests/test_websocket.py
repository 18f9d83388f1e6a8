"""The WebSocket predict route in-process (FastAPI's TestClient): order, accuracy, bad frames,
back-pressure and refusals, on the built-in digits model adapting with EATA.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():  # Starlette suggests httpx2 for its TestClient; httpx is what we ship with
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from starlette.websockets import WebSocketDisconnect

from adapters.models.digits import digits_split
from service.engine import ModelEngine
from service.http import routes_ws
from service.http.app import create_app
from service.settings import ModelConfig, Settings

URL = "/v1/models/digits/stream"
PREDICTION_FIELDS = {"seq", "id", "model", "request_id", "label", "class_name", "confidence", "entropy", "top_k",
                     "reliable", "selected", "parameter_version", "divergence"}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(redis_url=None, admin_token=None,
                        models=[ModelConfig(name="digits", architecture="digits", method="eata")])
    with TestClient(create_app(settings)) as c:  # the digits model's cache: conftest's, one per session
        yield c


@pytest.fixture(scope="module")
def digits() -> tuple[list[bytes], np.ndarray]:
    _, (x, y) = digits_split()
    return [png(img) for img in x[:200]], y[:200]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def engine_of(client: TestClient) -> ModelEngine:
    return client.app.state.registry.get("digits")


def stats(client: TestClient) -> routes_ws.WebSocketStats:
    return routes_ws.stats_for(client.app.state)


def wrap_predict(monkeypatch: pytest.MonkeyPatch, engine: ModelEngine, before: Callable[[], object]) -> None:
    """Run the coroutine ``before()`` ahead of every prediction (delays, gates)."""
    real = engine.predict

    async def predict(images):
        await before()
        return await real(images)

    monkeypatch.setattr(engine, "predict", predict)


def test_binary_frames_are_answered_in_order_and_mostly_right(client, digits, monkeypatch):
    blobs, labels = digits
    rng = random.Random(0)
    wrap_predict(monkeypatch, engine_of(client), lambda: asyncio.sleep(rng.uniform(0, 0.02)))  # finish out of order
    n = 160
    with client.websocket_connect(URL) as ws:
        for blob in blobs[:n]:
            ws.send_bytes(blob)
        answers = [ws.receive_json() for _ in range(n)]
    assert [a["seq"] for a in answers] == list(range(n))
    assert set(answers[0]) == PREDICTION_FIELDS and answers[0]["id"] is None and answers[0]["model"] == "digits"
    assert len(answers[0]["top_k"]) == 3 and answers[0]["top_k"][0]["label"] == answers[0]["label"]
    accuracy = np.mean([a["label"] == int(y) for a, y in zip(answers, labels, strict=False)])
    assert accuracy > 0.9, accuracy
    assert all(a["class_name"] == str(a["label"]) for a in answers)
    assert stats(client).peak_in_flight <= routes_ws.MAX_IN_FLIGHT


def test_json_frames_echo_ids_and_bad_frames_keep_the_connection(client, digits):
    blobs, labels = digits
    b64 = [base64.b64encode(b).decode() for b in blobs[:3]]
    frames: list[str | bytes] = [
        json.dumps({"image": b64[0], "id": "first"}),
        b"not an image",
        "not json",
        json.dumps({"id": 7}),
        json.dumps({"image": "%%%", "id": "bad-base64"}),
        json.dumps({"image": f"data:image/png;base64,{b64[1]}", "id": 8, "top_k": 5}),
        blobs[2],
    ]
    with client.websocket_connect(URL) as ws:
        for frame in frames:
            ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_text(frame)
        answers = [ws.receive_json() for _ in frames]
        ws.send_text(json.dumps({"image": b64[2], "id": "after-errors"}))  # still open
        last = ws.receive_json()
    assert [a["seq"] for a in answers] == list(range(len(frames)))
    for i in (0, 5, 6):  # single images: exact labels are the other tests' business
        assert set(answers[i]) == PREDICTION_FIELDS, answers[i]
    assert answers[0]["id"] == "first"
    assert "cannot be decoded as an image" in answers[1]["error"] and answers[1]["id"] is None
    assert "malformed JSON" in answers[2]["error"]
    assert answers[3] == {"seq": 3, "id": None, "error": "image: Field required"}
    assert answers[4]["id"] == "bad-base64" and "not valid base64" in answers[4]["error"]
    assert answers[5]["id"] == 8 and len(answers[5]["top_k"]) == 5
    assert answers[6]["id"] is None
    assert last["seq"] == len(frames) and last["id"] == "after-errors" and "label" in last
    # the request ids are the engine's: delayed feedback works as for /v1 predict
    r = client.post("/v1/models/digits/feedback", json={"labels": {answers[0]["request_id"]: int(labels[0])}})
    assert r.status_code == 200, r.text


def test_reader_stops_at_the_in_flight_bound(client, digits, monkeypatch):
    """While answers are held back, no more than the bound of frames is read; then all come in order."""
    blobs, labels = digits
    limit, n = 4, 24
    monkeypatch.setattr(routes_ws, "MAX_IN_FLIGHT", limit)
    stats(client).peak_in_flight = 0
    gate = threading.Event()

    async def wait_for_gate() -> None:
        while not gate.is_set():
            await asyncio.sleep(0.005)

    wrap_predict(monkeypatch, engine_of(client), wait_for_gate)
    before = stats(client).frames
    with client.websocket_connect(URL) as ws:
        for blob in blobs[:n]:
            ws.send_bytes(blob)
        deadline = time.monotonic() + 10
        while stats(client).frames - before < limit and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # time enough to read more, if the reader did not stop
        assert stats(client).frames - before == limit
        gate.set()
        answers = [ws.receive_json() for _ in range(n)]
    assert [a["seq"] for a in answers] == list(range(n))
    assert np.mean([a["label"] == int(y) for a, y in zip(answers, labels, strict=False)]) > 0.9
    assert stats(client).frames - before == n
    assert stats(client).peak_in_flight == limit


def test_unknown_model_closes_with_1008_and_the_reason(client):
    with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/v1/models/resnet/stream") as ws:
        ws.receive_json()
    assert info.value.code == 1008
    assert "unknown model 'resnet'" in info.value.reason and "digits" in info.value.reason
