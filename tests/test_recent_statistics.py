"""Normalising tiny batches with recent BatchNorm statistics instead of their own."""

from __future__ import annotations

import pytest
import torch
from helpers import images, small_bn_cnn

import adapters
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


@pytest.mark.parametrize(("method", "backward"), [("eata-c", "full"), ("eata-c", "selected"), ("eata", "selected")])
def test_only_the_served_forward_of_a_step_is_recorded(method, backward):
    """EATA-C's sub-network passes and the re-forward of the selected samples answer no request: the
    averages after a step are those of the served forward alone (they would otherwise mix in
    statistics of a network with blocks dropped, or of a filtered subset)."""
    x = images(16)
    served = adapters.create(method, small_bn_cnn(), e0=10.0, backward=backward)  # every sample selected
    reference = adapters.create(method, small_bn_cnn(), e0=10.0, backward=backward)
    recent = RecentBatchStatistics(served.model, min_batch=8)
    expected = RecentBatchStatistics(reference.model, min_batch=8)
    result = served.step(x)
    assert result.updated and int(result.selected.sum()) == 16
    with torch.no_grad():
        reference.model(x)  # the pass whose logits answer the batch, and nothing else
    assert recent.updates == expected.updates == 1
    for got, want in zip(recent.mean + recent.var, expected.mean + expected.var, strict=True):
        torch.testing.assert_close(got, want)
