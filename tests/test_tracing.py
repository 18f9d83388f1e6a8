"""OpenTelemetry spans along a request, collected with the SDK's in-memory exporter."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from adapters.models.digits import digits_split
from service.http.app import create_app
from service.settings import ModelConfig, Settings

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tracer_provider)  # once per process: the global provider


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_request_is_one_trace_through_decode_queue_batch_adaptation_and_encode():
    _, (x, _) = digits_split()
    settings = Settings(models=[ModelConfig(name="digits", architecture="digits", method="eata", mode="sync",
                                            agreement_fraction=0, probe_every_s=0)])
    with TestClient(create_app(settings)) as client:
        EXPORTER.clear()
        files = [("files", (f"{i}.png", _png(x[i]), "image/png")) for i in range(16)]  # a batch that adapts
        assert client.post("/v1/models/digits/predict", files=files).status_code == 200
        deadline = time.monotonic() + 30  # the step's backward pass ends after the answer went out
        while "batch forward" not in {s.name for s in EXPORTER.get_finished_spans()} and time.monotonic() < deadline:
            time.sleep(0.05)
        spans = EXPORTER.get_finished_spans()
    by_name = {s.name: s for s in spans}
    assert {"predict", "decode", "queue wait", "batch forward", "adaptation step", "encode"} <= set(by_name)
    root = by_name["predict"]
    assert root.attributes["model"] == "digits"
    ours = [by_name[n] for n in ("predict", "decode", "queue wait", "batch forward", "adaptation step", "encode")]
    assert {s.context.trace_id for s in ours} == {root.context.trace_id}  # one trace, across threads
    for name in ("decode", "queue wait", "batch forward", "encode"):
        assert by_name[name].parent.span_id == root.context.span_id, name
    step = by_name["adaptation step"]
    assert step.parent.span_id == by_name["batch forward"].context.span_id
    assert step.attributes["samples_selected"] >= 0 and by_name["batch forward"].attributes["batch_size"] == 16
    wait = by_name["queue wait"]
    assert wait.start_time <= wait.end_time <= by_name["batch forward"].start_time + 1_000_000
