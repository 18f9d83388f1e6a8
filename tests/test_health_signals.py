"""Label-free traffic signals: how class-correlated the served batches are."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from service.health import PredictionWindow, distinct_class_ratio


def _served(batches: list[np.ndarray]) -> float | None:
    window = PredictionWindow(1000)
    for labels in batches:
        window.add(torch.from_numpy(labels), torch.full((len(labels),), 0.9))
    return window.summary()["batch_distinct_classes_ratio"]


@pytest.mark.parametrize("batch", [8, 16, 64])
def test_shuffled_traffic_reads_about_one_at_any_batch_size(batch):
    rng = np.random.default_rng(0)
    assert _served([rng.integers(0, 10, batch) for _ in range(64)]) == pytest.approx(1.0, abs=0.12)


def test_one_class_per_batch_reads_low_and_a_dirichlet_like_mix_in_between():
    rng = np.random.default_rng(1)
    sorted_by_class = [np.full(16, k % 10) for k in range(64)]
    assert _served(sorted_by_class) < 0.2
    two_classes = [rng.choice(rng.choice(10, 2, replace=False), 16) for _ in range(64)]
    assert 0.2 < _served(two_classes) < 0.4


def test_small_batches_are_left_out_and_an_empty_window_reports_nothing():
    assert _served([]) is None
    assert _served([np.array([1, 2, 3])]) is None  # below DIVERSITY_MIN_BATCH: no evidence either way


def test_the_expectation_is_that_of_independent_draws_from_the_window():
    window = Counter({0: 50, 1: 50})  # two equally likely classes, 4 draws: 2 * (1 - 0.5**4) = 1.875 expected
    assert distinct_class_ratio([0, 1, 0, 1], window, 100) == pytest.approx(2 / 1.875)
    assert distinct_class_ratio([0, 0, 0, 0], window, 100) == pytest.approx(1 / 1.875)
