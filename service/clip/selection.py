"""Routing for the app: the CLIP model, the detectors and one selector per route table, built once.

``Routing.detect`` serves ``POST /v1/detect``; ``Routing.predict`` serves a routed ensemble's
predict route by handing each group of images to its expert's engine (which batches and may adapt
as usual, so every expert adapts to the images of its own domain only).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry

from service.clip.config import RoutingConfig
from service.clip.manifest import ClipLoadError
from service.clip.metrics import RoutingMetrics
from service.clip.preprocess import classifier_tensor
from service.clip.routing import Choice, DriftTracker, ExpertSelector, RouteTable, SelectionObserver
from service.clip.towers import ClipModel
from service.detection import Detection, DetectorError, OnnxDetector
from service.engine import EngineRegistry, ModelEngine, Prediction

log = logging.getLogger(__name__)


class RoutingLoadError(RuntimeError):
    """Routing that cannot be served (missing files, unknown experts); the message says which."""


@dataclass
class RoutedPrediction:
    choice: Choice
    engine: ModelEngine
    prediction: Prediction


class Routing:
    def __init__(
        self,
        clip: ClipModel,
        selectors: dict[str, ExpertSelector],
        detectors: dict[str, OnnxDetector],
        observer: SelectionObserver | None = None,
    ) -> None:
        self.clip = clip
        self.selectors = selectors
        self.detectors = detectors
        self.observer = observer or SelectionObserver()

    # ------------------------------------------------------------------ detection
    async def detect(self, images: list[Image.Image]) -> list[tuple[Choice, list[Detection]]]:
        """Route every image, run each chosen detector once on its group, answer in request order."""
        choices = await asyncio.to_thread(self.selectors["detect"].choose, images)
        groups = _group(choices)
        runs = [asyncio.to_thread(self.detectors[e].detect, [images[i] for i in idx]) for e, idx in groups.items()]
        results: list[list[Detection]] = [[] for _ in images]
        for (expert, idx), found in zip(groups.items(), await asyncio.gather(*runs), strict=True):
            for i, boxes in zip(idx, found, strict=True):
                results[i] = boxes
            self.observer.on_detections(expert, sum(len(b) for b in found))
        return list(zip(choices, results, strict=True))

    # ------------------------------------------------------------------ routed classifiers
    async def predict(self, table: str, registry: EngineRegistry, images: list[Image.Image]) -> list[RoutedPrediction]:
        """Route every image of an ensemble to its expert's engine; answer in request order."""
        choices = await asyncio.to_thread(self.selectors[table].choose, images)

        async def run(expert: str, idx: list[int]) -> list[Prediction]:
            engine = registry.get(expert)
            x = await asyncio.to_thread(classifier_tensor, [images[i] for i in idx], engine.config.input_size)
            return await engine.predict(x)

        groups = _group(choices)
        answers = await asyncio.gather(*(run(e, idx) for e, idx in groups.items()))
        out: list[RoutedPrediction | None] = [None] * len(images)
        for (expert, idx), predictions in zip(groups.items(), answers, strict=True):
            engine = registry.get(expert)
            for i, p in zip(idx, predictions, strict=True):
                out[i] = RoutedPrediction(choices[i], engine, p)
        return out  # type: ignore[return-value]

    def image_limit(self, table: str, registry: EngineRegistry) -> int:
        """Most images one routed request may carry: the smallest limit among the table's experts."""
        return min(registry.get(e).config.max_images_per_request for e in self.selectors[table].table.experts)


def _group(choices: list[Choice]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, choice in enumerate(choices):
        groups.setdefault(choice.expert, []).append(i)
    return groups


def build_routing(
    config: RoutingConfig,
    model_names: list[str],
    *,
    base: Path | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> Routing:
    """Load CLIP and the detectors, embed every route's prompts once, check every expert exists.

    ``base`` resolves relative paths (the config file's folder); ``model_names`` are the served
    classifiers that ensembles may route to. Raises :class:`RoutingLoadError` naming the problem.
    """
    if base is not None:
        config = config.resolve_paths(base)
    for name, table in config.ensembles.items():
        if name in model_names:
            raise RoutingLoadError(f"routing.ensembles.{name}: the name is already a served model")
        unknown = [e for e in table.experts() if e not in model_names]
        if unknown:
            raise RoutingLoadError(
                f"routing.ensembles.{name}: experts {unknown} are not served models (served: {sorted(model_names)})"
            )
    try:
        clip = ClipModel(config.clip, threads=config.threads)
        detectors = {d.name: OnnxDetector(d, threads=config.threads) for d in config.detectors}
        reference = None
        if config.drift.reference is not None:
            reference = np.load(config.drift.reference, allow_pickle=False)
            if reference.shape[-1] != clip.manifest.embed_dim:
                raise RoutingLoadError(
                    f"routing.drift.reference has size {reference.shape[-1]}, CLIP embeds in {clip.manifest.embed_dim}"
                )
        observer = RoutingMetrics(metrics_registry) if metrics_registry is not None else None
        selectors = {}
        for name, table_config in config.tables().items():
            table = RouteTable.from_config(name, table_config, clip.embed_prompts, clip.logit_scale)
            drift = DriftTracker(config.drift.reference_size, config.drift.momentum, reference)
            selectors[name] = ExpertSelector(clip.embed_pil, table, drift=drift, observer=observer)
            log.info("route table %s: routes %s, default expert %s", name, [r.name for r in table.routes],
                     table.default_expert)
    except (ClipLoadError, DetectorError, OSError, ValueError) as exc:
        raise RoutingLoadError(f"routing: {exc}") from exc
    return Routing(clip, selectors, detectors, observer)
