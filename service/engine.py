"""The engine: serves one model on its own worker thread, as an orchestrator of small units.

Routes (and the stream worker) hand the engine validated image tensors (float NCHW in [0, 1]); the
engine never sees HTTP. What it delegates, each unit testable without a server:

* batching (``service/batching.py``, ``service/worker.py``): requests are split into chunks, joined
  into micro-batches by the model's worker thread, and answered slice by slice;
* the small-batch policy (``service/small_batch.py``): how a batch is answered without an update,
  whatever its size (batch statistics, recent statistics, context, or the frozen source model);
* the feedback ledger (``service/feedback.py``): request ids, delayed labels, online accuracy and ECE;
* the health monitor (``service/health_monitor.py``): window, agreement, probe set, drift, and the one
  typed snapshot the API and ``/metrics`` read;
* replication (``service/replication_contract.py``): the engine is a ``ReplicatedModel`` to its peer.

What stays here is the decision per batch. Modes: ``sync`` answers from the forward pass of the
adaptation step (paper-faithful) when the batch is large enough; ``async`` answers from a no-gradient
forward and queues the batch for adaptation, dropping (and counting) adaptation work when
``adapt_queue_size`` batches already wait. Small batches are not adapted on one by one: they
accumulate until ``min_adapt_batch`` images are pending, then one step runs on them off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import adapters
from service import batching
from service.batching import PendingRequest
from service.errors import InvalidInput, SnapshotIncompatible, SnapshotNotFound, StoreUnavailable, UnknownModel
from service.feedback import FeedbackLedger
from service.frozen_graph import freeze_for_inference
from service.health_monitor import HealthMonitor, HealthSnapshot
from service.model_sources import LoadedModel
from service.replication_contract import ReplicationPeer, StateRefused, T
from service.settings import ModelConfig
from service.small_batch import SmallBatchPredictor
from service.snapshots import InMemorySnapshotStore, SnapshotInfo, SnapshotStore
from service.tracing import record_span, span
from service.worker import ADAPT, PREDICT, ModelWorker

log = logging.getLogger(__name__)

#: Reset reason when the probe set finds the adapted model worse than the frozen source model.
WORSE_THAN_SOURCE = "worse_than_source"

@dataclass
class Prediction:
    """One image's answer. ``selected`` is None when the decision is made after answering; ``divergence``
    (model uncertainty, nats: :meth:`adapters.Adapter.model_divergence`) is None for methods without one
    and for answers of the frozen fallback."""

    request_id: str
    probabilities: torch.Tensor
    label: int
    confidence: float
    entropy: float
    reliable: bool | None
    selected: bool | None
    parameter_version: int
    divergence: float | None = None


class EngineObserver:
    """Hooks the metrics layer implements; the defaults do nothing."""

    def on_batch(self, model: str, size: int, seconds: float) -> None: ...

    def on_step(self, model: str, result: adapters.StepResult, seconds: float) -> None: ...

    def on_adapt_dropped(self, model: str, samples: int) -> None: ...

    def on_reset(self, model: str, reason: str) -> None: ...

    def on_start(self, model: str, info: dict[str, str], health: Callable[[], dict[str, Any]]) -> None:
        """The engine is serving. ``info`` holds its static labels (method, mode, role); ``health`` returns
        its gauges (:meth:`ModelEngine.health`, thread-safe and cheap) for reading at scrape time."""

    def on_stop(self, model: str, health: Callable[[], dict[str, Any]]) -> None:
        """The engine stopped; ``health`` is the callable it registered (a reloaded model's new engine may
        already be registered under the same name: only this one is forgotten)."""

    def on_predictions(self, model: str, entropy: torch.Tensor, confidence: torch.Tensor,
                       divergence: torch.Tensor | None = None) -> None:
        """Per-sample entropy (nats), confidence and model divergence (nats; None for methods without one)
        of every served prediction of a micro-batch."""


def _all_finite(images: torch.Tensor) -> bool:
    """``isfinite().all()``; through numpy on CPU, a fraction of torch's per-call cost on a one-image request."""
    if not images.is_floating_point():
        return True
    if images.device.type == "cpu" and images.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(images.detach().numpy()).all())
    return bool(torch.isfinite(images).all())


def _request_ids(n: int) -> list[str]:
    """``n`` random 128-bit ids as hex (uuid4's randomness, one system call per batch instead of per id)."""
    raw = os.urandom(16 * n).hex()
    return [raw[i : i + 32] for i in range(0, 32 * n, 32)]


@dataclass
class EngineCounters:
    images_served: int = 0
    batches: int = 0
    adapt_queued_batches: int = 0
    adapt_dropped_batches: int = 0
    adapt_dropped_samples: int = 0


class ModelEngine:
    """Serves one model: batching, adaptation, feedback, snapshots and reset."""

    def __init__(
        self,
        config: ModelConfig,
        loaded: LoadedModel,
        *,
        device: torch.device,
        observer: EngineObserver | None = None,
        prob_cache: adapters.ProbabilityCache | None = None,
        snapshots: SnapshotStore | None = None,
        feedback_window: int = 1000,
        prediction_memory: int = 100_000,
        replica: ReplicationPeer | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.classes = loaded.classes
        self.device = device
        self.observer = observer or EngineObserver()
        self.adapter = adapters.create(
            config.method,
            loaded.module,
            num_classes=len(loaded.classes),
            prob_cache=prob_cache,
            fisher=loaded.fisher,
            **config.effective_options(loaded.confidence_map),
        )
        self.source = adapters.create("source", loaded.module)
        source_module = self.source.model  # eager: exported to ONNX for the agreement check
        if config.trace_source and loaded.runtime == "torch":  # an onnxruntime model is a graph already
            graph = freeze_for_inference(self.source.model, config.input_size, config.channels_last, config.name)
            if graph is not None:
                self.source.model = graph
                if not self.adapter.uses_batch_statistics:  # method source: the graph answers every request
                    self.adapter.model = graph
        self.small_batch = SmallBatchPredictor(config, self.adapter, self.source)
        self.feedback_ledger = FeedbackLedger(len(self.classes), feedback_window, prediction_memory)
        self.replica = replica
        self.monitor = HealthMonitor(config, self.adapter, source_module, len(self.classes), self.feedback_ledger,
                                     replica)
        self.snapshots: SnapshotStore = snapshots or InMemorySnapshotStore()
        self.counters = EngineCounters()
        self._worker = ModelWorker(config.name, batching.batch_policy(config), self._serve_batch)
        self._loop: asyncio.AbstractEventLoop | None = None  # set while started: where answers are delivered
        self._pending_adapt: list[torch.Tensor] = []
        self._last_reset_reason: str | None = None
        self._replica_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, *self.config.input_size)

    @property
    def adapts(self) -> bool:
        """Whether this replica updates weights now (a follower serves its leader's instead)."""
        return self.adapter.updates_parameters and (self.replica is None or self.replica.may_adapt())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.monitor.start(self._evaluate_on_worker, self.source, self._reset_worse_than_source)
        if self.replica is not None:
            await self._resume()
            self._replica_task = asyncio.create_task(self.replica.run(self), name=f"replica-{self.name}")
        role = self.replica.role if self.replica is not None else "standalone"
        self.observer.on_start(self.name, {"method": self.adapter.name, "mode": self.config.mode, "role": role},
                               self.health)

    async def _resume(self) -> None:
        """A restarted replica resumes: a named snapshot if configured, else the newest published state."""
        try:
            if self.config.resume_snapshot:
                await self.restore_snapshot(self.config.resume_snapshot)
                log.info("model %s: resumed snapshot %s", self.name, self.config.resume_snapshot)
            else:
                await self.replica.sync_once(self)  # type: ignore[union-attr]
        except (StoreUnavailable, SnapshotNotFound, ValueError) as exc:
            log.error("model %s: could not resume adapted state (%s); starting from the source weights",
                      self.name, exc)

    def store_status(self) -> dict[str, Any] | None:
        """The shared state store's health, or None without one."""
        return None if self.replica is None else self.replica.status()

    async def stop(self) -> None:
        self.observer.on_stop(self.name, self.health)
        await self.monitor.stop()
        if self._replica_task is not None:
            self._replica_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replica_task
        await asyncio.get_running_loop().run_in_executor(None, self._worker.stop)  # serves waiting requests first
        self._loop = None

    @property
    def ready(self) -> bool:
        return self._loop is not None and self._worker.alive

    # ------------------------------------------------------------------ prediction
    def validate(self, images: torch.Tensor) -> torch.Tensor:
        """Check a batch against the model's input; raises :class:`InvalidInput` naming the problem."""
        if not isinstance(images, torch.Tensor):
            raise InvalidInput("images must be a tensor")
        expected = self.input_shape
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise InvalidInput(f"expected shape [N, {', '.join(map(str, expected))}], got {list(images.shape)}")
        if images.shape[0] == 0:
            raise InvalidInput("no images in the request")
        if images.shape[0] > self.config.max_images_per_request:
            raise InvalidInput(
                f"{images.shape[0]} images in one request; the limit is {self.config.max_images_per_request}"
            )
        if not _all_finite(images):
            raise InvalidInput("input contains NaN or infinite values")
        return images.float()

    async def predict(self, images: torch.Tensor) -> list[Prediction]:
        """Answer every image of a request; concurrent requests are batched together."""
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"engine {self.name} is not started")
        parts = batching.split(self.validate(images), self.config.max_batch_size, loop)
        for pending in parts:
            self._worker.put_request(pending)
        results = await asyncio.gather(*(p.future for p in parts))
        return [p for part in results for p in part]

    # ------------------------------------------------------------------ worker-thread side
    def _serve_batch(self, batch: list[PendingRequest]) -> None:
        """Run one micro-batch and hand each request its answers on the event loop (worker thread)."""
        x = batching.join(batch)
        answered = False
        started_ns = time.time_ns()
        for p in batch:
            record_span("queue wait", p.trace_context, p.enqueued_ns, started_ns, {"model": self.name})

        def answer(outcome: list[Prediction] | Exception) -> None:
            nonlocal answered
            answered = True
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(batching.deliver, batch, outcome)

        try:
            with span("batch forward", {"model": self.name, "batch_size": x.shape[0]}, parent=batch[0].trace_context,
                      linked=[p.trace_context for p in batch[1:]]):
                self.run_batch(x, answer)
        except Exception as exc:  # an engine fault fails this batch's requests, not the server
            if answered:  # the update after the answers went out failed: no request fails
                log.exception("model %s: the update on a batch of %d answered images failed", self.name, x.shape[0])
            else:
                log.exception("model %s: a batch of %d images failed", self.name, x.shape[0])
                answer(exc)

    def run_batch(self, x: torch.Tensor, answer: Callable[[list[Prediction]], None]) -> None:
        """Predict (and in sync mode adapt on) one micro-batch, on the model's thread; ``answer`` gets the
        predictions as soon as they exist: in sync mode before the backward pass, so clients send their next
        requests while the update runs (the next batch still waits for it)."""
        started = time.perf_counter()
        cfg = self.config
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        version = self.adapter.stats.parameter_version  # the weights that produce these answers
        fallbacks = self.small_batch.frozen_fallbacks
        batch_statistics = self.adapter.uses_batch_statistics
        if batch_statistics and cfg.mode == "sync" and self.adapts and x.shape[0] >= cfg.min_adapt_batch:

            def on_prediction(logits: torch.Tensor, ent: torch.Tensor, reliable: torch.Tensor,
                              selected: torch.Tensor, divergence: torch.Tensor | None) -> None:
                answer(self._answers(x, logits, reliable, selected, version, fallbacks, divergence))

            self._step(x, on_prediction)
        else:
            divergence = None
            if not batch_statistics:
                logits = self.source.predict(x)
            else:
                logits, divergence = self.small_batch.predict(x)
                if self.adapts:
                    self._schedule_adaptation(x)
            answer(self._answers(x, logits, None, None, version, fallbacks, divergence))
        self.monitor.refresh_drift()
        self.observer.on_batch(self.name, x.shape[0], time.perf_counter() - started)

    def _answers(self, x: torch.Tensor, logits: torch.Tensor, reliable: torch.Tensor | None,
                 selected: torch.Tensor | None, version: int, fallbacks: int,
                 divergence: torch.Tensor | None = None) -> list[Prediction]:
        """Each image's prediction, and the per-batch bookkeeping (context, health, feedback memory)."""
        n = x.shape[0]
        self.small_batch.remember(x)
        logits = logits.detach().float()
        probs = logits.softmax(1).cpu()
        entropy = adapters.entropy(logits).cpu()
        if reliable is None and self.adapter.e0 is not None:
            reliable = entropy < self.adapter.e0
        confidence, label = probs.max(1)
        if divergence is not None:
            divergence = divergence.detach().float().cpu()
        self.monitor.served(x, label, confidence, by_adapted=self.small_batch.frozen_fallbacks == fallbacks,
                            divergence=divergence)
        self.observer.on_predictions(self.name, entropy, confidence, divergence)
        # Plain Python values, converted once per batch: indexing tensors per image costs more than the model
        # at small batches.
        labels, confidences, entropies = label.tolist(), confidence.tolist(), entropy.tolist()
        reliables = [None] * n if reliable is None else reliable.tolist()
        selecteds = [None] * n if selected is None else selected.tolist()
        divergences = [None] * n if divergence is None else divergence.tolist()
        ids = _request_ids(n)
        predictions = [
            Prediction(request_id, row, lab, conf, ent, rel, sel, version, div)
            for request_id, row, lab, conf, ent, rel, sel, div in zip(
                ids, probs.unbind(0), labels, confidences, entropies, reliables, selecteds, divergences, strict=True
            )
        ]
        self.feedback_ledger.remember(zip(ids, labels, confidences, strict=True))
        self.counters.images_served += n
        self.counters.batches += 1
        return predictions

    def _step(self, x: torch.Tensor, on_prediction: adapters.PredictionCallback | None = None) -> adapters.StepResult:
        started = time.perf_counter()
        with span("adaptation step", {"model": self.name, "method": self.adapter.name}) as step_span:
            result = self.adapter.step(x, on_prediction)
            if step_span is not None:
                step_span.set_attribute("samples_selected", int(result.selected.sum()))
                step_span.set_attribute("updated", result.updated)
        if self.replica is not None and self.replica.is_leader and (result.updated or result.reset_reason):
            self.replica.publish(self)
        self.monitor.refresh_drift()
        self.observer.on_step(self.name, result, time.perf_counter() - started)
        if result.reset_reason is not None:
            self.small_batch.forget()
            self._last_reset_reason = result.reset_reason
            log.warning("model %s: adapter reset (%s)", self.name, result.reset_reason)
            self.observer.on_reset(self.name, result.reset_reason)
        return result

    def _schedule_adaptation(self, x: torch.Tensor) -> None:
        """Queue adaptation on ``x`` (small batches accumulate first); drop and count when full."""
        self._pending_adapt.append(x)
        pending = sum(t.shape[0] for t in self._pending_adapt)
        if pending < self.config.min_adapt_batch:
            return
        batch = torch.cat(self._pending_adapt)
        self._pending_adapt = []
        if self._worker.pending(ADAPT) >= self.config.adapt_queue_size:
            self.counters.adapt_dropped_batches += 1
            self.counters.adapt_dropped_samples += batch.shape[0]
            self.observer.on_adapt_dropped(self.name, batch.shape[0])
            return
        self.counters.adapt_queued_batches += 1
        self._worker.submit(lambda: self._step(batch), ADAPT, images=batch.shape[0])

    async def _evaluate_on_worker(self, model: adapters.Adapter, x: torch.Tensor) -> torch.Tensor:
        """No-update logits of ``x`` as a low-priority job (probe evaluations: not served traffic)."""

        def evaluate() -> torch.Tensor:
            with self.small_batch.not_served():
                return model.predict(x)

        return await asyncio.wrap_future(self._worker.submit(evaluate, ADAPT))

    # ------------------------------------------------------------------ replication (a ReplicatedModel)
    def export_state(self) -> dict[str, Any]:
        return self.adapter.replication_state()

    def import_state(self, state: dict[str, Any], version: int) -> None:
        try:
            self.adapter.load_replication_state(state)
        except adapters.IncompatibleState as exc:
            raise StateRefused(str(exc)) from exc
        self.adopt_version(version)

    def adopt_version(self, version: int) -> None:
        self.adapter.stats.parameter_version = version

    # ------------------------------------------------------------------ admin operations
    async def run_on_worker(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model's worker thread, between batches (the only place weights change)."""
        return await asyncio.wrap_future(self._worker.submit(fn, PREDICT))

    async def reset(self, reason: str = adapters.guard.MANUAL) -> None:
        def do_reset() -> None:
            self.adapter.reset(reason)
            if self.replica is not None and self.replica.is_leader:
                self.replica.publish(self)
            self._pending_adapt = []
            self.small_batch.forget()
            self._last_reset_reason = reason

        await self.run_on_worker(do_reset)
        self.observer.on_reset(self.name, reason)

    async def _reset_worse_than_source(self, gap: float) -> None:
        """The probe set found the adapted model worse than not adapting: back to the source weights."""
        if not self.adapts:  # a follower serves its leader's weights: the leader's probe decides
            return
        log.warning("model %s: adapted model %.1f points below the source model on the probe set; resetting",
                    self.name, -100 * gap)
        await self.reset(WORSE_THAN_SOURCE)

    def feedback(self, labels: dict[str, int]) -> dict[str, Any]:
        """Record true labels for earlier request ids (all-or-nothing); the window's numbers after them,
        named as in the health snapshot (ratios)."""
        accepted = self.feedback_ledger.record(labels)
        c = self.feedback_ledger.calibration()
        return {"accepted": accepted, "feedback_window_samples": c.labelled,
                "feedback_accuracy_ratio": c.accuracy, "feedback_ece_ratio": c.ece}

    async def save_snapshot(self, name: str) -> SnapshotInfo:
        state = await self.run_on_worker(self.adapter.state_dict)
        return self.snapshots.save(self.name, name, state)

    def list_snapshots(self) -> list[SnapshotInfo]:
        return self.snapshots.list(self.name)

    async def restore_snapshot(self, name: str) -> SnapshotInfo:
        try:
            state = self.snapshots.load(self.name, name)
        except KeyError:
            raise SnapshotNotFound(name) from None
        try:
            await self.run_on_worker(lambda: self.adapter.load_state_dict(state))
        except adapters.IncompatibleState as exc:
            raise SnapshotIncompatible(name, self.name, str(exc)) from None
        return next(s for s in self.list_snapshots() if s.name == name)

    async def adaptation_info(self) -> dict[str, Any]:
        return await self.run_on_worker(self._info)

    # ------------------------------------------------------------------ health
    async def evaluate_probe(self) -> dict[str, Any] | None:
        """Evaluate the probe set now (see :meth:`HealthMonitor.evaluate_probe`)."""
        return await self.monitor.evaluate_probe(self._evaluate_on_worker, self.source)

    def health_snapshot(self) -> HealthSnapshot:
        """Every health number now; thread-safe and cheap (the collector calls it at each scrape)."""
        return self.monitor.snapshot(queue_depth_images=self._worker.waiting_images)

    def health(self) -> dict[str, Any]:
        """The health snapshot as a dict keyed by metric name without ``tta_`` (the collector reads it)."""
        return self.health_snapshot().as_dict()

    def _info(self) -> dict[str, Any]:
        stats = self.adapter.stats
        self.monitor.refresh_drift(force=True)
        description = self.adapter.describe()
        return {
            "model": self.name,
            "method": self.adapter.name,
            "mode": self.config.mode,
            "device": str(self.adapter.device),
            "options": description["options"],
            "steps": stats.steps,
            "updates": stats.updates,
            "samples_seen": stats.samples_seen,
            "samples_reliable": stats.samples_reliable,
            "samples_selected": stats.samples_selected,
            "parameter_version": stats.parameter_version,
            "resets": dict(stats.resets),
            "last_reset_reason": self._last_reset_reason,
            "images_served": self.counters.images_served,
            "batches": self.counters.batches,
            "frozen_fallbacks": self.small_batch.frozen_fallbacks,
            "adapt_queued_batches": self.counters.adapt_queued_batches,
            "adapt_dropped_batches": self.counters.adapt_dropped_batches,
            "adapt_dropped_samples": self.counters.adapt_dropped_samples,
            "fisher": description.get("fisher", False),
            "replication": self.store_status(),
            "health": self.health(),
        }


class EngineRegistry:
    """The engines of the served models, by name; ``factory`` builds more (the repository API)."""

    def __init__(self, engines: list[ModelEngine], factory: Callable[[ModelConfig], ModelEngine] | None = None) -> None:
        self._engines = {e.name: e for e in engines}
        self.factory = factory

    def add(self, engine: ModelEngine) -> ModelEngine | None:
        """Serve ``engine`` under its name; returns the engine it replaces (still running), if any."""
        previous = self._engines.get(engine.name)
        self._engines[engine.name] = engine
        return previous

    def remove(self, name: str) -> ModelEngine:
        """Stop routing requests to ``name``; returns its engine (still running: the caller stops it)."""
        if name not in self._engines:
            raise UnknownModel(name, sorted(self._engines))
        return self._engines.pop(name)

    def get(self, name: str) -> ModelEngine:
        if name not in self._engines:
            raise UnknownModel(name, sorted(self._engines))
        return self._engines[name]

    def names(self) -> list[str]:
        return sorted(self._engines)

    def __iter__(self):
        return iter(list(self._engines.values()))

    async def start(self) -> None:
        for engine in self._engines.values():
            await engine.start()

    async def stop(self) -> None:
        for engine in self._engines.values():
            await engine.stop()

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self._engines.values())
