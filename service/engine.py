"""The engine: micro-batches requests for a model and runs its adapter on one worker thread.

Routes hand the engine validated image tensors (float NCHW in [0, 1]); the engine never sees HTTP.

Small batches and BatchNorm (the policy, also in docs/serving.md): adapting methods normalise with
batch statistics, so a lone image has no meaningful statistics.

* A micro-batch of at least ``min_adapt_batch`` images is predicted (and, in sync mode, adapted on)
  as it is.
* A smaller batch is predicted together with up to ``min_adapt_batch - n`` recent inputs (the
  *context*); only its own rows are returned. With no context yet (the first requests after start),
  the frozen source model answers (counted as ``frozen_fallbacks``).
* Small batches are not adapted on one by one: they accumulate until ``min_adapt_batch`` images are
  pending, then one adaptation step runs on them off the request path.

Modes: ``sync`` answers from the forward pass that adapts (paper-faithful); ``async`` answers from a
no-gradient forward with the current weights and queues the batch for adaptation, dropping (and
counting) adaptation work when ``adapt_queue_size`` batches are already waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import adapters
from adapters.recent_statistics import RecentBatchStatistics
from service.frozen_graph import freeze_for_inference, trace_shared
from service.health import PredictionWindow, ProbeResult, ProbeSet, SourceAgreement
from service.model_sources import LoadedModel, ModelLoadError
from service.settings import ModelConfig
from service.snapshots import InMemorySnapshotStore, SnapshotInfo, SnapshotStore
from service.worker import ADAPT, PREDICT, BatchPolicy, ModelWorker

if TYPE_CHECKING:
    from service.replication import Replica

log = logging.getLogger(__name__)


class InvalidInput(ValueError):
    """Input the model cannot take; the message says what is wrong."""


class UnknownRequestIds(KeyError):
    """Feedback for request ids the engine does not remember."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        self.ids = ids


class SnapshotNotFound(KeyError):
    pass


@dataclass
class Prediction:
    """One image's answer. ``selected`` is None when the decision is made after answering."""

    request_id: str
    probabilities: torch.Tensor
    label: int
    confidence: float
    entropy: float
    reliable: bool | None
    selected: bool | None
    parameter_version: int


class EngineObserver:
    """Hooks the metrics layer implements; the defaults do nothing."""

    def on_batch(self, model: str, size: int, seconds: float) -> None: ...

    def on_step(self, model: str, result: adapters.StepResult, seconds: float) -> None: ...

    def on_adapt_dropped(self, model: str, samples: int) -> None: ...

    def on_reset(self, model: str, reason: str) -> None: ...

    def on_queue_depth(self, model: str, depth: int) -> None: ...

    def on_start(self, model: str, info: dict[str, str], health: Callable[[], dict[str, Any]]) -> None:
        """The engine is serving. ``info`` holds its static labels (method, mode, role); ``health`` returns
        its gauges (:meth:`ModelEngine.health`, thread-safe and cheap) for reading at scrape time."""

    def on_stop(self, model: str) -> None: ...

    def on_predictions(self, model: str, entropy: torch.Tensor, confidence: torch.Tensor) -> None:
        """Per-sample entropy (nats) and confidence of every served prediction of a micro-batch."""


def _all_finite(images: torch.Tensor) -> bool:
    """``isfinite().all()``; through numpy on CPU, a fraction of torch's per-call cost on a one-image request."""
    if not images.is_floating_point():
        return True
    if images.device.type == "cpu" and images.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(images.detach().numpy()).all())
    return bool(torch.isfinite(images).all())


def batch_policy(config: ModelConfig) -> BatchPolicy:
    """Batching for ``config`` (the ``max_delay_ms`` field explains the two policies)."""
    share = config.adapt_time_share if config.mode == "async" else 1.0
    return BatchPolicy(config.max_batch_size, config.max_delay_ms / 1000, wait_from_free=config.adapts_in_sync,
                       adapt_share=share, adapt_min_share=min(config.adapt_min_share, share))


def _deliver(batch: list[_Pending], outcome: list[Prediction] | Exception) -> None:
    """Resolve each request's future with its slice of the batch's answers (event loop thread)."""
    offset = 0
    for p in batch:
        if not p.future.done():  # a client that went away cancelled its future
            if isinstance(outcome, Exception):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome[offset : offset + p.size])
        offset += p.size


def _request_ids(n: int) -> list[str]:
    """``n`` random 128-bit ids as hex (uuid4's randomness, one system call per batch instead of per id)."""
    raw = os.urandom(16 * n).hex()
    return [raw[i : i + 32] for i in range(0, 32 * n, 32)]


@dataclass
class _Pending:
    """A request (or a ``max_batch_size`` chunk of one) waiting in the worker's queue."""

    images: torch.Tensor
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return self.images.shape[0]


@dataclass
class EngineCounters:
    images_served: int = 0
    batches: int = 0
    frozen_fallbacks: int = 0
    adapt_batches_queued: int = 0
    adapt_batches_dropped: int = 0
    adapt_samples_dropped: int = 0


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
        replica: Replica | None = None,
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
            **config.effective_options(),
        )
        self.source = adapters.create("source", loaded.module)
        self._recent_stats: RecentBatchStatistics | None = None
        self._recent_graph_module: torch.nn.Module | None = None
        self._recent_graph_tried = False
        self._batch_graph_module: torch.nn.Module | None = None
        self._batch_graph_tried = False
        if config.recent_statistics and self.adapter.uses_batch_statistics:
            self._recent_stats = RecentBatchStatistics(self.adapter.model, config.min_adapt_batch)
        self._source_module = self.source.model  # eager: exported to ONNX for the agreement check
        if config.trace_source and config.runtime == "torch":  # an onnxruntime model is a graph already
            graph = freeze_for_inference(self.source.model, config.input_size, config.channels_last, config.name)
            if graph is not None:
                self.source.model = graph
                if not self.adapter.uses_batch_statistics:  # method source: the graph answers every request
                    self.adapter.model = graph
        self.snapshots: SnapshotStore = snapshots or InMemorySnapshotStore()
        self.counters = EngineCounters()
        self._worker = ModelWorker(config.name, batch_policy(config), self._serve_batch)
        self._loop: asyncio.AbstractEventLoop | None = None  # set while started: where answers are delivered
        self._context: deque[torch.Tensor] = deque(maxlen=max(config.context_size, 0))
        self._pending_adapt: list[torch.Tensor] = []
        self._memory: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._memory_size = prediction_memory
        self._memory_lock = threading.Lock()  # the worker adds ids while routes pop them
        self._labelled: deque[tuple[float, bool]] = deque(maxlen=feedback_window)
        self._last_reset_reason: str | None = None
        self.replica = replica
        self._replica_task: asyncio.Task | None = None
        # Health signals (docs/monitoring.md): read by the API and the metrics from one snapshot.
        self.window = PredictionWindow(config.health_window)
        self.agreement: SourceAgreement | None = None  # started with the engine
        self.probe = _probe_set(config)
        self._probe_result: ProbeResult | None = None
        self._probe_task: asyncio.Task | None = None
        self._drift = 0.0
        self._drift_key: tuple[int, int] | None = None

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
        if self.config.agreement_fraction > 0 and self.adapter.uses_batch_statistics:
            # Exports the source model to ONNX on its own thread: start-up does not wait for it.
            self.agreement = SourceAgreement(self._source_module, self.config.input_size,
                                             fraction=self.config.agreement_fraction, window=self.config.health_window)
        if self.probe is not None and self.config.probe_every_s > 0:
            self._probe_task = asyncio.create_task(self._probe_loop(), name=f"probe-{self.name}")
        if self.replica is not None:
            await self._resume()
            self._replica_task = asyncio.create_task(self.replica.run(self), name=f"replica-{self.name}")
        role = self.replica.role if self.replica is not None else "standalone"
        self.observer.on_start(self.name, {"method": self.adapter.name, "mode": self.config.mode, "role": role},
                               self.health)

    async def _resume(self) -> None:
        """A restarted replica resumes: a named snapshot if configured, else the newest published state."""
        from service.redis_state import StoreUnavailable

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
        self.observer.on_stop(self.name)
        for task in (self._probe_task, self._replica_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.agreement is not None:
            self.agreement.stop()
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
        images = self.validate(images)
        parts = []
        for chunk in images.split(self.config.max_batch_size):
            pending = _Pending(chunk, loop.create_future())
            waiting = self._worker.put_request(pending)
            parts.append(pending.future)
        self.observer.on_queue_depth(self.name, waiting)
        results = await asyncio.gather(*parts)
        return [p for part in results for p in part]

    # ------------------------------------------------------------------ worker-thread side
    def _serve_batch(self, batch: list[_Pending]) -> None:
        """Run one micro-batch and hand each request its answers on the event loop (worker thread)."""
        x = torch.cat([p.images for p in batch]) if len(batch) > 1 else batch[0].images
        answered = False

        def answer(outcome: list[Prediction] | Exception) -> None:
            nonlocal answered
            answered = True
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(_deliver, batch, outcome)

        try:
            self._run_batch(x, answer)
        except Exception as exc:  # an engine fault fails this batch's requests, not the server
            if answered:  # the update after the answers went out failed: no request fails
                log.exception("model %s: the update on a batch of %d answered images failed", self.name, x.shape[0])
            else:
                log.exception("model %s: a batch of %d images failed", self.name, x.shape[0])
                answer(exc)

    def _run_batch(self, x: torch.Tensor, answer: Callable[[list[Prediction]], None]) -> None:
        """Predict (and in sync mode adapt on) one micro-batch; ``answer`` gets its predictions as soon as they
        exist: in sync mode before the backward pass, so clients send their next requests while the update
        runs (the next batch still waits for it). Runs on the worker thread."""
        started = time.perf_counter()
        cfg = self.config
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        version = self.adapter.stats.parameter_version  # the weights that produce these answers
        fallbacks = self.counters.frozen_fallbacks
        batch_statistics = self.adapter.uses_batch_statistics
        if batch_statistics and cfg.mode == "sync" and self.adapts and x.shape[0] >= cfg.min_adapt_batch:

            def on_prediction(logits: torch.Tensor, ent: torch.Tensor, reliable: torch.Tensor,
                              selected: torch.Tensor) -> None:
                answer(self._answers(x, logits, reliable, selected, version, fallbacks))

            self._step(x, on_prediction)
        else:
            if not batch_statistics:
                logits = self.source.predict(x)
            else:
                logits = self._predict_with_context(x)
                if self.adapts:
                    self._schedule_adaptation(x)
            answer(self._answers(x, logits, None, None, version, fallbacks))
        self._refresh_drift()
        self.observer.on_batch(self.name, x.shape[0], time.perf_counter() - started)

    def _answers(self, x: torch.Tensor, logits: torch.Tensor, reliable: torch.Tensor | None,
                 selected: torch.Tensor | None, version: int, fallbacks: int) -> list[Prediction]:
        """Each image's prediction, and the per-batch bookkeeping (context, health window, feedback memory)."""
        n = x.shape[0]
        self._context.extend(x.detach().cpu().unbind(0))
        logits = logits.detach().float()
        probs = logits.softmax(1).cpu()
        entropy = adapters.entropy(logits).cpu()
        if reliable is None and self.adapter.e0 is not None:
            reliable = entropy < self.adapter.e0
        confidence, label = probs.max(1)
        self.window.add(label, confidence)
        self.observer.on_predictions(self.name, entropy, confidence)
        if self.agreement is not None and self.counters.frozen_fallbacks == fallbacks:  # the adapted model answered
            self.agreement.offer(x, label)
        # Plain Python values, converted once per batch: indexing tensors per image costs more than the model
        # at small batches.
        labels, confidences, entropies = label.tolist(), confidence.tolist(), entropy.tolist()
        reliables = [None] * n if reliable is None else reliable.tolist()
        selecteds = [None] * n if selected is None else selected.tolist()
        ids = _request_ids(n)
        predictions = [
            Prediction(request_id, row, lab, conf, ent, rel, sel, version)
            for request_id, row, lab, conf, ent, rel, sel in zip(
                ids, probs.unbind(0), labels, confidences, entropies, reliables, selecteds, strict=True
            )
        ]
        self._remember(zip(ids, labels, confidences, strict=True))
        self.counters.images_served += n
        self.counters.batches += 1
        return predictions

    def _predict_with_context(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        recent = self._recent_stats
        if n >= self.config.min_adapt_batch:  # (only batch-statistics methods come here)
            graph = self._batch_graph() if recent is None or recent.updates > 0 else None
            if graph is None:
                return self.adapter.predict(x)
            with torch.no_grad():
                logits = graph(x.to(self.adapter.device))
            if recent is not None:
                recent.recorded()
            return logits
        if recent is not None and recent.ready(max_served=self.config.recent_statistics_images):
            recent.served_since_update += n
            graph = self._recent_graph()
            if graph is not None:
                with torch.no_grad():
                    return graph(x.to(self.adapter.device))
            with recent.applied():
                return self.adapter.predict(x)
        need = self.config.min_adapt_batch - n
        context = list(self._context)[-need:] if need > 0 else []
        if not context:
            self.counters.frozen_fallbacks += n
            return self.source.predict(x)
        padded = torch.cat([x, torch.stack(context).to(x.device)])
        return self.adapter.predict(padded)[:n]

    def _traceable(self) -> bool:
        """Whether the adapter's answers are its model's output (not EATA-C's own forward or calibration)
        and tracing is on: then its no-gradient answers may come from traced graphs."""
        method = type(self.adapter)
        plain = method.forward is adapters.Adapter.forward and method.calibrate is adapters.Adapter.calibrate
        return self.config.trace_source and plain

    def _recent_graph(self) -> torch.nn.Module | None:
        """The adapted model normalising with the recent statistics as a traced graph (built once, on first
        use; worker thread). Not frozen: it reads the live parameters and averages, so it always answers as
        the eager model would, without taking the GIL per layer. None for methods with their own forward or
        calibration (EATA-C) and when tracing is off or fails."""
        if not self._recent_graph_tried:
            self._recent_graph_tried = True
            if self._traceable() and self._recent_stats is not None:
                with self._recent_stats.applied():
                    self._recent_graph_module = trace_shared(self.adapter.model, self.config.input_size,
                                                             self.config.channels_last, self.name)
        return self._recent_graph_module

    def _batch_graph(self) -> torch.nn.Module | None:
        """The adapted model normalising with each batch's own statistics as a traced graph, for no-gradient
        answers to large batches (async mode, followers, ``norm``): about 20 % less time per batch than eager
        next to a busy event loop (docs/benchmarks.md). Like the eager pass it updates the recent statistics.
        Built once, on first use (worker thread); None as for :meth:`_recent_graph`."""
        if not self._batch_graph_tried:
            self._batch_graph_tried = True
            if self._traceable():
                recent = self._recent_stats
                with recent.tracing() if recent is not None else contextlib.nullcontext():
                    self._batch_graph_module = trace_shared(self.adapter.model, self.config.input_size,
                                                            self.config.channels_last, self.name)
        return self._batch_graph_module

    def _forget_recent_statistics(self) -> None:
        """After a reset the averages describe weights that are gone (worker thread)."""
        if self._recent_stats is not None:
            self._recent_stats.clear()

    def _step(self, x: torch.Tensor, on_prediction: adapters.PredictionCallback | None = None) -> adapters.StepResult:
        started = time.perf_counter()
        result = self.adapter.step(x, on_prediction)
        if self.replica is not None and self.replica.is_leader and (result.updated or result.reset_reason):
            self.replica.publish(self)
        self._refresh_drift()
        self.observer.on_step(self.name, result, time.perf_counter() - started)
        if result.reset_reason is not None:
            self._forget_recent_statistics()
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
            self.counters.adapt_batches_dropped += 1
            self.counters.adapt_samples_dropped += batch.shape[0]
            self.observer.on_adapt_dropped(self.name, batch.shape[0])
            return
        self.counters.adapt_batches_queued += 1
        self._worker.submit(lambda: self._step(batch), ADAPT)

    def _remember(self, answers: Iterable[tuple[str, int, float]]) -> None:
        """Keep (label, confidence) by request id for delayed feedback, the newest ``prediction_memory``."""
        with self._memory_lock:
            for request_id, label, confidence in answers:
                self._memory[request_id] = (label, confidence)
            while len(self._memory) > self._memory_size:
                self._memory.popitem(last=False)

    # ------------------------------------------------------------------ admin operations
    async def run_on_worker(self, fn: Any) -> Any:
        """Run ``fn`` on the model's worker thread, between batches (the only place weights change)."""
        return await asyncio.wrap_future(self._worker.submit(fn, PREDICT))

    async def reset(self) -> None:
        def do_reset() -> None:
            self.adapter.reset(adapters.guard.MANUAL)
            if self.replica is not None and self.replica.is_leader:
                self.replica.publish(self)
            self._pending_adapt = []
            self._forget_recent_statistics()
            self._last_reset_reason = adapters.guard.MANUAL

        await self.run_on_worker(do_reset)
        self.observer.on_reset(self.name, adapters.guard.MANUAL)

    def feedback(self, labels: dict[str, int]) -> dict[str, Any]:
        """Record true labels for earlier request ids; all-or-nothing so a typo never half-applies."""
        bad = {rid: lab for rid, lab in labels.items() if not 0 <= lab < len(self.classes)}
        if bad:
            raise InvalidInput(f"labels out of range 0..{len(self.classes) - 1}: {bad}")
        with self._memory_lock:
            unknown = [rid for rid in labels if rid not in self._memory]
            if unknown:
                raise UnknownRequestIds(unknown)
            for rid, true_label in labels.items():
                predicted, confidence = self._memory.pop(rid)
                self._labelled.append((confidence, predicted == true_label))
        return {"accepted": len(labels), **self.online_calibration()}

    def online_calibration(self) -> dict[str, Any]:
        """Rolling accuracy and ECE (percent) over the labelled window."""
        with self._memory_lock:  # feedback appends on the event loop; _info and scrapes read elsewhere
            labelled = list(self._labelled)
        if not labelled:
            return {"labelled": 0, "accuracy": None, "ece": None}
        acc = adapters.CalibrationAccumulator()
        conf = torch.tensor([c for c, _ in labelled])
        hit = torch.tensor([h for _, h in labelled])
        acc.add(conf, hit)
        return {"labelled": len(labelled), "accuracy": acc.accuracy(), "ece": acc.ece()}

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
        await self.run_on_worker(lambda: self.adapter.load_state_dict(state))
        return next(s for s in self.list_snapshots() if s.name == name)

    async def adaptation_info(self) -> dict[str, Any]:
        return await self.run_on_worker(self._info)

    # ------------------------------------------------------------------ health: collapse, forgetting, calibration
    def _refresh_drift(self, force: bool = False) -> None:
        """Recompute the parameter drift when the weights changed (worker thread); scrapes read the float."""
        key = (id(self.adapter.stats), self.adapter.stats.parameter_version)
        if force or key != self._drift_key:
            self._drift = self.adapter.parameter_drift()
            self._drift_key = key

    async def evaluate_probe(self) -> dict[str, Any] | None:
        """Evaluate the probe set now: the adapted weights (no update) and, once, the source model.

        Each batch is its own low-priority job on the worker, so requests are served in between; the
        weights may move during an evaluation, which the accuracy then averages over.
        """
        probe = self.probe
        if probe is None:
            return None

        def count_correct(model: adapters.Adapter, x: torch.Tensor, y: torch.Tensor) -> int:
            recent = self._recent_stats
            with recent.paused() if recent is not None else contextlib.nullcontext():  # not served traffic
                return probe.correct(model.predict(x), y)

        async def correct(model: adapters.Adapter, x: torch.Tensor, y: torch.Tensor) -> int:
            return await asyncio.wrap_future(self._worker.submit(lambda: count_correct(model, x, y), ADAPT))

        chunks = probe.chunks(self.config.max_batch_size)
        n = probe.labels.shape[0]
        if probe.source_accuracy is None:
            probe.source_accuracy = sum([await correct(self.source, x, y) for x, y in chunks]) / n
        adapted = sum([await correct(self.adapter, x, y) for x, y in chunks]) / n
        self._probe_result = ProbeResult(adapted, probe.source_accuracy, n, time.time())
        return self._probe_summary()

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.evaluate_probe()
            except asyncio.CancelledError:
                raise
            except Exception:  # a monitoring fault never stops serving
                log.exception("model %s: probe evaluation failed", self.name)
            await asyncio.sleep(self.config.probe_every_s)

    def _probe_summary(self) -> dict[str, Any]:
        r = self._probe_result
        if r is None:
            return {"probe_accuracy_ratio": None, "probe_forgetting_ratio": None, "probe_samples": None,
                    "probe_last_evaluation_timestamp_seconds": None}
        return {
            "probe_accuracy_ratio": {"adapted": r.adapted, "source": r.source},
            "probe_forgetting_ratio": r.adapted - r.source,  # negative: the adapted model lost accuracy
            "probe_samples": r.samples,
            "probe_last_evaluation_timestamp_seconds": r.evaluated_at,
        }

    def health(self) -> dict[str, Any]:
        """Every health number under its metric's name without ``tta_`` and in its unit (ratios, nats).

        Thread-safe and cheap (no model work): the Prometheus collector calls it at each scrape and
        ``_info`` returns it, so the API and the dashboards show the same numbers. None: not measured.
        """
        stats = self.adapter.stats
        calibration = self.online_calibration()
        accuracy, ece = calibration["accuracy"], calibration["ece"]
        if self.agreement is not None:
            agreement = self.agreement.summary()
        else:
            agreement = {"source_agreement_up": None, "source_agreement_error": None, "source_agreement_ratio": None,
                         "source_agreement_window_samples": 0, "source_agreement_checked_samples_total": 0,
                         "source_agreement_dropped_batches_total": 0}
        return {
            "model_classes": len(self.classes),
            "entropy_ema_nats": stats.entropy_ema,
            "entropy_margin_nats": self.adapter.e0,
            **self.window.summary(),
            "parameter_drift_ratio": self._drift,
            "parameter_version": stats.parameter_version,
            **agreement,
            **self._probe_summary(),
            "feedback_accuracy_ratio": None if accuracy is None else accuracy / 100,
            "feedback_ece_ratio": None if ece is None else ece / 100,
            "feedback_window_samples": calibration["labelled"],
            "state_store_up": None if self.replica is None else self.replica.store_up,
            "replica_leader": None if self.replica is None else self.replica.is_leader,
        }

    def _info(self) -> dict[str, Any]:
        stats = self.adapter.stats
        self._refresh_drift(force=True)
        description = self.adapter.describe()
        return {
            "model": self.name,
            "method": self.adapter.name,
            "mode": self.config.mode,
            "options": description["options"],
            "e0": description["e0"],
            "steps": stats.steps,
            "updates": stats.updates,
            "samples_seen": stats.samples_seen,
            "samples_reliable": stats.samples_reliable,
            "samples_selected": stats.samples_selected,
            "entropy_ema": stats.entropy_ema,
            "parameter_version": stats.parameter_version,
            "parameter_drift": self._drift,
            "resets": dict(stats.resets),
            "last_reset_reason": self._last_reset_reason,
            "images_served": self.counters.images_served,
            "batches": self.counters.batches,
            "frozen_fallbacks": self.counters.frozen_fallbacks,
            "adapt_batches_queued": self.counters.adapt_batches_queued,
            "adapt_batches_dropped": self.counters.adapt_batches_dropped,
            "adapt_samples_dropped": self.counters.adapt_samples_dropped,
            "online": self.online_calibration(),
            "fisher": description.get("fisher", False),
            "replication": self.store_status(),
            "health": self.health(),
        }


def _probe_set(config: ModelConfig) -> ProbeSet | None:
    """The configured probe set; the built-in digits model uses its held-out split by default."""
    try:
        if config.probe_data is not None:
            return ProbeSet.from_npz(config.probe_data, config.probe_size, config.input_size)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {config.name!r}: probe_data: {exc}") from exc
    if config.architecture == "digits" and tuple(config.input_size) == (32, 32):
        from adapters.datasets import to_tensor
        from adapters.models.digits import digits_split

        _, (x, y) = digits_split()
        return ProbeSet(to_tensor(x[: config.probe_size]), torch.from_numpy(y[: config.probe_size]))
    return None


class UnknownModel(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; served models: {self.known}"


class EngineRegistry:
    """The engines of every configured model, by name."""

    def __init__(self, engines: list[ModelEngine]) -> None:
        self._engines = {e.name: e for e in engines}

    def get(self, name: str) -> ModelEngine:
        if name not in self._engines:
            raise UnknownModel(name, sorted(self._engines))
        return self._engines[name]

    def names(self) -> list[str]:
        return sorted(self._engines)

    def __iter__(self):
        return iter(self._engines.values())

    async def start(self) -> None:
        for engine in self._engines.values():
            await engine.start()

    async def stop(self) -> None:
        for engine in self._engines.values():
            await engine.stop()

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self._engines.values())
