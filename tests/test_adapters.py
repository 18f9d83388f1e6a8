"""Behaviour of the adaptation library as a user of ``adapters.create`` sees it."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import images, no_norm_mlp, small_bn_cnn, small_gn_cnn, small_ln_mlp

import adapters
from adapters.methods.eata import default_redundancy_eps
from adapters.methods.eata_c import temperature_to_confidence

ADAPTING = ["tent", "eata", "eata-c"]
ALL_METHODS = ["source", "norm", *ADAPTING]


def make(method: str, model: torch.nn.Module, **options) -> adapters.Adapter:
    """Create an adapter; EATA-only options go only to the EATA family.

    A large ``e0`` with the redundancy filter off (``redundancy_eps`` 2 > any |cosine|) makes every
    sample of an untrained test model selected, so behaviour tests see an update on each step.
    """
    if not method.startswith("eata"):
        options.pop("e0", None)
    elif options.get("e0", 0) >= 10:
        options.setdefault("redundancy_eps", 2.0)
    return adapters.create(method, model, **options)


def median_entropy(model: torch.nn.Module, x: torch.Tensor) -> float:
    """An E0 that makes about half of ``x`` reliable for an untrained model."""
    return float(adapters.entropy(adapters.create("norm", model).predict(x)).median())


def params_of(adapter: adapters.Adapter) -> dict[str, torch.Tensor]:
    return adapter.adapted_parameters()


def test_every_documented_method_is_registered():
    assert set(adapters.METHODS) == set(ALL_METHODS)


def test_unknown_method_and_option_are_named_in_the_error():
    with pytest.raises(adapters.AdapterConfigError, match="unknown adaptation method 'eatta'"):
        adapters.create("eatta", small_bn_cnn())
    with pytest.raises(adapters.AdapterConfigError, match="lrr"):
        adapters.create("eata", small_bn_cnn(), lrr=0.1)
    with pytest.raises(adapters.AdapterConfigError, match="lr"):
        adapters.create("tent", small_bn_cnn(), lr=-1)


def test_defaults_scale_with_the_number_of_classes():
    adapter = adapters.create("eata", small_bn_cnn(100), num_classes=100)
    assert adapter.e0 == pytest.approx(0.4 * math.log(100))
    assert default_redundancy_eps(10) == pytest.approx(0.4)
    assert default_redundancy_eps(100) == pytest.approx(0.1)
    assert default_redundancy_eps(1000) == pytest.approx(0.05)
    assert default_redundancy_eps(10) > default_redundancy_eps(50) > default_redundancy_eps(100)
    assert adapters.create("eata", small_bn_cnn(), e0=1.5, redundancy_eps=0.2).e0 == 1.5


def test_the_callers_model_is_never_modified():
    model = small_bn_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = adapters.create("tent", model)
    for seed in range(3):
        adapter.step(images(seed=seed))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


@pytest.mark.parametrize("method", ADAPTING)
def test_returned_logits_are_those_before_the_update(method):
    extra = {"confidence": "full"} if method == "eata-c" else {}
    adapter = make(method, small_bn_cnn(), e0=10.0, **extra)
    x = images(64)
    adapter.step(images(64, seed=1))  # populate optimiser state and moving average
    expected = adapter.predict(x)
    before = params_of(adapter)
    result = adapter.step(x)
    assert result.updated
    assert any(not torch.equal(before[k], v) for k, v in params_of(adapter).items())
    assert torch.allclose(result.logits.argmax(1), expected.argmax(1))
    if method != "eata-c":  # eata-c's sub-network is random; its full logits are covered above
        assert torch.allclose(result.logits, expected, atol=1e-6)


def test_source_uses_running_statistics_and_norm_uses_batch_statistics():
    model = small_bn_cnn()
    x = images(16)
    with torch.no_grad():
        reference = model(x)
    assert torch.allclose(adapters.create("source", model).step(x).logits, reference)
    assert not torch.allclose(adapters.create("norm", model).step(x).logits, reference)


def test_a_sample_above_the_entropy_margin_never_drives_an_update():
    adapter = adapters.create("eata", small_bn_cnn(), e0=1e-6)  # every sample is unreliable
    before = params_of(adapter)
    result = adapter.step(images())
    assert not result.reliable.any() and not result.selected.any() and not result.updated
    assert all(torch.equal(before[k], v) for k, v in params_of(adapter).items())
    assert adapter.stats.samples_selected == 0 and adapter.stats.samples_seen == 32


def test_selection_flags_follow_entropy_and_redundancy():
    model = small_bn_cnn()
    median = median_entropy(model, images())
    adapter = adapters.create("eata", model, e0=median, redundancy_eps=0.4)
    result = adapter.step(images())
    assert 0 < result.reliable.sum() < 32
    assert torch.equal(result.reliable, result.entropy < median)
    assert torch.equal(result.selected, result.reliable)  # no moving average yet: every reliable sample
    # A moving average equal to the batch's predictions makes every reliable sample redundant.
    x = images(seed=3)
    probs = adapter.predict(x).softmax(1)
    adapter.prob_cache.clear()
    adapter.prob_cache.update(probs.mean(0), 0.9)
    adapter.options = adapter.options.model_copy(update={"e0": 10.0})  # every sample reliable
    result = adapter.step(x)
    cos = torch.nn.functional.cosine_similarity(probs, probs.mean(0, keepdim=True))
    assert torch.equal(result.selected, result.reliable & (cos.abs() < adapter.redundancy_eps))
    assert result.selected.sum() < result.reliable.sum()


def test_max_selected_keeps_the_least_redundant_share_of_the_batch():
    model = small_bn_cnn()
    x = images(seed=3)
    capped = adapters.create("eata", model, e0=10.0, redundancy_eps=2.0, max_selected=0.25, backward="selected")
    first = capped.step(x)  # no moving average yet: the 8 lowest-entropy samples
    assert int(first.selected.sum()) == 8 and first.updated
    assert first.entropy[first.selected].max() <= first.entropy[~first.selected].min()
    average = capped.prob_cache.get()
    probs = capped.predict(x).softmax(1)
    second = capped.step(x)  # then the 8 least similar to the moving average
    cos = torch.nn.functional.cosine_similarity(probs, average.unsqueeze(0)).abs()
    assert int(second.selected.sum()) == 8
    assert cos[second.selected].max() <= cos[~second.selected].min() + 1e-6
    assert capped.stats.samples_selected == 16


def test_moving_average_follows_the_spec():
    cache = adapters.InProcessProbabilityCache()
    assert cache.get() is None
    cache.update(torch.tensor([1.0, 0.0]), 0.9)
    assert torch.allclose(cache.get(), torch.tensor([1.0, 0.0]))
    cache.update(torch.tensor([0.0, 1.0]), 0.9)
    assert torch.allclose(cache.get(), torch.tensor([0.9, 0.1]))


@pytest.mark.parametrize("method", ADAPTING)
def test_reset_restores_weights_optimiser_and_moving_average_bit_for_bit(method):
    model = small_bn_cnn()
    fresh = make(method, model, e0=10.0)
    adapter = make(method, model, e0=10.0)
    initial = params_of(adapter)
    for seed in range(3):
        adapter.step(images(seed=seed))
    assert any(not torch.equal(initial[k], v) for k, v in params_of(adapter).items())
    adapter.reset()
    assert all(torch.equal(initial[k], v) for k, v in params_of(adapter).items())
    assert adapter.prob_cache.get() is None
    assert adapter.optimizer.state_dict()["state"] == {}
    assert adapter.stats.resets == {"manual": 1}
    torch.manual_seed(7)
    after_reset = adapter.step(images(seed=9))
    torch.manual_seed(7)
    from_scratch = fresh.step(images(seed=9))
    assert torch.equal(after_reset.logits, from_scratch.logits)
    assert all(torch.equal(v, params_of(fresh)[k]) for k, v in params_of(adapter).items())


@pytest.mark.parametrize("method", ADAPTING)
def test_state_dict_resumes_exactly(method):
    model = small_bn_cnn()
    first = make(method, model, e0=10.0)
    for seed in range(3):
        first.step(images(seed=seed))
    second = make(method, model, e0=10.0)
    second.load_state_dict(first.state_dict())
    assert second.stats == first.stats
    if method != "tent":  # tent keeps no moving average
        assert torch.equal(second.prob_cache.get(), first.prob_cache.get())
    # No re-seeding: EATA-C's sub-network draws come from its own generator, restored with the state, so
    # whatever the global RNG holds the next steps are those of the uninterrupted adapter.
    for seed in (5, 6):
        torch.manual_seed(100 + seed)
        a = first.step(images(seed=seed))
        torch.manual_seed(200 + seed)
        b = second.step(images(seed=seed))
        assert torch.equal(a.logits, b.logits) and a.loss == b.loss
    assert all(torch.equal(v, params_of(first)[k]) for k, v in params_of(second).items())


def test_eata_c_draws_from_its_own_seeded_generator():
    """The same seed gives the same sub-networks whatever the global RNG; another seed other ones."""
    model, x = small_bn_cnn(), images(seed=1)
    torch.manual_seed(1)
    a = make("eata-c", model, e0=10.0).step(x)
    torch.manual_seed(2)
    b = make("eata-c", model, e0=10.0).step(x)
    c = make("eata-c", model, e0=10.0, seed=7).step(x)
    assert torch.equal(a.divergence, b.divergence) and a.loss == b.loss
    assert not torch.equal(a.divergence, c.divergence)


def test_state_of_another_model_or_method_is_refused():
    state = adapters.create("eata", small_bn_cnn(seed=0)).state_dict()
    with pytest.raises(adapters.IncompatibleState, match="belongs to model"):
        adapters.create("eata", small_bn_cnn(seed=1)).load_state_dict(state)
    with pytest.raises(adapters.IncompatibleState, match="method 'eata'"):
        adapters.create("tent", small_bn_cnn(seed=0)).load_state_dict(state)


def test_state_adapted_with_other_options_is_refused_naming_each_difference():
    adapted = make("eata", small_bn_cnn(), e0=10.0)
    adapted.step(images())
    state = adapted.state_dict()
    other_lr = make("eata", small_bn_cnn(), e0=10.0, lr=0.01)
    before = params_of(other_lr)
    with pytest.raises(adapters.IncompatibleState, match=r"lr: 0\.001 in the state, 0\.01 here"):
        other_lr.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in params_of(other_lr).items())  # nothing was changed
    sgd = make("eata", small_bn_cnn(), e0=10.0, optimizer="sgd", guard={"enabled": True})
    with pytest.raises(adapters.IncompatibleState, match="optimizer: 'adam' in the state, 'sgd' here") as err:
        sgd.load_state_dict(state)
    assert "guard.enabled: False in the state, True here" in str(err.value)


def test_a_state_saved_without_options_loads_keeping_the_configured_ones_or_is_refused_for_another_optimizer():
    adapted = make("eata", small_bn_cnn(), e0=10.0)
    adapted.step(images())
    legacy = {k: v for k, v in adapted.state_dict().items() if k not in ("format", "options", "rng")}
    faster = make("eata", small_bn_cnn(), e0=10.0, lr=0.01)
    faster.load_state_dict(legacy)
    assert all(group["lr"] == 0.01 for group in faster.optimizer.param_groups)  # not the saved 0.001
    assert all(torch.equal(v, params_of(adapted)[k]) for k, v in params_of(faster).items())
    faster.step(images(seed=1))  # the restored Adam moments step on
    with pytest.raises(adapters.IncompatibleState, match="optimizer: the state holds 'adam' state"):
        make("eata", small_bn_cnn(), e0=10.0, optimizer="sgd").load_state_dict(legacy)


def test_fisher_penalty_gradient_pulls_parameters_back_to_the_source():
    model = small_bn_cnn()
    fisher = adapters.estimate_fisher(model, images(64), batch_size=16)
    assert fisher.num_samples == 64
    assert all((f >= 0).all() and f.sum() > 0 for f in fisher.fisher.values())
    adapter = adapters.create("eata", model, fisher=fisher, fisher_alpha=5.0)
    with torch.no_grad():
        for p in adapter.params.values():
            p.add_(torch.randn_like(p) * 0.1)
    penalty = adapter.fisher_penalty()
    penalty.backward()
    for name, p in adapter.params.items():
        displacement = p.detach() - adapter.source_params[name]
        assert (p.grad * displacement >= 0).all()  # descending the gradient moves towards theta0
        assert torch.allclose(p.grad, 2 * 5.0 * fisher.fisher[name] * displacement, atol=1e-6)


def test_fisher_file_round_trip_and_refusal_for_another_model(tmp_path):
    model = small_bn_cnn(seed=0)
    fisher = adapters.estimate_fisher(model, [images(16), images(16, seed=1)])
    path = tmp_path / "fisher.safetensors"
    fisher.save(path)
    loaded = adapters.FisherInfo.load(path, model)
    assert loaded.model_hash == fisher.model_hash and loaded.num_samples == 32
    assert all(torch.equal(loaded.fisher[k], v) for k, v in fisher.fisher.items())
    with pytest.raises(adapters.FisherMismatchError, match="re-estimate"):
        adapters.FisherInfo.load(path, small_bn_cnn(seed=1))
    with pytest.raises(adapters.FisherMismatchError):
        adapters.create("eata", small_bn_cnn(seed=1), fisher=path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read Fisher file"):
        adapters.FisherInfo.load(tmp_path / "junk.safetensors")
    with pytest.raises(adapters.AdapterConfigError, match="takes no Fisher"):
        adapters.create("tent", model, fisher=fisher)


def test_temperature_scaling_hits_the_target_confidence_and_keeps_the_label():
    logits = torch.randn(50, 10) * 4
    target = torch.rand(50) * 0.8 + 0.15
    scaled = temperature_to_confidence(logits, target)
    assert torch.equal(scaled.argmax(1), logits.argmax(1))
    assert torch.allclose(scaled.softmax(1).max(1).values, target, atol=1e-4)


def test_eata_c_lowers_confidence_where_full_and_subnetwork_disagree():
    adapter = adapters.create("eata-c", small_bn_cnn(), confidence="subnetwork", confidence_samples=1)
    logits = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    adapter._sub_logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # sample 1 disagrees
    calibrated = adapter.calibrate(torch.zeros(2, 3, 8, 8), logits).softmax(1).max(1).values
    full = logits.softmax(1).max(1).values
    assert calibrated[0] == pytest.approx(float(full[0]), abs=1e-4)
    assert calibrated[1] < full[1] - 0.4


def test_eata_c_minimises_entropy_on_agreement_and_maximises_it_on_disagreement():
    adapter = adapters.create("eata-c", small_bn_cnn(), kl_weight=0.0, alpha_ent=1.0, e0=10.0)
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    adapter._sub_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    adapter.loss(torch.zeros(2), logits, torch.tensor([True, True])).backward()
    # Descending the gradient sharpens the agreeing sample (top logit up) and flattens the other.
    assert logits.grad[0, 0] < 0 < logits.grad[1, 0]


def test_eata_c_subnetwork_drops_residual_branches_of_zoo_models():
    from adapters.models import build_cifar_resnet
    from adapters.subnetwork import subnetwork

    model = build_cifar_resnet("resnet20").eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        with subnetwork(model, 0.5):
            sub = model(x)
        again = model(x)
    assert not torch.allclose(full, sub)
    assert torch.equal(full, again)  # the context restores the full network


def test_subnetwork_keeps_down_sampling_blocks_when_asked_and_can_drop_channels_instead():
    from adapters.models import build_cifar_resnet
    from adapters.subnetwork import subnetwork

    model = build_cifar_resnet("resnet20").eval()
    x = torch.rand(4, 3, 32, 32)

    def every_branch_dropped(**kwargs) -> torch.Tensor:
        with torch.no_grad(), subnetwork(model, 1.0, **kwargs):
            return model(x)

    kept, dropped = every_branch_dropped(drop_downsampling=False), every_branch_dropped()
    with torch.no_grad():
        model.net.layer2[0].conv1.weight.mul_(2.0)  # the first block of stage 2 down-samples
    assert not torch.allclose(every_branch_dropped(drop_downsampling=False), kept)  # its branch still runs
    assert torch.equal(every_branch_dropped(), dropped)  # dropped: its weights play no part
    # Channels: every normalisation output zeroed leaves only the head's bias.
    assert torch.allclose(every_branch_dropped(unit="channels"), model.net.linear.bias.expand(4, -1))


@pytest.mark.parametrize("factory", [small_gn_cnn, small_ln_mlp], ids=["groupnorm", "layernorm"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_models_with_group_or_layer_norm_work_with_every_method(factory, method):
    adapter = make(method, factory(), e0=10.0)
    result = adapter.step(images())
    assert result.logits.shape == (32, 10)
    assert result.updated == (method in ADAPTING)


def test_a_model_without_normalisation_gets_a_clear_error():
    for method in ["norm", *ADAPTING]:
        with pytest.raises(adapters.NoNormalizationError, match="no BatchNorm"):
            adapters.create(method, no_norm_mlp())
    assert adapters.create("source", no_norm_mlp()).step(images()).logits.shape == (32, 10)


def test_backward_through_selected_samples_only_updates_and_counts():
    model = small_bn_cnn()
    adapter = adapters.create("eata", model, e0=median_entropy(model, images(64)), backward="selected")
    before = params_of(adapter)
    result = adapter.step(images(64))
    assert result.updated and adapter.stats.samples_selected == int(result.selected.sum())
    assert 0 < result.selected.sum() < 64
    assert any(not torch.equal(before[k], v) for k, v in params_of(adapter).items())


def test_collapse_guard_resets_and_names_the_reason():
    periodic = adapters.create("tent", small_bn_cnn(), guard={"enabled": True, "every_steps": 2})
    reasons = [periodic.step(images(seed=s)).reset_reason for s in range(4)]
    assert reasons == [None, "periodic", None, "periodic"]
    assert periodic.stats.resets == {"periodic": 2}

    collapsing = adapters.create(
        "tent", small_bn_cnn(), guard={"enabled": True, "window": 64, "min_steps": 0, "max_class_fraction": 0.6}
    )
    with torch.no_grad():  # force every prediction to class 3
        collapsing.model[-1].bias.copy_(torch.arange(10) == 3).mul_(100.0)
    collapsing.step(images())
    assert collapsing.step(images(seed=1)).reset_reason == "class_collapse"
    assert collapsing.stats.total_resets == 1

    off = adapters.create("tent", small_bn_cnn(), guard={"every_steps": 1})  # not enabled: paper-faithful
    assert all(off.step(images(seed=s)).reset_reason is None for s in range(3))


def test_statistics_count_what_happened():
    adapter = adapters.create("eata", small_bn_cnn(), e0=2.2)
    for seed in range(3):
        adapter.step(images(seed=seed))
    stats = adapter.stats
    assert stats.steps == 3 and stats.samples_seen == 96
    assert stats.samples_selected <= stats.samples_reliable <= stats.samples_seen
    assert stats.entropy_ema is not None and 0 < stats.entropy_ema < math.log(10)
    assert stats.parameter_version == stats.updates


@pytest.mark.parametrize("method", ADAPTING)
def test_state_survives_a_round_trip_through_bytes_without_pickle(method):
    from adapters.serialization import StateDecodeError, state_from_bytes, state_to_bytes

    model = small_bn_cnn()
    first = make(method, model, e0=10.0)
    for seed in range(2):
        first.step(images(seed=seed))
    payload = state_to_bytes(first.state_dict())
    assert b"pickle" not in payload and payload[8:9] == b"{"  # a safetensors JSON header
    second = make(method, model, e0=10.0)
    second.load_state_dict(state_from_bytes(payload))
    torch.manual_seed(3)
    a = first.step(images(seed=4))
    torch.manual_seed(3)
    b = second.step(images(seed=4))
    assert torch.equal(a.logits, b.logits) and second.stats == first.stats
    with pytest.raises(StateDecodeError):
        state_from_bytes(b"\x00" * 16)
    with pytest.raises(StateDecodeError, match="format"):
        from safetensors.torch import save

        state_from_bytes(save({"x": torch.zeros(1)}))


@pytest.mark.parametrize("method", ["source", "norm"])
def test_methods_that_update_nothing_select_nothing(method):
    """``selected`` means "drove the update": never true for methods without one (and nothing is counted)."""
    adapter = adapters.create(method, small_bn_cnn())
    result = adapter.step(images(16))
    assert not result.selected.any() and not result.updated
    assert adapter.stats.samples_selected == 0 and adapter.stats.samples_seen == 16


def test_capabilities_are_declared_by_the_method_classes():
    declared = {name: (c.updates_parameters, c.uses_fisher, c.traceable) for name, c in adapters.METHODS.items()}
    assert declared["source"] == (False, False, True) and declared["norm"] == (False, False, True)
    assert declared["tent"] == (True, False, True) and declared["eata"] == (True, True, True)
    assert declared["eata-c"] == (True, True, False)
