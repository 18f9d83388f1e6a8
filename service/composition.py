"""The composition root: builds what a configuration describes (models, engines, stores, routing).

``tta-serve serve`` (through the HTTP app), ``tta-serve stream``, the demo and the benchmarks all build
their models here, so a setting means the same everywhere. Nothing here speaks HTTP.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from service.allocator import tune_allocator
from service.clip.selection import Routing, build_routing
from service.engine import EngineObserver, EngineRegistry, ModelEngine
from service.metrics import ServiceMetrics
from service.model_sources import load_model, resolve_device
from service.redis_state import RedisConnection, RedisProbabilityCache, RedisSnapshotStore
from service.replication import Replica
from service.settings import Settings

log = logging.getLogger(__name__)


def default_threads(settings: Settings) -> int:
    """Intra-op threads when none are configured.

    Every usable core when a model adapts on the request path (sync mode): its steps are compute-bound
    and the event loop idles while it computes, since every client waits for that batch. Otherwise every
    core but one, kept for the event loop, which then parses requests while the model computes. Measured
    on 2 cores (docs/benchmarks.md): sync 427 vs 367 img/s with 2 threads, adaptation off 848 vs 920.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    backward_on_request_path = any(
        m.adapts_in_sync for m in settings.resolved_models()
    )
    return cores if backward_on_request_path else max(1, cores - 1)


def configure_torch(settings: Settings) -> None:
    """Process-wide settings before any model runs: intra-op threads and the allocator's thresholds."""
    torch.set_num_threads(settings.threads or default_threads(settings))
    if settings.tune_allocator:
        tune_allocator()


def build_registry(settings: Settings, observer: EngineObserver | None = None) -> EngineRegistry:
    """Load every configured model and build its engine; raises ``ModelLoadError`` naming the model."""
    configure_torch(settings)
    device = resolve_device(settings.device)
    connection = RedisConnection(settings.redis_url.get_secret_value()) if settings.redis_url else None
    if connection is not None and not connection.check():
        log.error("redis at %s is down at start-up: serving from local state until it returns",
                  connection.display_url)
    engines = []
    for config in settings.resolved_models():
        loaded = load_model(config, device)
        if config.runtime == "onnx":  # the frozen fast path
            from service.onnx_classifier import to_onnx_runtime

            loaded = to_onnx_runtime(config, loaded, settings.threads or default_threads(settings))
        shared: dict[str, Any] = {}
        if connection is not None:
            shared = {
                "prob_cache": RedisProbabilityCache(connection, config.name),
                "snapshots": RedisSnapshotStore(connection),
                "replica": Replica(connection, config.name, config.role, settings.replica_id,
                                   settings.lease_ttl_ms, settings.sync_interval_ms),
            }
        engines.append(
            ModelEngine(
                config,
                loaded,
                device=device,
                observer=observer,
                feedback_window=settings.feedback_window,
                prediction_memory=settings.prediction_memory,
                **shared,
            )
        )
        log.info("model %s: %s (%s, %s mode) on %s", config.name, config.method, config.architecture
                 or config.torchscript or config.factory, config.mode, device)
    return EngineRegistry(engines)



def routing_for_app(settings: Settings, registry: EngineRegistry, metrics: ServiceMetrics) -> Routing | None:
    """Build the configured routing (None without a ``routing`` block); metrics go to the app's registry."""
    if settings.routing is None:
        return None
    base = settings.config.parent if settings.config is not None else None
    return build_routing(settings.routing, registry.names(), base=base, metrics_registry=metrics.registry)
