"""The composition root: builds what a configuration describes (models, engines, stores, routing).

``tta-serve serve`` (through the HTTP app), ``tta-serve stream``, the demo and the benchmarks all build
their models here, so a setting means the same everywhere. Nothing here speaks HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from service.allocator import tune_allocator
from service.clip.selection import Routing, build_routing
from service.engine import EngineObserver, EngineRegistry, ModelEngine
from service.metrics import ServiceMetrics
from service.model_sources import load_model, resolve_device
from service.redis_state import RedisConnection, RedisProbabilityCache, RedisSnapshotStore
from service.replication import Replica
from service.replication_contract import ReplicationPeer
from service.settings import ModelConfig, Settings, usable_cores
from service.snapshots import InMemorySnapshotStore

log = logging.getLogger(__name__)

#: Gives a model its replication peer (None: it serves alone).
PeerFactory = Callable[[ModelConfig], ReplicationPeer | None]


def default_threads(settings: Settings) -> int:
    """Intra-op threads when none are configured.

    Every usable core when a model adapts on the request path (sync mode): its steps are compute-bound
    and the event loop idles while it computes, since every client waits for that batch. Otherwise every
    core but one, kept for the event loop, which then parses requests while the model computes. Measured
    on 2 cores (docs/benchmarks.md): sync 427 vs 367 img/s with 2 threads, adaptation off 848 vs 920.
    With several worker processes (``workers``) each counts only its share of the cores.
    """
    cores = max(1, usable_cores() // settings.resolved_workers())  # each worker process gets its share
    backward_on_request_path = any(
        m.adapts_in_sync for m in settings.resolved_models()
    )
    return cores if backward_on_request_path else max(1, cores - 1)


def configure_torch(settings: Settings) -> None:
    """Process-wide settings before any model runs: intra-op threads and the allocator's thresholds."""
    torch.set_num_threads(settings.threads or default_threads(settings))
    if settings.tune_allocator:
        tune_allocator()


class EngineFactory:
    """Builds the engine of a model config with the server's shared pieces: device, observer (metrics),
    the Redis connection (shared redundancy cache, snapshots, replication) or, without Redis, one in-process
    snapshot store for every model, so an unloaded model's snapshot survives to its next load."""

    def __init__(self, settings: Settings, observer: EngineObserver | None = None,
                 peer_for: PeerFactory | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self.peer_for = peer_for
        self.device = resolve_device(settings.device)
        self.connection = RedisConnection(settings.redis_url.get_secret_value()) if settings.redis_url else None
        if self.connection is not None and not self.connection.check():
            log.error("redis at %s is down at start-up: serving from local state until it returns",
                      self.connection.display_url)
        self.snapshots = RedisSnapshotStore(self.connection) if self.connection is not None else InMemorySnapshotStore()

    def __call__(self, config: ModelConfig) -> ModelEngine:
        """Load ``config``'s model and build its engine; raises ``ModelLoadError`` naming the model."""
        settings = self.settings
        loaded = load_model(config, self.device)
        frozen_on_cpu = config.method == "source" and self.device.type == "cpu"
        if config.runtime == "onnx" or (config.runtime == "auto" and frozen_on_cpu):  # the frozen fast path
            from service.onnx_classifier import OnnxExportError, to_onnx_runtime

            try:
                loaded = to_onnx_runtime(config, loaded, settings.threads or default_threads(settings))
            except OnnxExportError as exc:
                if config.runtime == "onnx":
                    raise
                log.warning("%s; serving it with PyTorch (runtime: auto)", exc)
        shared: dict[str, Any] = {"snapshots": self.snapshots}
        if self.connection is not None:
            shared |= {
                "prob_cache": RedisProbabilityCache(self.connection, config.name),
                "replica": Replica(self.connection, config.name, config.role, settings.replica_id,
                                   settings.lease_ttl_ms, settings.sync_interval_ms),
            }
        elif self.peer_for is not None:  # worker processes on one host (service/local_replication.py)
            shared["replica"] = self.peer_for(config)
        engine = ModelEngine(config, loaded, device=self.device, observer=self.observer,
                             feedback_window=settings.feedback_window,
                             prediction_memory=settings.prediction_memory, **shared)
        log.info("model %s: %s (%s, %s mode) on %s", config.name, config.method, config.architecture
                 or config.torchscript or config.factory, config.mode, self.device)
        return engine


def build_registry(settings: Settings, observer: EngineObserver | None = None,
                   peer_for: PeerFactory | None = None) -> EngineRegistry:
    """Load every configured model and build its engine; raises ``ModelLoadError`` naming the model.

    ``peer_for`` gives a model its replication peer when there is no Redis (worker processes on one
    host). The registry keeps the factory, so the repository API can load models later with the same pieces.
    """
    configure_torch(settings)
    factory = EngineFactory(settings, observer, peer_for)
    return EngineRegistry([factory(config) for config in settings.resolved_models()], factory=factory)


def routing_for_app(settings: Settings, registry: EngineRegistry, metrics: ServiceMetrics) -> Routing | None:
    """Build the configured routing (None without a ``routing`` block); metrics go to the app's registry."""
    if settings.routing is None:
        return None
    base = settings.config.parent if settings.config is not None else None
    return build_routing(settings.routing, registry.names(), base=base, metrics_registry=metrics.registry)
