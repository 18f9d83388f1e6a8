"""The one JSON shape of a served prediction: the v1 routes, routed ensembles, WebSocket and stream.

The engine hands out :class:`~service.engine.Prediction` objects holding tensors; everything a client
reads is made here, so every transport says the same thing under the same names.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from service.engine import Prediction

DEFAULT_TOP_K = 3


def prediction_fields(p: Prediction, classes: list[str], top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """A prediction as plain values, with its ``top_k`` classes (capped at the class count). ``divergence``
    (EATA-C's model uncertainty, nats) is None for other methods."""
    top_p, top_i = p.probabilities.topk(min(top_k, len(classes)))
    return {
        "request_id": p.request_id,
        "label": p.label,
        "class_name": classes[p.label],
        "confidence": p.confidence,
        "entropy": p.entropy,
        "top_k": [
            {"label": i, "class_name": classes[i], "probability": v}
            for v, i in zip(top_p.tolist(), top_i.tolist(), strict=True)
        ],
        "reliable": p.reliable,
        "selected": p.selected,
        "parameter_version": p.parameter_version,
        "divergence": p.divergence,
    }


def classification_strings(predictions: list[Prediction], classes: list[str], top: int) -> list[str]:
    """Triton's classification extension: each prediction's ``top`` classes as ``"score:index:label"``,
    most probable first, flattened row by row (shape ``[N, top]``; ``top`` capped at the class count)."""
    top = min(top, len(classes))
    out = []
    for p in predictions:
        values, indices = p.probabilities.topk(top)
        out += [f"{v:f}:{i}:{classes[i]}" for v, i in zip(values.tolist(), indices.tolist(), strict=True)]
    return out


def divergence_vector(predictions: list[Prediction]) -> np.ndarray:
    """Every prediction's model divergence as one little-endian float32 array of shape [N] (the v2
    ``divergence`` output); NaN for an answer without one (the frozen fallback before any context)."""
    values = [math.nan if p.divergence is None else p.divergence for p in predictions]
    return np.asarray(values, dtype="<f4")


def probability_matrix(predictions: list[Prediction]) -> np.ndarray:
    """Every prediction's class probabilities as one little-endian float32 N x C array (the v2 output)."""
    return torch.stack([p.probabilities for p in predictions]).numpy().astype("<f4", copy=False)
