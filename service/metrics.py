"""Prometheus metrics for the server, in a registry owned by the app (never the global one).

``ServiceMetrics`` is both the HTTP middleware's sink (requests, latency; the middleware itself is
``service/http/request_metrics.py``) and the engine's
:class:`~service.engine.EngineObserver` (batches, adaptation steps, drops, resets, queue depth), so
tests and multiple apps in one process never share counters. Route labels are route templates
(``/v2/models/{name}/infer``), never raw paths, to keep label cardinality bounded.

Two ways in (docs/monitoring.md lists every metric):

* events (counters, histograms) arrive through the observer hooks as they happen;
* gauges that mirror engine state (entropy moving average, drift, agreement, probe, feedback ECE,
  state store) are read at scrape time by :class:`EngineHealthCollector` from each engine's
  ``health()``, the same snapshot ``GET /v1/models/{name}/adaptation`` returns under ``health``, so
  the API and the dashboards cannot disagree. A health key ``k`` is the metric ``tta_k``.

Labels: ``model`` everywhere per model, plus ``method`` (the adaptation method) on adaptation
metrics. Exceptions kept for compatibility: ``tta_resets_total`` is ``{model, reason}`` (join with
``tta_model_info`` for the method), and on ``tta_requests_total`` ``method`` is the HTTP verb.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

import adapters
from adapters.guard import RESET_REASONS
from service.engine import WORSE_THAN_SOURCE, EngineObserver

log = logging.getLogger(__name__)

UNMATCHED_ROUTE = "<unmatched>"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_ENTROPY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0)
_DIVERGENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
MODEL = ("model",)
MODEL_METHOD = ("model", "method")


class ServiceMetrics(EngineObserver):
    """Every metric the server exports; one instance per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tta_requests_total", "HTTP requests by route template, method and status", ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tta_request_duration_seconds", "HTTP request latency by route template", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "tta_batch_size", "images per micro-batch run by the model", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            "tta_batch_duration_seconds", "time to run one micro-batch (forward, and the update in sync mode)",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.adapt_steps = Counter("tta_adapt_steps_total", "adaptation steps run", MODEL_METHOD, registry=r)
        self.adapt_step_duration = Histogram(
            "tta_adapt_step_duration_seconds", "time of one adaptation step", MODEL_METHOD,
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.samples_seen = Counter(
            "tta_adapt_samples_seen_total", "samples the adapter stepped on", MODEL_METHOD, registry=r
        )
        self.samples_reliable = Counter(
            "tta_adapt_samples_reliable_total", "samples below the entropy margin E0", MODEL_METHOD, registry=r
        )
        self.samples_selected = Counter(
            "tta_adapt_samples_selected_total", "samples selected for the update (reliable and non-redundant; "
            "back-propagated)", MODEL_METHOD, registry=r,
        )
        self.prediction_entropy = Histogram(
            "tta_prediction_entropy_nats", "entropy of each served prediction (natural log)", MODEL_METHOD,
            buckets=_ENTROPY_BUCKETS, registry=r,
        )
        self.prediction_confidence = Histogram(
            "tta_prediction_confidence_ratio", "max-softmax confidence of each served prediction", MODEL_METHOD,
            buckets=_CONFIDENCE_BUCKETS, registry=r,
        )
        self.prediction_divergence = Histogram(
            "tta_prediction_divergence_nats", "model divergence of each served prediction: KL from the full "
            "network's prediction to a sub-network's (EATA-C only; rises under distribution shift)", MODEL_METHOD,
            buckets=_DIVERGENCE_BUCKETS, registry=r,
        )
        self.adapt_dropped = Counter(
            "tta_adapt_dropped_samples_total", "samples whose adaptation was dropped (queue full)", ["model"],
            registry=r,
        )
        self.resets = Counter("tta_resets_total", "adapter resets by reason", ["model", "reason"], registry=r)
        self.health_collector = EngineHealthCollector()
        r.register(self.health_collector)
        self._methods: dict[str, str] = {}

    def _method(self, model: str) -> str:
        return self._methods.get(model, "")

    # ------------------------------------------------------------------ HTTP side
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ EngineObserver
    def on_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_duration.labels(model).observe(seconds)

    def on_step(self, model: str, result: adapters.StepResult, seconds: float) -> None:
        method = self._method(model)
        self.adapt_steps.labels(model, method).inc()
        self.adapt_step_duration.labels(model, method).observe(seconds)
        self.samples_seen.labels(model, method).inc(int(result.entropy.shape[0]))
        self.samples_reliable.labels(model, method).inc(int(result.reliable.sum()))
        # Selected = used for an update, as in AdapterStats: nothing counts when no update ran.
        self.samples_selected.labels(model, method).inc(int(result.selected.sum()) if result.updated else 0)

    def on_predictions(self, model: str, entropy: torch.Tensor, confidence: torch.Tensor,
                       divergence: torch.Tensor | None = None) -> None:
        method = self._method(model)
        if divergence is not None:
            divergence_histogram = self.prediction_divergence.labels(model, method)
            for value in divergence.tolist():
                divergence_histogram.observe(value)
        entropy_histogram = self.prediction_entropy.labels(model, method)
        confidence_histogram = self.prediction_confidence.labels(model, method)
        for value in entropy.tolist():
            entropy_histogram.observe(value)
        for value in confidence.tolist():
            confidence_histogram.observe(value)

    def on_start(self, model: str, info: dict[str, str], health: Callable[[], dict[str, Any]]) -> None:
        """Register the engine's health for scrapes and create its series at zero (no gaps in rate())."""
        method = info.get("method", "")
        self._methods[model] = method
        self.health_collector.add(model, info, health)
        for reason in (*RESET_REASONS, WORSE_THAN_SOURCE):
            self.resets.labels(model, reason)
        for per_model in (self.batch_size, self.batch_duration, self.adapt_dropped):
            per_model.labels(model)
        for per_method in (self.adapt_steps, self.adapt_step_duration, self.samples_seen, self.samples_reliable,
                           self.samples_selected, self.prediction_entropy, self.prediction_confidence):
            per_method.labels(model, method)
        known = adapters.METHODS.get(method)
        if known is not None and known.reports_divergence:  # only methods that have it get the series
            self.prediction_divergence.labels(model, method)

    def on_stop(self, model: str, health: Callable[[], dict[str, Any]]) -> None:
        self.health_collector.remove(model, health)

    def on_adapt_dropped(self, model: str, samples: int) -> None:
        self.adapt_dropped.labels(model).inc(samples)

    def on_reset(self, model: str, reason: str) -> None:
        self.resets.labels(model, reason).inc()



_HEALTH_GAUGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (health key = metric name without "tta_", help, labels)
    ("model_classes", "classes the model predicts (ln of it is the largest predicted-class entropy)", MODEL_METHOD),
    ("entropy_ema_nats", "moving average (0.9 per step) of the mean prediction entropy of adaptation steps",
     MODEL_METHOD),
    ("entropy_margin_nats", "E0, the entropy margin: samples below it are reliable (EATA, EATA-C)", MODEL_METHOD),
    ("predicted_class_entropy_nats", "entropy of the predicted-class distribution over the recent-prediction "
     "window (ln C: balanced; near 0: one class, collapse)", MODEL_METHOD),
    ("mean_confidence_ratio", "mean max-softmax confidence over the recent-prediction window", MODEL_METHOD),
    ("batch_distinct_classes_ratio", "distinct predicted classes per served batch over the number expected for "
     "shuffled traffic with the same class mix, mean of recent batches (about 1: shuffled; about 1/k: each batch "
     "holds one of k classes, i.e. class-correlated traffic)", MODEL_METHOD),
    ("traffic_correlated", "1: correlated_traffic 'auto' judges the traffic class-correlated (always 1 under "
     "'always') and serves the probe's statistics, no update and gated LAME; 0: i.i.d., served as the papers",
     MODEL_METHOD),
    ("traffic_class_diversity_ratio", "correlated_traffic 'auto': smoothed class diversity of its probe (the batch "
     "with shallow batch and deep source statistics) over an i.i.d. batch's of the same size; below "
     "bn_switch.enter (0.825 by default) it switches to correlated, above bn_switch.leave (0.95) back",
     MODEL_METHOD),
    ("mean_divergence_nats", "mean model divergence (KL full network -> sub-network, nats) over the recent "
     "predictions of the health window (EATA-C only)", MODEL_METHOD),
    ("prediction_window_samples", "served predictions in the recent-prediction window", MODEL_METHOD),
    ("parameter_drift_ratio", "relative L2 distance of the adapted parameters from the source ones", MODEL_METHOD),
    ("parameter_version", "version of the weights that answer (updates, resets, loaded leader states)",
     MODEL_METHOD),
    ("source_agreement_up", "1: the frozen source model runs in onnxruntime for agreement checks; 0: its "
     "export or session failed (see the log)", MODEL_METHOD),
    ("source_agreement_ratio", "share of sampled served predictions whose label equals the frozen source "
     "model's, over the agreement window", MODEL_METHOD),
    ("source_agreement_window_samples", "predictions in the source-agreement window", MODEL_METHOD),
    ("probe_forgetting_ratio", "probe accuracy of the adapted model minus the source model's (negative: "
     "forgetting)", MODEL_METHOD),
    ("probe_samples", "labelled images in the probe set", MODEL_METHOD),
    ("probe_last_evaluation_timestamp_seconds", "when the probe set was last evaluated (Unix time)", MODEL_METHOD),
    ("feedback_accuracy_ratio", "accuracy over the delayed-label (feedback) window", MODEL_METHOD),
    ("feedback_ece_ratio", "expected calibration error (15 bins) over the feedback window", MODEL_METHOD),
    ("feedback_window_samples", "labelled predictions in the feedback window", MODEL_METHOD),
    ("state_store_up", "1: the shared state store (Redis) answers; 0: down, serving from local state", MODEL),
    ("replica_leader", "1: this replica holds the leader lease and adapts; 0: it follows", MODEL),
    ("queue_depth_images", "images waiting to be batched, now (the signal to scale on)", MODEL),
)
_HEALTH_COUNTERS: tuple[tuple[str, str], ...] = (
    ("source_agreement_checked_samples_total", "served predictions re-run through the source model"),
    ("source_agreement_dropped_batches_total", "sampled batches not checked because the agreement queue was full"),
)


class EngineHealthCollector(Collector):
    """Reads each live engine's ``health()`` at scrape time (Python numbers only: cheap, thread-safe)."""

    def __init__(self) -> None:
        self._engines: dict[str, tuple[dict[str, str], Callable[[], dict[str, Any]]]] = {}
        self._lock = threading.Lock()

    def add(self, model: str, info: dict[str, str], health: Callable[[], dict[str, Any]]) -> None:
        with self._lock:
            self._engines[model] = (info, health)

    def remove(self, model: str, health: Callable[[], dict[str, Any]]) -> None:
        """Forget ``model``'s health if ``health`` is what is registered (a reload registers its new engine first)."""
        with self._lock:
            if model in self._engines and self._engines[model][1] == health:
                del self._engines[model]

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        families: list[Metric] = [
            GaugeMetricFamily(f"tta_{key}", text, labels=labels) for key, text, labels in _HEALTH_GAUGES
        ]
        families.append(GaugeMetricFamily(
            "tta_probe_accuracy_ratio", "accuracy on the labelled probe set, of the adapted and the source model",
            labels=[*MODEL_METHOD, "variant"],
        ))
        families += [CounterMetricFamily(f"tta_{key}", text, labels=MODEL_METHOD) for key, text in _HEALTH_COUNTERS]
        families.append(GaugeMetricFamily(
            "tta_model_info", "1 per served model, labelled with its method, mode and replica role",
            labels=["model", "method", "mode", "role"],
        ))
        return families

    def collect(self) -> Iterable[Metric]:
        families = {family.name: family for family in self._families()}
        with self._lock:
            engines = list(self._engines.items())
        for model, (info, read) in engines:
            try:
                health = read()
            except Exception:  # a broken engine must not take /metrics down
                log.exception("model %s: cannot read health for metrics", model)
                continue
            method = info.get("method", "")
            values = {MODEL: [model], MODEL_METHOD: [model, method]}
            for key, _, labels in _HEALTH_GAUGES:
                value = health.get(key)
                if value is not None:
                    families[f"tta_{key}"].add_metric(values[labels], float(value))
            for variant, value in (health.get("probe_accuracy_ratio") or {}).items():
                families["tta_probe_accuracy_ratio"].add_metric([model, method, variant], float(value))
            for key, _ in _HEALTH_COUNTERS:
                families[f"tta_{key.removesuffix('_total')}"].add_metric([model, method], float(health.get(key, 0)))
            families["tta_model_info"].add_metric(
                [model, method, info.get("mode", ""), info.get("role", "")], 1.0
            )
        return list(families.values())
