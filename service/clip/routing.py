"""Route tables: which expert runs an image, from its CLIP embedding (pure numpy, no model inside).

A route's embedding is the mean of its normalised prompt embeddings, normalised again. For an image,
the cosines with every route are multiplied by exp(logit_scale) and soft-maxed; the best route wins
unless its probability, its margin over the second route or its cosine is below the table's
threshold, in which case the default expert runs and the reason is recorded. The same embeddings
feed :class:`DriftTracker`, a label-free shift signal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.clip.config import RouteTableConfig

log = logging.getLogger(__name__)

LOW_PROBABILITY = "low_probability"
LOW_MARGIN = "low_margin"
LOW_COSINE = "low_cosine"
CLIP_ERROR = "clip_error"
FALLBACK_REASONS = (LOW_PROBABILITY, LOW_MARGIN, LOW_COSINE, CLIP_ERROR)


@dataclass(frozen=True)
class Route:
    name: str
    expert: str
    prompts: tuple[str, ...]


@dataclass
class Choice:
    """One image's routing decision. ``route`` is CLIP's best route (None when CLIP failed);
    ``expert`` is what runs: the route's expert, or the default one when ``fallback`` names why."""

    expert: str
    route: str | None
    probability: float | None
    margin: float | None
    cosine: float | None
    fallback: str | None
    probabilities: dict[str, float] = field(default_factory=dict)


def route_embedding(prompt_embeddings: np.ndarray) -> np.ndarray:
    """Normalised prompt embeddings [P, D] -> the route's normalised mean embedding [D]."""
    mean = (prompt_embeddings / np.linalg.norm(prompt_embeddings, axis=1, keepdims=True)).mean(0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class RouteTable:
    """Routes with their embeddings and the fallback rules of one table."""

    def __init__(
        self,
        name: str,
        routes: list[Route],
        embeddings: np.ndarray,
        default_expert: str,
        *,
        logit_scale: float,
        min_probability: float = 0.0,
        min_margin: float = 0.0,
        min_cosine: float | None = None,
    ) -> None:
        if embeddings.shape[0] != len(routes):
            raise ValueError(f"{len(routes)} routes but {embeddings.shape[0]} route embeddings")
        self.name = name
        self.routes = routes
        self.embeddings = embeddings.astype(np.float32)
        self.default_expert = default_expert
        self.logit_scale = logit_scale
        self.scale = float(np.exp(logit_scale))
        self.min_probability = min_probability
        self.min_margin = min_margin
        self.min_cosine = min_cosine

    @classmethod
    def from_config(
        cls, name: str, config: RouteTableConfig, embed_prompts: Callable[[list[str]], np.ndarray], logit_scale: float
    ) -> RouteTable:
        """Embed every route's prompts once (``embed_prompts`` returns normalised [P, D])."""
        routes = [Route(r.name, r.expert, tuple(r.prompts)) for r in config.routes]
        embeddings = np.stack([route_embedding(embed_prompts(list(r.prompts))) for r in routes])
        return cls(
            name, routes, embeddings, config.default_expert,
            logit_scale=config.logit_scale if config.logit_scale is not None else logit_scale,
            min_probability=config.min_probability, min_margin=config.min_margin, min_cosine=config.min_cosine,
        )

    @property
    def experts(self) -> list[str]:
        return list(dict.fromkeys([*(r.expert for r in self.routes), self.default_expert]))

    def decide(self, image_embeddings: np.ndarray) -> list[Choice]:
        """Normalised image embeddings [N, D] -> one :class:`Choice` per image."""
        cosines = image_embeddings @ self.embeddings.T
        probs = softmax(cosines * self.scale)
        order = np.argsort(-probs, axis=1)
        choices = []
        for i in range(len(image_embeddings)):
            if not np.isfinite(cosines[i]).all():  # a broken embedding is a CLIP failure for that image
                choices.append(self.fall_back(1, CLIP_ERROR)[0])
                continue
            best = int(order[i, 0])
            p_best = float(probs[i, best])
            margin = p_best - float(probs[i, order[i, 1]]) if len(self.routes) > 1 else p_best
            cosine = float(cosines[i, best])
            fallback = None
            if p_best < self.min_probability:
                fallback = LOW_PROBABILITY
            elif margin < self.min_margin:
                fallback = LOW_MARGIN
            elif self.min_cosine is not None and cosine < self.min_cosine:
                fallback = LOW_COSINE
            route = self.routes[best]
            choices.append(
                Choice(
                    expert=self.default_expert if fallback else route.expert,
                    route=route.name,
                    probability=p_best,
                    margin=margin,
                    cosine=cosine,
                    fallback=fallback,
                    probabilities={r.name: float(p) for r, p in zip(self.routes, probs[i], strict=True)},
                )
            )
        return choices

    def fall_back(self, n: int, reason: str) -> list[Choice]:
        """Every image to the default expert (CLIP failed)."""
        return [Choice(self.default_expert, None, None, None, None, reason) for _ in range(n)]


class DriftTracker:
    """Cosine distance between a moving centroid of image embeddings and a reference centroid.

    The reference is given, or the mean of the first ``reference_size`` embeddings. The score is 0
    while the stream looks like the reference and grows as its content or conditions move away
    (0 = same direction, 1 = orthogonal); None until the reference is complete.
    """

    def __init__(self, reference_size: int = 256, momentum: float = 0.99, reference: np.ndarray | None = None) -> None:
        self.reference_size = reference_size
        self.momentum = momentum
        self._sum: np.ndarray | None = None
        self._count = 0
        self.reference = None if reference is None else np.asarray(reference, np.float64).ravel()
        self.centroid: np.ndarray | None = None
        self._lock = threading.Lock()  # requests update it from the thread pool

    def update(self, embeddings: np.ndarray) -> float | None:
        """Fold a batch of normalised embeddings in; returns the current score."""
        e = np.asarray(embeddings, np.float64)
        with self._lock:
            if self.reference is None:
                take = e[: self.reference_size - self._count]
                self._sum = take.sum(0) if self._sum is None else self._sum + take.sum(0)
                self._count += len(take)
                if self._count >= self.reference_size:
                    self.reference = self._sum / self._count
            for row in e:  # a batch is at most a few dozen rows; the recurrence is clearer than its closed form
                self.centroid = row.copy() if self.centroid is None else (
                    self.momentum * self.centroid + (1 - self.momentum) * row
                )
            return self._score()

    def score(self) -> float | None:
        with self._lock:
            return self._score()

    def _score(self) -> float | None:
        if self.reference is None or self.centroid is None:
            return None
        denom = max(float(np.linalg.norm(self.reference) * np.linalg.norm(self.centroid)), 1e-12)
        return float(1.0 - self.reference @ self.centroid / denom)


class SelectionObserver:
    """Hooks the metrics implement; the defaults do nothing."""

    def on_choices(self, table: str, choices: list[Choice], seconds: float) -> None: ...

    def on_drift(self, table: str, score: float) -> None: ...

    def on_detections(self, detector: str, count: int) -> None: ...


class ExpertSelector:
    """CLIP + one route table: embeds images and decides; never raises for a CLIP failure."""

    def __init__(
        self,
        embed: Callable[[list], np.ndarray],
        table: RouteTable,
        *,
        drift: DriftTracker | None = None,
        observer: SelectionObserver | None = None,
    ) -> None:
        self.embed = embed
        self.table = table
        self.drift = drift
        self.observer = observer or SelectionObserver()

    @property
    def name(self) -> str:
        return self.table.name

    def choose(self, images: list) -> list[Choice]:
        """One choice per image (PIL images). Runs CLIP synchronously: call it off the event loop."""
        started = time.perf_counter()
        try:
            embeddings = self.embed(images)
        except Exception as exc:  # a broken CLIP must not fail what the default expert can serve
            log.warning("route table %s: CLIP failed (%s: %s); %d images go to the default expert %s",
                        self.name, type(exc).__name__, exc, len(images), self.table.default_expert)
            choices = self.table.fall_back(len(images), CLIP_ERROR)
            self.observer.on_choices(self.name, choices, time.perf_counter() - started)
            return choices
        seconds = time.perf_counter() - started
        choices = self.table.decide(embeddings)
        self.observer.on_choices(self.name, choices, seconds)
        finite = np.isfinite(embeddings).all(axis=1)
        if self.drift is not None and finite.any():
            score = self.drift.update(embeddings[finite])
            if score is not None:
                self.observer.on_drift(self.name, score)
        return choices
