"""Monitoring: a scripted drifting stream through the app moves the health metrics the right way.

One app (FastAPI's TestClient) serves ``digits`` (EATA; every batch checked against the frozen
ONNX source model; probe on demand) and ``collapse`` (EATA with a tight class-collapse guard). The
stream: 4 clean batches, then 8 frost-5 batches, then delayed labels for all of them. Snapshots of
``/metrics`` and ``/v1/models/{name}/adaptation`` are taken after each phase and checked below.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

with warnings.catch_warnings():  # Starlette suggests httpx2 for its TestClient; httpx is what we ship with
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

import adapters
from adapters.corruptions import corrupt
from adapters.models.digits import digits_split
from service.health import PredictionWindow, SourceAgreement
from service.http.app import create_app
from service.metrics import ServiceMetrics
from service.settings import ModelConfig, Settings
from service.v2_client import binary_request, parse_response

BATCH = 64
CLEAN_BATCHES, FROST_BATCHES = 4, 8
WINDOW = 256  # health window: holds exactly the last 4 batches, so each phase is read on its own
Samples = dict[tuple[str, frozenset], float]


def scrape(client: TestClient) -> Samples:
    text = client.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported"
    return samples[key]


def infer(client: TestClient, model: str, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    body, headers = binary_request(images)
    probs, meta = parse_response(client.post(f"/v2/models/{model}/infer", content=body, headers=headers))
    return probs, meta["parameters"]["request_ids"].split(",")


@pytest.fixture(scope="module")
def run(shared) -> Iterator[dict[str, Any]]:
    """Drive the scripted stream once; the tests read the recorded snapshots."""
    _, (x, y) = digits_split()
    n_clean, n_frost = CLEAN_BATCHES * BATCH, FROST_BATCHES * BATCH
    stream_x = np.concatenate([x[:n_clean], corrupt(x[:n_frost], "frost", 5)])
    stream_y = np.concatenate([y[:n_clean], y[:n_frost]])
    settings = Settings(models=[
        ModelConfig(name="digits", architecture="digits", method="eata", agreement_fraction=1.0,
                    health_window=WINDOW, probe_every_s=0, max_delay_ms=0),
        ModelConfig(name="collapse", architecture="digits", method="eata", agreement_fraction=0, probe_every_s=0,
                    options={"guard": {"enabled": True, "window": BATCH, "max_class_fraction": 0.6, "min_steps": 1}}),
    ])
    record: dict[str, Any] = {"y": stream_y}
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.registry.get("digits")
        assert engine.monitor.agreement is not None
        engine.monitor.agreement.ready.result(60)  # the ONNX export runs at start-up, off the request path

        def phase(name: str, images: np.ndarray) -> None:
            for i in range(0, len(images), BATCH):
                probs, ids = infer(client, "digits", images[i : i + BATCH])
                record.setdefault("probs", []).append(probs)
                record.setdefault("ids", []).extend(ids)
            engine.monitor.agreement.wait_idle()
            record[name] = scrape(client)

        phase("clean", stream_x[:n_clean])
        phase("frost", stream_x[n_clean:])
        labels = {rid: int(t) for rid, t in zip(record["ids"], stream_y, strict=True)}
        record["feedback"] = client.post("/v1/models/digits/feedback", json={"labels": labels}).json()
        record["probe"] = client.portal.call(engine.evaluate_probe)

        # A crafted collapse: 64 copies of one image have zero batch variance, so batch-statistics BN
        # maps them all to one class and the guard resets with reason class_collapse.
        infer(client, "collapse", np.repeat(x[:1], BATCH, axis=0))
        record["collapse_info"] = client.get("/v1/models/collapse/adaptation").json()

        record["info"] = client.get("/v1/models/digits/adaptation").json()
        record["end"] = scrape(client)
        yield record


DIGITS = {"model": "digits", "method": "eata"}


def test_selection_counters_nest_and_match_the_stream(run):
    end = run["end"]
    seen = metric(end, "tta_adapt_samples_seen_total", **DIGITS)
    reliable = metric(end, "tta_adapt_samples_reliable_total", **DIGITS)
    selected = metric(end, "tta_adapt_samples_selected_total", **DIGITS)
    assert seen == (CLEAN_BATCHES + FROST_BATCHES) * BATCH
    assert selected <= reliable <= seen and selected < seen
    assert metric(end, "tta_adapt_steps_total", **DIGITS) == CLEAN_BATCHES + FROST_BATCHES
    assert metric(end, "tta_prediction_entropy_nats_count", **DIGITS) == seen  # every served prediction
    assert metric(end, "tta_prediction_confidence_ratio_count", **DIGITS) == seen
    info = run["info"]
    assert (info["samples_seen"], info["samples_reliable"], info["samples_selected"]) == (seen, reliable, selected)


def test_drift_raises_entropy_and_lowers_confidence_and_source_agreement(run):
    clean, frost = run["clean"], run["frost"]
    ln_c = math.log(10)
    assert metric(clean, "tta_model_classes", **DIGITS) == 10
    assert metric(clean, "tta_entropy_margin_nats", **DIGITS) == pytest.approx(0.4 * ln_c)
    assert metric(frost, "tta_entropy_ema_nats", **DIGITS) > metric(clean, "tta_entropy_ema_nats", **DIGITS)
    assert metric(frost, "tta_mean_confidence_ratio", **DIGITS) < metric(clean, "tta_mean_confidence_ratio", **DIGITS)
    # Batch statistics vs running statistics differ a little even on clean data: high, not exactly 1.
    clean_agreement = metric(clean, "tta_source_agreement_ratio", **DIGITS)
    assert 0.9 <= clean_agreement <= 1.0
    assert 0.0 <= metric(frost, "tta_source_agreement_ratio", **DIGITS) < clean_agreement
    assert metric(clean, "tta_source_agreement_up", **DIGITS) == 1
    checked = metric(run["end"], "tta_source_agreement_checked_samples_total", **DIGITS)
    dropped = metric(run["end"], "tta_source_agreement_dropped_batches_total", **DIGITS)
    assert checked + BATCH * dropped == (CLEAN_BATCHES + FROST_BATCHES) * BATCH  # every batch sampled (fraction 1)
    # No collapse on a balanced stream: the predicted classes stay spread (ln 10 = balanced).
    assert metric(frost, "tta_predicted_class_entropy_nats", **DIGITS) > 0.8 * ln_c
    assert metric(frost, "tta_parameter_drift_ratio", **DIGITS) > metric(clean, "tta_parameter_drift_ratio", **DIGITS)
    assert metric(frost, "tta_parameter_version", **DIGITS) > metric(clean, "tta_parameter_version", **DIGITS)


def test_a_forced_collapse_counts_a_reset_with_its_reason(run):
    end = run["end"]
    assert metric(end, "tta_resets_total", model="collapse", reason="class_collapse") == 1
    assert metric(end, "tta_resets_total", model="collapse", reason="manual") == 0  # every reason exported
    assert metric(end, "tta_resets_total", model="digits", reason="class_collapse") == 0
    assert run["collapse_info"]["resets"] == {"class_collapse": 1}
    assert run["collapse_info"]["last_reset_reason"] == "class_collapse"
    collapse = {"model": "collapse", "method": "eata"}
    assert metric(end, "tta_predicted_class_entropy_nats", **collapse) == 0.0  # one class: zero entropy
    assert metric(end, "tta_parameter_drift_ratio", **collapse) == 0.0  # back at the source weights


def test_feedback_ece_and_accuracy_match_an_offline_computation(run):
    probs = np.concatenate(run["probs"])
    labels = torch.from_numpy(run["y"])
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-30, None)))
    expected_ece = adapters.expected_calibration_error(logits, labels) / 100
    expected_accuracy = adapters.accuracy(logits, labels) / 100
    end = run["end"]
    assert metric(end, "tta_feedback_ece_ratio", **DIGITS) == pytest.approx(expected_ece, abs=1e-6)
    assert metric(end, "tta_feedback_accuracy_ratio", **DIGITS) == pytest.approx(expected_accuracy, abs=1e-6)
    assert metric(end, "tta_feedback_window_samples", **DIGITS) == len(labels)
    assert run["feedback"]["feedback_ece_ratio"] == pytest.approx(expected_ece, abs=1e-6)  # the route: same unit


def test_probe_reports_both_accuracies_and_their_gap(run):
    end = run["end"]
    adapted = metric(end, "tta_probe_accuracy_ratio", variant="adapted", **DIGITS)
    source = metric(end, "tta_probe_accuracy_ratio", variant="source", **DIGITS)
    assert 0.9 <= source <= 1.0 and 0.0 <= adapted <= 1.0  # held-out clean digits
    assert metric(end, "tta_probe_forgetting_ratio", **DIGITS) == pytest.approx(adapted - source)
    assert metric(end, "tta_probe_samples", **DIGITS) == 500
    assert run["probe"]["probe_accuracy_ratio"] == {"adapted": adapted, "source": source}


def test_the_api_and_the_metrics_report_the_same_numbers(run):
    health, end = run["info"]["health"], run["end"]
    compared = 0
    for key, value in health.items():
        labels = {"model": "digits"} if key in ("state_store_up", "replica_leader", "queue_depth_images") else DIGITS
        if isinstance(value, dict):
            for variant, v in value.items():
                assert metric(end, f"tta_{key}", variant=variant, **labels) == v
                compared += 1
        elif isinstance(value, bool | int | float):
            assert metric(end, f"tta_{key}", **labels) == float(value), key
            compared += 1
        elif value is None:
            assert not any(name == f"tta_{key}" for name, _ in end), f"{key} is None but exported"
    assert compared >= 18
    assert metric(end, "tta_model_info", model="digits", method="eata", mode="sync", role="standalone") == 1
    info = run["info"]
    assert metric(end, "tta_parameter_version", **DIGITS) == info["health"]["parameter_version"]
    assert metric(end, "tta_parameter_drift_ratio", **DIGITS) == info["health"]["parameter_drift_ratio"]


# ------------------------------------------------------------------------------------ units
def test_prediction_window_entropy_of_the_predicted_classes():
    window = PredictionWindow(4)
    assert window.summary()["predicted_class_entropy_nats"] is None
    window.add(torch.tensor([0, 1, 2, 3, 3, 3]), torch.tensor([0.5, 0.5, 0.5, 0.9, 0.9, 0.9]))
    summary = window.summary()  # the last 4: classes 2, 3, 3, 3
    p = np.array([0.25, 0.75])
    assert summary["predicted_class_entropy_nats"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert summary["mean_confidence_ratio"] == pytest.approx(0.8)
    assert summary["prediction_window_samples"] == 4


class _NotExportable(nn.Module):
    """Serves fine in PyTorch, but refuses to be traced: stands in for an operator ONNX lacks."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("operator not supported by the exporter")
        return self.linear(x.mean((2, 3)))


def test_a_failed_onnx_export_is_flagged_and_serving_goes_on(caplog):
    agreement = SourceAgreement(_NotExportable(), (8, 8), fraction=1.0, window=10)
    agreement.ready.result(30)
    agreement.offer(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))  # ignored, never raises
    summary = agreement.summary()
    agreement.stop()
    assert summary["source_agreement_up"] is False and "operator not supported" in summary["source_agreement_error"]
    assert summary["source_agreement_ratio"] is None and summary["source_agreement_checked_samples_total"] == 0
    assert "source agreement off" in caplog.text

    metrics = ServiceMetrics()
    metrics.on_start("m", {"method": "tent", "mode": "sync", "role": "standalone"}, lambda: summary)
    text = metrics.render().decode()
    assert 'tta_source_agreement_up{method="tent",model="m"} 0.0' in text
    assert "tta_source_agreement_ratio{" not in text  # not measured: no series rather than a fake number


def test_the_agreement_check_leaves_the_global_random_generator_alone():
    """Its export runs in a background thread: drawing from torch's global generator there made two
    identically seeded model builds come out different (the follower refused the leader's state)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    agreement = SourceAgreement(model, (8, 8), fraction=1.0, window=10)
    agreement.ready.result(60)
    agreement.stop()
    assert agreement.up is True
    assert torch.equal(torch.random.get_rng_state(), before)
