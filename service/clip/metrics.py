"""Prometheus metrics of expert routing, registered on the app's own registry (``ServiceMetrics.registry``).

Names use "routed"/"route" for CLIP's choice of expert; "selected" keeps its adaptation meaning
(samples an adapter back-propagated on).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.clip.routing import Choice, SelectionObserver

_CLIP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RoutingMetrics(SelectionObserver):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.routed = Counter(
            "tta_routed_images_total", "images CLIP routed to a route's expert, by route table and route",
            ["table", "route"], registry=registry,
        )
        self.fallbacks = Counter(
            "tta_routing_fallbacks_total",
            "images sent to the default expert, by reason (low_probability, low_margin, low_cosine, clip_error)",
            ["table", "reason"], registry=registry,
        )
        self.clip_duration = Histogram(
            "tta_clip_duration_seconds", "CLIP preprocessing and image tower time per request",
            ["table"], buckets=_CLIP_BUCKETS, registry=registry,
        )
        self.drift = Gauge(
            "tta_embedding_drift",
            "cosine distance of the moving centroid of CLIP image embeddings from the reference centroid",
            ["table"], registry=registry,
        )
        self.detections = Counter(
            "tta_detections_total", "boxes returned by each detector", ["detector"], registry=registry
        )

    def on_choices(self, table: str, choices: list[Choice], seconds: float) -> None:
        self.clip_duration.labels(table).observe(seconds)
        for choice in choices:
            if choice.fallback is not None:
                self.fallbacks.labels(table, choice.fallback).inc()
            else:
                self.routed.labels(table, choice.route).inc()

    def on_drift(self, table: str, score: float) -> None:
        self.drift.labels(table).set(score)

    def on_detections(self, detector: str, count: int) -> None:
        self.detections.labels(detector).inc(count)
