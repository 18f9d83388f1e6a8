"""The library on real data: the CIFAR ResNet zoo and a small continual stream from the shared set."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.datasets import to_tensor
from adapters.models import CheckpointError, build_cifar_resnet
from benchmarks.data import checkpoint_path


@pytest.fixture(scope="module")
def resnet20(resnet20_weights):
    return build_cifar_resnet("resnet20", resnet20_weights)


def test_zoo_resnet20_reproduces_the_published_clean_accuracy(resnet20, cifar10):
    x, y = cifar10
    logits = torch.cat([resnet20(to_tensor(x[i : i + 500])).detach() for i in range(0, 2000, 500)])
    assert adapters.accuracy(logits, torch.from_numpy(y[:2000])) > 90.0


def test_bad_checkpoints_are_refused_with_a_clear_error(tmp_path, shared):
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        build_cifar_resnet("resnet20", garbage)
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        build_cifar_resnet("resnet20", checkpoint_path("resnet32"))
    pickled = tmp_path / "code.th"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": CheckpointError("x")}, pickled)
    with pytest.raises(CheckpointError, match="cannot read weights file"):  # weights_only refuses objects
        build_cifar_resnet("resnet20", pickled)
    with pytest.raises(ValueError, match="unknown model"):
        build_cifar_resnet("resnet18")


def noisy_stream(x, sigmas, n, seed=0):
    """A continual stream: the first n images under each noise level in turn (simple Gaussian noise)."""
    g = torch.Generator().manual_seed(seed)
    clean = to_tensor(x[:n])
    return torch.cat([(clean + s * torch.randn(clean.shape, generator=g)).clamp(0, 1) for s in sigmas])


def run(adapter, stream, labels, batch=200):
    calib = adapters.CalibrationAccumulator()
    for i in range(0, len(stream), batch):
        calib.add_logits(adapter.step(stream[i : i + batch]).logits, labels[i : i + batch])
    return 100 - calib.accuracy(), calib.ece()


def test_eata_beats_the_frozen_model_on_a_drifting_stream_and_eata_c_is_better_calibrated(resnet20, cifar10):
    x, y = cifar10
    n = 600
    stream = noisy_stream(x, [0.06, 0.1], n)
    labels = torch.from_numpy(y[:n]).repeat(2)
    fisher = adapters.estimate_fisher(resnet20, to_tensor(x[-500:]), batch_size=100)
    source_error, _ = run(adapters.create("source", resnet20), stream, labels)
    eata = adapters.create("eata", resnet20, fisher=fisher)
    eata_error, eata_ece = run(eata, stream, labels)
    held_out = slice(-2000, -500)  # clean labelled images for EATA-C's confidence map
    logits = adapters.pre_adaptation_logits(resnet20, to_tensor(x[held_out]), 200)
    confidence_map = adapters.fit_confidence_map(logits, torch.from_numpy(y[held_out]))
    eata_c = adapters.create("eata-c", resnet20, fisher=fisher, confidence_map=confidence_map)
    eata_c_error, eata_c_ece = run(eata_c, stream, labels)
    assert source_error > 50
    assert eata_error < source_error - 20
    assert 0 < eata.stats.samples_selected < eata.stats.samples_seen == 2 * n
    assert eata_c_error < eata_error + 3
    assert eata_c_ece < 0.8 * eata_ece

    # Forgetting: the adapted model, evaluated without further updates, still classifies clean images.
    clean = to_tensor(x[n : n + 400])
    clean_logits = torch.cat([eata.predict(clean[i : i + 200]) for i in range(0, 400, 200)])
    assert adapters.accuracy(clean_logits, torch.from_numpy(y[n : n + 400])) > 80
