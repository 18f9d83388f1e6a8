"""One model's health: the instruments of ``service/health.py`` and the one snapshot everybody reads.

:class:`HealthMonitor` owns the prediction window, the source-agreement check, the probe set (and its
periodic evaluation) and the parameter drift. :meth:`HealthMonitor.snapshot` returns a typed
:class:`HealthSnapshot`; ``GET /v1/models/{name}/adaptation`` shows it under ``health`` and the
Prometheus collector exports each field ``f`` as the gauge ``tta_f``, so the API and the dashboards
cannot disagree. Every ratio is 0-1, every entropy in nats; None means "not measured".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import adapters
from service.errors import ModelLoadError
from service.feedback import FeedbackLedger
from service.health import MeanWindow, PredictionWindow, ProbeResult, ProbeSet, SourceAgreement
from service.replication_contract import ReplicationPeer
from service.settings import ModelConfig

log = logging.getLogger(__name__)

#: Runs a no-update evaluation of a batch on the model's thread at adaptation priority; returns its logits.
ProbeRunner = Callable[[adapters.Adapter, torch.Tensor], Awaitable[torch.Tensor]]
#: Called when a probe evaluation finds the adapted model worse than the source by more than the
#: configured margin, with the (negative) accuracy difference.
WorseThanSource = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class HealthSnapshot:
    """Every health number of a model, named as its metric without ``tta_``."""

    model_classes: int
    entropy_ema_nats: float | None
    entropy_margin_nats: float | None
    prediction_window_samples: int
    predicted_class_entropy_nats: float | None
    mean_confidence_ratio: float | None
    mean_divergence_nats: float | None
    batch_distinct_classes_ratio: float | None
    traffic_correlated: bool | None
    traffic_class_diversity_ratio: float | None
    parameter_drift_ratio: float
    parameter_version: int
    source_agreement_up: bool | None
    source_agreement_error: str | None
    source_agreement_ratio: float | None
    source_agreement_window_samples: int
    source_agreement_checked_samples_total: int
    source_agreement_dropped_batches_total: int
    probe_accuracy_ratio: dict[str, float] | None
    probe_forgetting_ratio: float | None
    probe_samples: int | None
    probe_last_evaluation_timestamp_seconds: float | None
    feedback_accuracy_ratio: float | None
    feedback_ece_ratio: float | None
    feedback_window_samples: int
    state_store_up: bool | None
    replica_leader: bool | None
    queue_depth_images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_NO_AGREEMENT = {"source_agreement_up": None, "source_agreement_error": None, "source_agreement_ratio": None,
                 "source_agreement_window_samples": 0, "source_agreement_checked_samples_total": 0,
                 "source_agreement_dropped_batches_total": 0}


class HealthMonitor:
    """Collapse, forgetting and calibration signals of one served model."""

    def __init__(self, config: ModelConfig, adapter: adapters.Adapter, source_module: torch.nn.Module,
                 classes: int, feedback: FeedbackLedger, replica: ReplicationPeer | None = None) -> None:
        self.config = config
        self.adapter = adapter
        self.classes = classes
        self.feedback = feedback
        self.replica = replica
        self.window = PredictionWindow(config.health_window)
        self.divergence = MeanWindow(config.health_window)
        self.agreement: SourceAgreement | None = None  # started with the engine
        self.probe = probe_set(config)
        self._source_module = source_module
        self._probe_result: ProbeResult | None = None
        self._probe_task: asyncio.Task | None = None
        self._drift = 0.0
        self._drift_key: tuple[int, int] | None = None
        self._on_worse: WorseThanSource | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, run_probe: ProbeRunner, source: adapters.Adapter,
              on_worse: WorseThanSource | None = None) -> None:
        """Start the agreement check (its ONNX export runs on its own thread) and the probe loop."""
        self._on_worse = on_worse
        if self.config.agreement_fraction > 0 and self.adapter.uses_batch_statistics:
            self.agreement = SourceAgreement(self._source_module, self.config.input_size,
                                             fraction=self.config.agreement_fraction, window=self.config.health_window)
        if self.probe is not None and self.config.probe_every_s > 0:
            self._probe_task = asyncio.create_task(self._probe_loop(run_probe, source),
                                                   name=f"probe-{self.config.name}")

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        if self.agreement is not None:
            self.agreement.stop()

    # ------------------------------------------------------------------ what the engine reports
    def served(self, x: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, by_adapted: bool,
               divergence: torch.Tensor | None = None) -> None:
        """A served batch's answers; ``by_adapted``: the adapted model answered (not the frozen fallback);
        ``divergence``: each answer's model divergence (EATA-C), None for methods without one."""
        self.window.add(labels, confidence)
        if divergence is not None:
            self.divergence.add(divergence.tolist())
        if self.agreement is not None and by_adapted:
            self.agreement.offer(x, labels)

    def refresh_drift(self, force: bool = False) -> None:
        """Recompute the parameter drift when the weights changed (model thread); scrapes read the float."""
        key = (id(self.adapter.stats), self.adapter.stats.parameter_version)
        if force or key != self._drift_key:
            self._drift = self.adapter.parameter_drift()
            self._drift_key = key

    @property
    def drift(self) -> float:
        return self._drift

    # ------------------------------------------------------------------ forgetting: the probe set
    async def evaluate_probe(self, run_probe: ProbeRunner, source: adapters.Adapter) -> dict[str, Any] | None:
        """Evaluate the probe set now: the adapted weights (no update) and, once, the source model.

        Each batch is its own low-priority job on the model thread, so requests are served in between;
        the weights may move during an evaluation, which the accuracy then averages over.
        """
        probe = self.probe
        if probe is None:
            return None

        async def correct(model: adapters.Adapter, x: torch.Tensor, y: torch.Tensor) -> int:
            return probe.correct(await run_probe(model, x), y)

        chunks = probe.chunks(self.config.max_batch_size)
        n = probe.labels.shape[0]
        if probe.source_accuracy is None:
            probe.source_accuracy = sum([await correct(source, x, y) for x, y in chunks]) / n
        adapted = sum([await correct(self.adapter, x, y) for x, y in chunks]) / n
        self._probe_result = ProbeResult(adapted, probe.source_accuracy, n, time.time())
        summary = self._probe_summary()
        margin = self.config.reset_when_worse_than_source
        gap = adapted - probe.source_accuracy
        if margin is not None and gap < -margin and self._on_worse is not None:
            await self._on_worse(gap)
        return summary

    async def _probe_loop(self, run_probe: ProbeRunner, source: adapters.Adapter) -> None:
        while True:
            try:
                await self.evaluate_probe(run_probe, source)
            except asyncio.CancelledError:
                raise
            except Exception:  # a monitoring fault never stops serving
                log.exception("model %s: probe evaluation failed", self.config.name)
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

    def _switch_summary(self) -> dict[str, Any]:
        """What ``correlated_traffic: auto`` decided (None without its switch)."""
        switch = self.adapter.switch
        if switch is None:
            return {"traffic_correlated": None, "traffic_class_diversity_ratio": None}
        return {"traffic_correlated": switch.correlated, "traffic_class_diversity_ratio": switch.smoothed}

    # ------------------------------------------------------------------ the snapshot
    def snapshot(self, queue_depth_images: int = 0) -> HealthSnapshot:
        """Thread-safe and cheap (no model work): the collector calls it at every scrape."""
        stats = self.adapter.stats
        calibration = self.feedback.calibration()
        return HealthSnapshot(
            model_classes=self.classes,
            entropy_ema_nats=stats.entropy_ema,
            entropy_margin_nats=self.adapter.e0,
            **self.window.summary(),
            mean_divergence_nats=self.divergence.mean(),
            **self._switch_summary(),
            parameter_drift_ratio=self._drift,
            parameter_version=stats.parameter_version,
            **(self.agreement.summary() if self.agreement is not None else _NO_AGREEMENT),
            **self._probe_summary(),
            feedback_accuracy_ratio=calibration.accuracy,
            feedback_ece_ratio=calibration.ece,
            feedback_window_samples=calibration.labelled,
            state_store_up=None if self.replica is None else self.replica.store_up,
            replica_leader=None if self.replica is None else self.replica.is_leader,
            queue_depth_images=queue_depth_images,
        )


def probe_set(config: ModelConfig) -> ProbeSet | None:
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
