"""Normalising tiny batches with recent BatchNorm statistics instead of their own."""

from __future__ import annotations

import torch
from helpers import small_bn_cnn

from adapters.configure import use_batch_statistics
from adapters.recent_statistics import RecentBatchStatistics


def adapting_model():
    return use_batch_statistics(small_bn_cnn())


def test_a_recorded_batch_normalised_with_the_averages_gives_its_batch_mode_output():
    model = adapting_model()
    recent = RecentBatchStatistics(model, min_batch=8)
    x = torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        batch_mode = model(x)  # records (the first record is the batch's own statistics)
        assert recent.ready(max_served=64)
        with recent.applied():
            averaged = model(x)
            alone = model(x[:1])
    # The averages hold the unbiased variance (as BatchNorm's running statistics do): a relative n/(n-1).
    torch.testing.assert_close(averaged, batch_mode, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(alone, batch_mode[:1], atol=1e-3, rtol=1e-3)  # no batch-mates needed


def test_small_batches_are_not_recorded_and_the_layers_return_to_batch_statistics():
    model = adapting_model()
    recent = RecentBatchStatistics(model, min_batch=8)
    with torch.no_grad():
        model(torch.rand(4, 3, 8, 8))
    assert not recent.ready(max_served=64)
    with torch.no_grad():
        model(torch.rand(8, 3, 8, 8))
        with recent.applied():
            model(torch.rand(2, 3, 8, 8))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bn.training for bn in bns)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():  # batch statistics again: a 2-image batch's rows depend on each other
        assert not torch.allclose(model(x)[:1], model(x[:1]), atol=1e-3)


def test_averages_go_stale_after_many_small_batch_images():
    model = adapting_model()
    recent = RecentBatchStatistics(model, min_batch=8)
    with torch.no_grad():
        model(torch.rand(8, 3, 8, 8))
    recent.served_since_update = 64
    assert not recent.ready(max_served=64)
    with torch.no_grad():
        model(torch.rand(8, 3, 8, 8))  # used since the last record: this pass records
    assert recent.ready(max_served=64) and recent.updates == 2


def test_paused_passes_leave_the_averages_alone():
    model = adapting_model()
    recent = RecentBatchStatistics(model, min_batch=8)
    with torch.no_grad():
        model(torch.rand(8, 3, 8, 8))
        means = [m.clone() for m in recent.mean]
        with recent.paused():
            model(torch.rand(8, 3, 8, 8) + 5.0)  # a probe set, say: not the traffic being served
    assert recent.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(means, recent.mean, strict=True))
