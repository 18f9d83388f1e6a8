"""A confidence map fitted on clean, labelled source data: Platt scaling of the top probability.

Why: entropy minimisation makes every adapting method over-confident, more so the stronger the shift,
and EATA-C's sub-network deflation (``confidence='subnetwork'``) cures that on severity 5 only by
deflating every answer, which miscalibrates clean traffic. A two-parameter map fitted once on clean
images with labels (data an operator has: the Fisher set, a validation split) learns how far the
model's top probability overstates its accuracy, ``conf = sigmoid(a + b * logit(p_top))``. The label is
never changed: the answer's logits are temperature-scaled per sample to the mapped confidence.
"""

from __future__ import annotations

import torch
from torch import nn

#: Top probabilities are clipped to [EPS, 1 - EPS] before the logit.
EPS = 1e-6


def top_probability_logit(logits: torch.Tensor) -> torch.Tensor:
    """logit(max softmax) per sample, float64."""
    top = logits.double().softmax(1).max(1).values.clamp(EPS, 1 - EPS)
    return top.log() - (1 - top).log()


def mapped_confidence(logits: torch.Tensor, confidence_map: tuple[float, float]) -> torch.Tensor:
    """The map's confidence of each sample's predicted label."""
    a, b = confidence_map
    return torch.sigmoid(a + b * top_probability_logit(logits)).to(logits.dtype)


def fit_confidence_map(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(a, b) minimising the log loss of ``sigmoid(a + b * logit(p_top))`` against whether the top label
    is right, on clean labelled data (logistic regression on one feature, L-BFGS)."""
    if logits.shape[0] != labels.shape[0] or logits.shape[0] < 2:
        raise ValueError(f"need at least 2 logits with one label each, got {logits.shape[0]} and {labels.shape[0]}")
    feature = top_probability_logit(logits.detach())
    correct = (logits.argmax(1) == labels.to(logits.device)).double()
    params = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(params[0] + params[1] * feature, correct)
        loss.backward()
        return loss

    optimizer.step(closure)
    a, b = (float(v) for v in params.detach())
    return a, b


def pre_adaptation_logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """EATA-C's full-network logits for ``images`` before it adapts (batch statistics, batches of
    ``batch_size``, no update, no calibration): what the map is fitted on, by the server and the benchmark."""
    from adapters.registry import create  # the registry imports the methods, which import this module

    answering = create("eata-c", model, confidence="full")
    with torch.no_grad():
        return torch.cat([answering.predict(images[i : i + batch_size]).cpu()
                          for i in range(0, images.shape[0], batch_size)])


def fit_confidence_map_on_images(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                                 batch_size: int) -> tuple[float, float]:
    """:func:`fit_confidence_map` on EATA-C's pre-adaptation answers to clean labelled ``images``."""
    return fit_confidence_map(pre_adaptation_logits(model, images, batch_size), labels)
