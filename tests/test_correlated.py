"""Class-correlated traffic: robust BatchNorm statistics, the update gate and LAME (issue 16)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import images, small_bn_cnn

import adapters
from adapters.correlation import (
    ClassMixMonitor,
    CorrelationSwitch,
    SwitchOptions,
    class_diversity,
    iid_class_diversity,
    relative_class_diversity,
)
from adapters.lame import affinity_matrix, lame, lame_energy
from adapters.robust_norm import RobustBatchNorm
from adapters.serialization import state_from_bytes, state_to_bytes


def robust_layers(adapter: adapters.Adapter) -> list[RobustBatchNorm]:
    return [m for m in adapter.model.modules() if isinstance(m, RobustBatchNorm)]


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("method", "options", "named"),
    [
        ("norm", {"bn_stats": "median"}, "bn_stats"),
        ("tent", {"bn_momentum": 0}, "bn_momentum"),
        ("eata", {"bn_alpha": 1.5}, "bn_alpha"),
        ("source", {"bn_stats": "ema"}, "bn_stats"),  # the frozen model has no batch statistics
        ("tent", {"min_class_diversity": -1}, "min_class_diversity"),
        ("tent", {"diversity_momentum": 1}, "diversity_momentum"),
        ("norm", {"bn_min_class_diversity": 0.8}, "bn_min_class_diversity"),  # needs bn_stats='ema'
        ("norm", {"min_class_diversity": 0.5}, "min_class_diversity"),  # norm never updates
        ("source", {"lame": {"knn": 0}}, "lame.knn"),
        ("eata", {"lame": {"affinity": "cosine"}}, "lame.affinity"),
        ("norm", {"lame": {"gate": 0.5}}, "lame.gate"),
    ],
)
def test_bad_robustness_options_are_named(method, options, named):
    with pytest.raises(adapters.AdapterConfigError, match=named.replace(".", r"\.")):
        adapters.create(method, small_bn_cnn(), **options)


# --------------------------------------------------------------------------- robust statistics
@pytest.mark.parametrize("mode", ["ema", "mix"])
def test_robust_statistics_make_a_prediction_depend_less_on_its_batch_mates(mode):
    """The same 8 images predicted beside 24 others and beside 24 brighter ones: with batch statistics
    the answer moves with the company it keeps, with robust statistics far less."""
    x, others = images(8, seed=1), images(24, seed=2)

    def shift(bn_stats: str) -> float:
        a = adapters.create("norm", small_bn_cnn(), bn_stats=bn_stats)
        b = adapters.create("norm", small_bn_cnn(), bn_stats=bn_stats)
        first = a.step(torch.cat([x, others])).logits[:8]
        second = b.step(torch.cat([x, others * 0.2 + 0.8])).logits[:8]
        return float((first.softmax(1) - second.softmax(1)).abs().sum(1).mean())

    assert shift(mode) < 0.25 * shift("batch")


def test_ema_statistics_move_by_the_momentum_from_the_source_and_reset_restores_them():
    model = small_bn_cnn()
    source_mean = model[1].running_mean.clone()
    adapter = adapters.create("tent", model, bn_stats="ema", bn_momentum=0.1)
    x = images(32)
    with torch.no_grad():
        batch_mean = model[0](x).mean((0, 2, 3))
    adapter.predict(x)  # serving without an update moves nothing
    assert torch.equal(robust_layers(adapter)[0].running_mean, source_mean)
    adapter.step(x)
    assert torch.allclose(robust_layers(adapter)[0].running_mean, 0.9 * source_mean + 0.1 * batch_mean, atol=1e-6)
    adapter.reset()
    assert all(torch.equal(m.running_mean, m.source_mean) for m in robust_layers(adapter))


@pytest.mark.parametrize(("method", "options"), [("eata-c", {}), ("tent", {"backward": "selected"})])
def test_one_step_moves_the_moving_average_once(method, options):
    """EATA-C's sub-network forward and the re-forward of selected samples must not count twice."""
    reference = adapters.create("norm", small_bn_cnn(), bn_stats="ema")
    adapter = adapters.create(method, small_bn_cnn(), bn_stats="ema", **options)
    x = images(32)
    reference.step(x)
    adapter.step(x)
    for ours, theirs in zip(robust_layers(adapter)[:1], robust_layers(reference)[:1], strict=True):
        assert torch.allclose(ours.running_mean, theirs.running_mean, atol=1e-6)


def test_gated_moving_average_ignores_batches_that_look_correlated():
    """After traffic of every class, a batch the model puts in one class leaves the statistics alone."""
    gated = adapters.create("norm", small_bn_cnn(), bn_stats="ema", bn_min_class_diversity=0.5)
    gated.class_mix.average = torch.full((10,), 0.1, dtype=torch.float64)
    source_mean = robust_layers(gated)[0].running_mean.clone()
    gated.step(images())
    assert torch.equal(robust_layers(gated)[0].running_mean, source_mean)
    ungated = adapters.create("norm", small_bn_cnn(), bn_stats="ema")
    ungated.class_mix.average = torch.full((10,), 0.1, dtype=torch.float64)
    ungated.step(images())
    assert not torch.equal(robust_layers(ungated)[0].running_mean, source_mean)


def test_robust_statistics_survive_a_state_round_trip():
    first = adapters.create("eata", small_bn_cnn(), bn_stats="ema")
    for seed in range(3):
        first.step(images(seed=seed))
    second = adapters.create("eata", small_bn_cnn(), bn_stats="ema")
    second.load_state_dict(state_from_bytes(state_to_bytes(first.state_dict())))
    x = images(seed=9)
    assert torch.equal(first.step(x).logits, second.step(x).logits)


def test_robust_adapters_keep_the_parameter_names_of_batch_mode():
    """Fisher information and snapshots name parameters; robust layers must not rename them."""
    assert set(adapters.create("eata", small_bn_cnn(), bn_stats="mix").params) == set(
        adapters.create("eata", small_bn_cnn()).params
    )


# --------------------------------------------------------------------------- the update gate
def _one_hot_logits(labels: list[int]) -> torch.Tensor:
    return 5 * torch.nn.functional.one_hot(torch.tensor(labels), 10).float()


def test_class_diversity_separates_one_class_batches_from_mixed_ones():
    assert class_diversity(_one_hot_logits([3] * 64)) == 0.0
    assert class_diversity(_one_hot_logits([i % 10 for i in range(64)])) > 0.99
    assert class_diversity(_one_hot_logits([3])) == 1.0  # nothing to judge


def test_batches_are_judged_against_the_recent_mix_of_classes():
    """A model that sees only three classes on i.i.d. traffic (heavy noise) is not 'correlated'; a batch
    of one class after traffic of ten is."""
    few = ClassMixMonitor()
    for _ in range(20):
        score = few.observe(_one_hot_logits([0, 1, 2] * 21))
    assert score > 0.95
    many = ClassMixMonitor()
    assert many.observe(_one_hot_logits([5] * 64)) == 1.0  # nothing to compare with yet
    for _ in range(20):
        many.observe(_one_hot_logits([i % 10 for i in range(64)]))
    assert many.score(_one_hot_logits([i % 10 for i in range(64)])) > 0.95
    assert many.observe(_one_hot_logits([4] * 60 + [7] * 4)) < 0.2
    restored = ClassMixMonitor()
    restored.load_state_dict(state_from_bytes(state_to_bytes(many.state_dict())))
    assert torch.equal(restored.average, many.average)


def test_correlated_batches_are_predicted_but_drive_no_update():
    """After traffic of every class, a batch the (untrained) model puts in one class is not learned from."""
    strict = adapters.create("tent", small_bn_cnn(), min_class_diversity=0.5)
    strict.class_mix.average = torch.full((10,), 0.1, dtype=torch.float64)
    assert class_diversity(strict.predict(images())) < 0.2
    before = {k: v.clone() for k, v in strict.params.items()}
    result = strict.step(images())
    assert not result.updated and result.logits.shape == (32, 10)
    assert all(torch.equal(before[k], v) for k, v in strict.params.items())
    assert adapters.create("tent", small_bn_cnn(), min_class_diversity=0.0).step(images()).updated


# --------------------------------------------------------------------------- LAME
def _clusters(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tight feature clusters and noisy probabilities that favour the right class 60 % of the time."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.eye(8)[:2]
    features = centres[labels] + 0.05 * torch.randn(n, 8, generator=g)
    right = torch.rand(n, generator=g) < 0.6
    favoured = torch.where(right, labels, 1 - labels)
    probs = torch.full((n, 3), 0.1)
    probs[torch.arange(n), favoured] = 0.8
    return probs, features, labels


def test_lame_gives_each_feature_cluster_its_majority_label():
    probs, features, labels = _clusters()
    assert (probs.argmax(1) == labels).float().mean() < 0.8
    corrected = lame(probs, features)
    assert torch.equal(corrected.argmax(1), labels)
    assert torch.allclose(corrected.sum(1), torch.ones(len(labels)))


def test_lame_energy_never_increases():
    probs, features, _ = _clusters(seed=1)
    unit = features / features.norm(dim=1, keepdim=True)
    w, unary = affinity_matrix(unit), -(probs + 1e-10).log()
    energies = [float(lame_energy(unary, w, lame(probs, features, max_steps=s), 1.0)) for s in range(1, 12)]
    assert all(b <= a + 1e-5 for a, b in itertools.pairwise(energies))
    assert energies[-1] < energies[0]


def test_rbf_sigma_is_the_mean_kth_distance_counting_self():
    """Points at 0, 1, 3 on a line (unit-normalised features are not needed by the kernel itself)."""
    f = torch.tensor([[0.0], [1.0], [3.0]])
    # Sorted rows with self: [0,1,3], [0,1,2], [0,2,3]; k=2 -> the 2nd smallest: 1, 1, 2 -> sigma 4/3.
    w = affinity_matrix(f, "rbf", knn=2)
    sigma = 4 / 3
    assert torch.allclose(w[0, 2], torch.tensor(math.exp(-9 / (2 * sigma**2))))
    assert torch.allclose(torch.diagonal(w), torch.ones(3))
    knn = affinity_matrix(f, "knn", knn=1)
    assert torch.equal(knn, torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 1, 0]]))  # asymmetric, no self


def test_lame_is_safe_for_one_sample_and_for_copies():
    probs, features, _ = _clusters()
    assert torch.equal(lame(probs[:1], features[:1]), probs[:1])
    copies = lame(probs[:1].repeat(6, 1), features[:1].repeat(6, 1))
    assert torch.isfinite(copies).all()


def _varied_mlp() -> torch.nn.Module:
    """A BatchNorm MLP whose untrained predictions spread over several classes (a diverse batch)."""
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(192, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, 10)).eval()


def test_lame_on_an_adapter_returns_log_probabilities_and_the_gate_spares_diverse_batches():
    x = images(32) - 0.5
    plain = adapters.create("source", _varied_mlp()).step(x).logits
    corrected = adapters.create("source", _varied_mlp(), lame={"enabled": True}).step(x).logits
    assert torch.allclose(corrected.exp().sum(1), torch.ones(32), atol=1e-5)
    assert not torch.allclose(corrected.softmax(1), plain.softmax(1), atol=1e-3)
    assert class_diversity(plain) > 0.5
    # The first batch is as diverse as the traffic so far (relative diversity 1): a gate below 1 spares it.
    gated = adapters.create("source", _varied_mlp(), lame={"enabled": True, "max_class_diversity": 0.9})
    assert torch.equal(gated.step(x).logits, plain)
    # After traffic of every class, the same batch looks correlated and is corrected.
    gated.class_mix.average = torch.full((10,), 0.1, dtype=torch.float64)
    gated.class_mix.momentum = 0.99
    assert gated.class_mix.score(plain) < 0.9
    assert torch.allclose(gated.predict(x), corrected)
    assert torch.allclose(gated.step(x).logits, corrected)


# --------------------------------------------------------------------------- bn_stats='auto'
def test_the_switch_needs_a_sustained_drop_to_enter_and_a_sustained_rise_to_leave():
    switch = CorrelationSwitch(SwitchOptions(enter=0.8, leave=0.9, smoothing=0.5))
    assert not switch.observe(0.7)  # one odd batch: smoothed 0.85, still i.i.d.
    assert switch.observe(0.5)  # smoothed 0.675
    assert switch.observe(0.95)  # smoothed 0.81: inside the hysteresis band, stays correlated
    assert not switch.observe(1.0)  # smoothed 0.91
    assert switch.switches == 2
    with pytest.raises(ValueError, match="leave"):
        SwitchOptions(enter=0.9, leave=0.8)


def test_a_small_probe_is_judged_against_a_small_iid_batch_and_counts_for_less():
    """16 i.i.d. draws over 10 classes cannot fill them evenly (0.86 of the maximum, 64 draws: 0.97), and a
    16-image probe is a quarter of the evidence of a full one: on the digits demo one such probe of a
    strongly shifted i.i.d. batch read 0.36 and switched the served statistics for the next segment."""
    assert iid_class_diversity(16, 10) == pytest.approx(0.856, abs=1e-3)
    assert iid_class_diversity(64, 10) == pytest.approx(0.968, abs=1e-3)
    drawn = torch.eye(10)[torch.randint(10, (16,), generator=torch.Generator().manual_seed(0))]  # i.i.d. classes
    assert class_diversity(drawn) < 0.85 and relative_class_diversity(drawn) > 0.95
    small, full = CorrelationSwitch(SwitchOptions()), CorrelationSwitch(SwitchOptions())
    assert not small.observe(0.36, images=16)
    assert full.observe(0.36, images=64)
    assert [small.probe_due() for _ in range(5)] == [True, False, False, False, True]  # the first step probes


def split_reference(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], batch_layers: int
) -> torch.nn.Module:
    """The source model with ``weights`` (affine parameters), its first ``batch_layers`` BatchNorm layers on
    batch statistics and the rest on the source ones: plain PyTorch flags, independent of the robust layers."""
    import copy

    reference = copy.deepcopy(model).eval()
    reference.load_state_dict(weights, strict=False)
    norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for layer in norms[:batch_layers]:
        layer.train()
        layer.track_running_stats, layer.running_mean, layer.running_var = False, None, None
    return reference


def test_auto_statistics_are_the_papers_while_iid_and_the_probe_split_while_correlated():
    """While the traffic looks i.i.d. ``auto`` is the papers; once judged correlated it answers as the probe
    does (the source weights, shallow layers normalised with the batch, deep ones with the source) and
    neither updates the weights nor moves the moving average, and the adapted weights are kept for when
    the traffic is i.i.d. again: a long run of one class cannot teach the model that class."""
    model = small_bn_cnn()
    batch = images(32, seed=2)
    papers = adapters.create("tent", model)
    # An untrained network predicts few classes: keep the switch from judging that correlated here.
    auto = adapters.create("tent", model, bn_stats="auto", bn_switch={"enter": 0.0, "leave": 0.0})
    torch.testing.assert_close(auto.step(batch).logits, papers.step(batch).logits, atol=1e-4, rtol=1e-4)
    assert not auto.switch.correlated and auto.stats.updates == 1

    auto.switch.correlated = True  # as after a sustained run of one-class batches
    weights, average = auto.adapted_parameters(), [layer.running_mean.clone() for layer in auto.robust_layers]
    k = auto._probe_layers
    assert 0 < k < len(auto.robust_layers)
    reference = split_reference(model, {}, k)  # the source weights: adapted ones do not fit source statistics
    with torch.no_grad():
        expected = reference(images(32, seed=3))
    result = auto.step(images(32, seed=3))
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=1e-4)
    assert not result.updated and auto.stats.updates == 1
    for name, value in auto.adapted_parameters().items():
        torch.testing.assert_close(value, weights[name])
    for layer, before in zip(auto.robust_layers, average, strict=True):
        torch.testing.assert_close(layer.running_mean, before)
    assert auto.state_dict()["switch"]["correlated"]
    auto.reset()
    assert not auto.switch.correlated


def test_always_serves_the_correlated_mode_from_the_first_batch():
    always = adapters.create("eata", small_bn_cnn(), bn_stats="auto", bn_switch={"always_correlated": True})
    assert always.switch.correlated
    for seed in range(3):
        assert not always.step(images(32, seed=seed)).updated
    assert always.switch.correlated and always.stats.updates == 0
    always.reset()
    assert always.switch.correlated


def class_sorted(x, y, n, seed=0):
    index = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].numpy()
    index = index[y[index].argsort(kind="stable")]
    return x[index], y[index]


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_auto_statistics_turn_a_class_sorted_stream_from_a_loss_into_a_gain(order, cifar10, resnet20_weights):
    """Clean CIFAR-10 in class order, batches of 64: the papers' batch statistics lose heavily against
    the frozen model; ``bn_stats='auto'`` (with the served gates) switches to the moving average at its
    first probe and from then on does not. Shuffled, it stays with the papers and matches them."""
    from adapters.datasets import to_tensor
    from adapters.models import build_cifar_resnet

    model = build_cifar_resnet("resnet20", resnet20_weights)
    x, y = cifar10
    if order == "sorted":
        x, y = class_sorted(x, y, 1280)
    else:
        x, y = x[:1280], y[:1280]

    def accuracy(method: str, **options) -> tuple[list[float], adapters.Adapter]:
        """Per-batch accuracy % over the stream."""
        adapter = adapters.create(method, model, **options)
        per_batch = []
        for start in range(0, len(y), 64):
            logits = adapter.step(to_tensor(x[start:start + 64])).logits
            per_batch.append(100 * float((logits.argmax(1).numpy() == y[start:start + 64]).mean()))
        return per_batch, adapter

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    source, _ = accuracy("source")
    papers, _ = accuracy("norm")
    auto, adapter = accuracy("norm", bn_stats="auto", lame={"enabled": True, "max_class_diversity": 0.7})
    if order == "sorted":
        assert mean(papers) < mean(source) - 20
        assert adapter.switch.correlated and adapter.switch.switches == 1
        probe_every = adapter.options.bn_switch.probe_every
        assert mean(auto[probe_every:]) > mean(source[probe_every:]) - 1  # after the first probe
        assert mean(auto) > mean(papers) + 30
    else:
        assert not adapter.switch.correlated and adapter.switch.switches == 0
        assert auto == papers


def test_a_restored_auto_adapter_probes_on_the_same_steps_as_the_original():
    original = adapters.create("norm", small_bn_cnn(), bn_stats="auto")
    for seed in range(3):
        original.step(images(32, seed=seed))
    restored = adapters.create("norm", small_bn_cnn(), bn_stats="auto")
    restored.load_state_dict(original.state_dict())
    assert [original.switch.probe_due() for _ in range(8)] == [restored.switch.probe_due() for _ in range(8)]
    assert restored.switch.smoothed == original.switch.smoothed


def test_eata_c_corrects_its_own_probabilities_with_lame_and_calibrates_lames_label(cifar10, resnet20_weights):
    """LAME needs the model's probabilities: run on EATA-C's deflated confidences its unary term weakens
    against the pairwise one and it merges classes (validation Dirichlet 0.1: 23.3 % error against 18.1 %).
    So the calibrated adapter returns LAME's labels on the full network's output, with its own confidence."""
    from adapters.corruptions import corrupt
    from adapters.datasets import to_tensor
    from adapters.models import build_cifar_resnet

    model = build_cifar_resnet("resnet20", resnet20_weights)
    x, y = cifar10
    index = torch.cat([torch.nonzero(torch.from_numpy(y) == c).flatten()[:22] for c in (3, 5, 7)])[:64]
    chosen = index.numpy()
    batch = to_tensor(np.stack([corrupt(x[i], "gaussian_noise", 5, seed=int(i)) for i in chosen]))
    options = {"bn_stats": "auto", "bn_switch": {"always_correlated": True}, "lame": {"enabled": True}}
    calibrated = adapters.create("eata-c", model, confidence_map=(-0.4, 0.5), **options).step(batch).logits
    plain = adapters.create("eata-c", model, confidence="full", **options).step(batch).logits
    assert torch.equal(calibrated.argmax(1), plain.argmax(1))
    assert float(calibrated.softmax(1).max(1).values.mean()) < float(plain.softmax(1).max(1).values.mean())
