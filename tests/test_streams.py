"""Stream orders of the benchmark: every image exactly once, reproducible, and as correlated as named."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.streams import class_runs, correlated_order, dirichlet_order, stream_order


def _labels(n: int = 2000, k: int = 10, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n)


def _batch_class_counts(labels: np.ndarray, batch: int = 64) -> list[int]:
    """Distinct classes in each full batch of the stream."""
    return [len(np.unique(labels[i : i + batch])) for i in range(0, len(labels) - batch + 1, batch)]


@pytest.mark.parametrize("order", ["shuffled", "correlated", "dirichlet"])
def test_every_image_exactly_once_and_same_seed_same_order(order):
    labels = _labels()
    first = stream_order(labels, order, seed=1, alpha=0.1)
    assert sorted(first.tolist()) == list(range(len(labels)))
    assert np.array_equal(first, stream_order(labels, order, seed=1, alpha=0.1))


def test_shuffled_is_the_data_sets_own_order():
    """The default keeps every number measured before the option existed."""
    labels = _labels()
    assert np.array_equal(stream_order(labels, "shuffled", seed=5), np.arange(len(labels)))


def test_correlated_is_sorted_by_class_with_a_seeded_order_inside_each_class():
    labels = _labels()
    a, b = correlated_order(labels, 0), correlated_order(labels, 1)
    assert np.all(np.diff(labels[a]) >= 0)
    assert class_runs(labels[a]) == 10
    assert not np.array_equal(a, b)  # the images inside a class are reshuffled per seed
    assert np.array_equal(labels[a], labels[b])


def test_dirichlet_differs_between_seeds():
    labels = _labels()
    assert not np.array_equal(dirichlet_order(labels, 0.1, 0), dirichlet_order(labels, 0.1, 1))


def test_small_alpha_gives_class_concentrated_batches_large_alpha_near_shuffled():
    """Large alpha: each chunk of N/K images holds about N/K^2 of every class (contiguous runs of ~20
    here, as in the reference), so a window of one chunk looks like an i.i.d. sample."""
    labels = _labels()
    small = labels[dirichlet_order(labels, 0.1, 0)]
    large = labels[dirichlet_order(labels, 1000.0, 0)]
    assert np.mean(_batch_class_counts(labels)) > 9.5  # 64 i.i.d. images almost always cover all 10 classes
    assert np.mean(_batch_class_counts(small)) < 3.0
    assert np.mean(_batch_class_counts(large)) > 3.5
    assert np.mean(_batch_class_counts(small, 200)) < 5.5
    assert np.mean(_batch_class_counts(large, 200)) > 9.5
    assert class_runs(small) < class_runs(large)


def test_dirichlet_on_a_tiny_stream_and_bad_alpha():
    labels = np.repeat(np.arange(10), 5)  # 50 images: 10 per chunk would be the whole quota
    order = dirichlet_order(labels, 0.1, 0)
    assert sorted(order.tolist()) == list(range(50))
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_order(labels, 0.0, 0)
    with pytest.raises(ValueError, match="alpha"):
        stream_order(labels, "dirichlet", 0)
    with pytest.raises(ValueError, match="unknown stream order"):
        stream_order(labels, "sorted", 0)  # type: ignore[arg-type]
