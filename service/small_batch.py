"""No-gradient answers of a batch-statistics model, whatever the batch size (the small-batch policy).

Adapting methods normalise BatchNorm layers with the statistics of the current batch, so a lone image
has no meaningful statistics. How each batch is answered (docs/serving.md):

* at least ``min_adapt_batch`` images: its own statistics (through a traced graph when tracing is on,
  which keeps recording the recent statistics);
* fewer, with recent statistics available: normalised with moving averages of recent large batches'
  statistics (``recent_statistics``), through a traced graph that reads the live weights;
* fewer, without them: predicted together with recent inputs as context, only its own rows returned;
* fewer, and no context yet (just after start): the frozen source model answers (counted).

Runs on the model's worker thread only; the engine owns the thread and asks this unit for logits.
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch

import adapters
from adapters.recent_statistics import RecentBatchStatistics
from service.frozen_graph import trace_shared
from service.settings import ModelConfig


class SmallBatchPredictor:
    """Answers batches without updating: batch statistics, recent statistics, context or the source."""

    def __init__(self, config: ModelConfig, adapter: adapters.Adapter, source: adapters.Adapter) -> None:
        self.config = config
        self.adapter = adapter
        self.source = source
        self.frozen_fallbacks = 0  # images the source answered for lack of context
        self._context: deque[torch.Tensor] = deque(maxlen=max(config.context_size, 0))
        self.recent: RecentBatchStatistics | None = None
        self.robust = bool(adapter.robust_layers)  # robust statistics need no batch-mates
        if config.recent_statistics and adapter.uses_batch_statistics and not self.robust:
            self.recent = RecentBatchStatistics(adapter.model, config.min_adapt_batch)
        self._recent_graph_module: torch.nn.Module | None = None
        self._recent_graph_tried = False
        self._batch_graph_module: torch.nn.Module | None = None
        self._batch_graph_tried = False
        self._robust_graphs: dict[float, torch.nn.Module | None] = {}

    def remember(self, x: torch.Tensor) -> None:
        """Served inputs become context for later small batches."""
        self._context.extend(x.detach().cpu().unbind(0))

    def forget(self) -> None:
        """After a reset the averages describe weights that are gone."""
        if self.recent is not None:
            self.recent.clear()

    def not_served(self) -> contextlib.AbstractContextManager:
        """A pass that is not served traffic (probe evaluations) leaves the recent statistics alone."""
        return self.recent.paused() if self.recent is not None else contextlib.nullcontext()

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for ``x`` by the policy above (only batch-statistics methods come here), and each image's
        model divergence where the adapter computes one (EATA-C; None for the frozen fallback)."""
        if self.robust:  # moving-average (or source-mixed) statistics: any batch size, a lone image too
            blend = self.adapter.plain_pass_blend(x.shape[0])
            graph = None if blend is None else self._robust_graph(blend)
            if graph is None:
                return self.adapter.predict_with_divergence(x)
            with torch.no_grad():
                return graph(x.to(self.adapter.device)), None
        n = x.shape[0]
        recent = self.recent
        if n >= self.config.min_adapt_batch:
            graph = self._batch_graph() if recent is None or recent.updates > 0 else None
            if graph is None:
                return self.adapter.predict_with_divergence(x)
            with torch.no_grad():
                logits = graph(x.to(self.adapter.device))
            if recent is not None:
                recent.recorded()
            return logits, None
        if recent is not None and recent.ready(max_served=self.config.recent_statistics_images):
            recent.served_since_update += n
            graph = self._recent_graph()
            if graph is not None:
                with torch.no_grad():
                    return graph(x.to(self.adapter.device)), None
            with recent.applied():
                return self.adapter.predict_with_divergence(x)
        need = self.config.min_adapt_batch - n
        context = list(self._context)[-need:] if need > 0 else []
        if not context:
            self.frozen_fallbacks += n
            return self.source.predict(x), None
        padded = torch.cat([x, torch.stack(context).to(x.device)])
        logits, divergence = self.adapter.predict_with_divergence(padded)
        return logits[:n], None if divergence is None else divergence[:n]

    def _robust_graph(self, blend: float) -> torch.nn.Module | None:
        """The adapted model with robust statistics (``bn_stats='auto'``, the served default) normalising with
        ``blend`` of the batch, as a traced graph that reads the live weights and averages, while the
        traffic is judged i.i.d. (:meth:`adapters.Adapter.plain_pass_blend`). Next to a busy event loop the
        eager pass takes the GIL per layer, which costs most at the small batches a saturated async model
        also serves (docs/benchmarks.md). Built once per blend, on first use; None where tracing is off or
        fails."""
        if blend not in self._robust_graphs:
            graph = None
            if self.config.trace_source:
                self.adapter.normalise_blended(blend)
                graph = trace_shared(self.adapter.model, self.config.input_size, self.config.channels_last,
                                     self.config.name)
            self._robust_graphs[blend] = graph
        return self._robust_graphs[blend]

    def _traceable(self) -> bool:
        """Whether the adapter's answers are its model's output (not EATA-C's own forward or calibration)
        and tracing is on: then its no-gradient answers may come from traced graphs."""
        return (self.config.trace_source and self.adapter.traceable and self.adapter.features is None
                and not self.robust)  # LAME and robust statistics act in the adapter's own forward

    def _recent_graph(self) -> torch.nn.Module | None:
        """The adapted model normalising with the recent statistics as a traced graph (built once, on first
        use). Not frozen: it reads the live parameters and averages, so it always answers as the eager
        model would, without taking the GIL per layer. None for methods with their own forward or
        calibration (EATA-C) and when tracing is off or fails."""
        if not self._recent_graph_tried:
            self._recent_graph_tried = True
            if self._traceable() and self.recent is not None:
                with self.recent.applied():
                    self._recent_graph_module = trace_shared(self.adapter.model, self.config.input_size,
                                                             self.config.channels_last, self.config.name)
        return self._recent_graph_module

    def _batch_graph(self) -> torch.nn.Module | None:
        """The adapted model normalising with each batch's own statistics as a traced graph, for no-gradient
        answers to large batches (async mode, followers, ``norm``): about 20 % less time per batch than eager
        next to a busy event loop (docs/benchmarks.md). Like the eager pass it updates the recent statistics.
        Built once, on first use; None as for :meth:`_recent_graph`."""
        if not self._batch_graph_tried:
            self._batch_graph_tried = True
            if self._traceable():
                recent = self.recent
                with recent.tracing() if recent is not None else contextlib.nullcontext():
                    self._batch_graph_module = trace_shared(self.adapter.model, self.config.input_size,
                                                            self.config.channels_last, self.config.name)
        return self._batch_graph_module
