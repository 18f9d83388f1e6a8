"""Prometheus metrics for the server, in a registry owned by the app (never the global one).

``ServiceMetrics`` is both the HTTP middleware's sink (requests, latency) and the engine's
:class:`~service.engine.EngineObserver` (batches, adaptation steps, drops, resets, queue depth), so
tests and multiple apps in one process never share counters. Route labels are route templates
(``/v2/models/{name}/infer``), never raw paths, to keep label cardinality bounded.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import adapters
from service.engine import EngineObserver

UNMATCHED_ROUTE = "<unmatched>"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


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
        self.adapt_steps = Counter("tta_adapt_steps_total", "adaptation steps run", ["model"], registry=r)
        self.adapt_step_duration = Histogram(
            "tta_adapt_step_duration_seconds", "time of one adaptation step", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.samples_seen = Counter("tta_samples_seen_total", "samples the adapter stepped on", ["model"], registry=r)
        self.samples_reliable = Counter(
            "tta_samples_reliable_total", "samples below the entropy threshold", ["model"], registry=r
        )
        self.samples_selected = Counter(
            "tta_samples_selected_total", "samples back-propagated (reliable and non-redundant)", ["model"], registry=r
        )
        self.adapt_dropped = Counter(
            "tta_adapt_dropped_samples_total", "samples whose adaptation was dropped (queue full)", ["model"],
            registry=r,
        )
        self.queue_depth = Gauge("tta_queue_depth", "requests waiting to be batched", ["model"], registry=r)
        self.resets = Counter("tta_resets_total", "adapter resets by reason", ["model", "reason"], registry=r)

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
        self.adapt_steps.labels(model).inc()
        self.adapt_step_duration.labels(model).observe(seconds)
        self.samples_seen.labels(model).inc(int(result.entropy.shape[0]))
        self.samples_reliable.labels(model).inc(int(result.reliable.sum()))
        self.samples_selected.labels(model).inc(int(result.selected.sum()))

    def on_adapt_dropped(self, model: str, samples: int) -> None:
        self.adapt_dropped.labels(model).inc(samples)

    def on_reset(self, model: str, reason: str) -> None:
        self.resets.labels(model, reason).inc()

    def on_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)


class RequestMetricsMiddleware:
    """Pure ASGI middleware counting every HTTP request by its route template and final status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            self.metrics.observe_request(template, scope["method"], status, time.perf_counter() - started)
