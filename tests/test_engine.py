"""The engine as the routes use it: batching, the small-batch policy, modes, feedback, snapshots."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from helpers import small_bn_cnn

import adapters
from service.engine import ModelEngine
from service.errors import ConfigError, InvalidInput, SnapshotNotFound, UnknownRequestIds
from service.model_sources import LoadedModel
from service.replication_contract import StateRefused
from service.settings import ModelConfig, Settings, load_settings

CLASSES = [str(i) for i in range(10)]


def make_engine(model=None, **overrides) -> ModelEngine:
    # The papers' configuration unless a test asks otherwise: these tests pin the batch-statistics policy.
    fields = {"name": "m", "factory": "helpers:small_bn_cnn", "input_size": (8, 8), "method": "eata",
              "max_delay_ms": 20.0, "correlated_traffic": False} | overrides
    config = ModelConfig(**fields)
    loaded = LoadedModel(model or small_bn_cnn(), CLASSES, None)
    return ModelEngine(config, loaded, device=torch.device("cpu"))


def run(coro):
    return asyncio.run(coro)


async def started(engine: ModelEngine):
    await engine.start()
    return engine


def images(n, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer():
    async def scenario():
        engine = await started(make_engine(method="source", max_batch_size=16))
        x = images(40)
        expected = engine.source.predict(x).softmax(1)
        answers = await asyncio.gather(*[engine.predict(x[i : i + 1]) for i in range(40)])
        await engine.stop()
        return engine, expected, answers

    engine, expected, answers = run(scenario())
    assert all(len(a) == 1 for a in answers)
    got = torch.stack([a[0].probabilities for a in answers])
    assert torch.allclose(got, expected, atol=1e-5)
    assert engine.counters.batches < 40  # requests were grouped into micro-batches
    assert len({a[0].request_id for a in answers}) == 40


def test_sync_mode_adapts_on_full_batches_and_reports_selection():
    async def scenario():
        engine = await started(make_engine(options={"e0": 10.0, "redundancy_eps": 2.0}))
        first = await engine.predict(images(32))
        second = await engine.predict(images(32, seed=1))
        info = await engine.adaptation_info()
        await engine.stop()
        return first, second, info

    first, second, info = run(scenario())
    assert all(p.selected is True for p in first)
    assert first[0].parameter_version == 0 and second[0].parameter_version == 1  # the weights that answered
    assert info["steps"] == 2 and info["samples_selected"] == 64 and info["health"]["parameter_drift_ratio"] > 0


def test_small_batches_use_recent_inputs_as_context_and_adapt_once_enough_accumulate():
    async def scenario():
        engine = await started(make_engine(min_adapt_batch=8, options={"e0": 10.0, "redundancy_eps": 2.0}))
        lone = await engine.predict(images(1))  # nothing to lean on yet: the frozen model answers
        fallbacks_after_first = engine.small_batch.frozen_fallbacks
        for seed in range(1, 9):
            await engine.predict(images(1, seed=seed))
        await asyncio.sleep(0.2)  # the adaptation step runs off the request path
        info = await engine.adaptation_info()
        await engine.stop()
        return lone, fallbacks_after_first, info

    lone, fallbacks, info = run(scenario())
    assert lone[0].selected is None  # decided after answering
    assert fallbacks == 1 and info["frozen_fallbacks"] == 1
    assert info["steps"] == 1 and info["samples_seen"] == 8  # nine images: one step of eight, one pending


def test_async_mode_answers_every_request_and_drops_adaptation_work_when_full():
    async def scenario():
        engine = await started(make_engine(mode="async", adapt_queue_size=1, max_batch_size=16, max_delay_ms=0))
        answers = await asyncio.gather(*[engine.predict(images(16, seed=s)) for s in range(12)])
        await asyncio.sleep(0.5)
        info = await engine.adaptation_info()
        await engine.stop()
        return answers, info

    answers, info = run(scenario())
    assert sum(len(a) for a in answers) == 12 * 16
    assert info["adapt_queued_batches"] + info["adapt_dropped_batches"] == 12
    assert info["steps"] == info["adapt_queued_batches"]
    assert info["adapt_dropped_samples"] == 16 * info["adapt_dropped_batches"]


def test_bad_input_is_refused_with_the_problem_named():
    engine = make_engine(max_images_per_request=4)
    with pytest.raises(InvalidInput, match=r"expected shape \[N, 3, 8, 8\]"):
        engine.validate(torch.rand(2, 3, 32, 32))
    with pytest.raises(InvalidInput, match="NaN"):
        engine.validate(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(InvalidInput, match="limit is 4"):
        engine.validate(torch.rand(5, 3, 8, 8))
    with pytest.raises(InvalidInput, match="no images"):
        engine.validate(torch.rand(0, 3, 8, 8))


def test_feedback_gives_the_same_ece_as_computed_offline():
    async def scenario():
        engine = await started(make_engine(method="source"))
        x = images(64)
        predictions = await engine.predict(x)
        labels = {p.request_id: i % 10 for i, p in enumerate(predictions)}
        result = engine.feedback(labels)
        with pytest.raises(UnknownRequestIds):
            engine.feedback({"nope": 1})
        with pytest.raises(UnknownRequestIds):  # each id is labelled once
            engine.feedback({predictions[0].request_id: 1})
        await engine.stop()
        return predictions, result

    predictions, result = run(scenario())
    probs = torch.stack([p.probabilities for p in predictions])
    offline = adapters.expected_calibration_error(probs.log(), torch.arange(64) % 10)
    assert result["accepted"] == 64 and result["feedback_window_samples"] == 64
    assert result["feedback_ece_ratio"] == pytest.approx(offline / 100, abs=1e-8)


def test_snapshots_restore_the_adapted_state_and_reset_returns_to_source():
    async def scenario():
        engine = await started(make_engine(options={"e0": 10.0, "redundancy_eps": 2.0}))
        await engine.predict(images(32))
        saved = await engine.save_snapshot("after-one")
        params = engine.adapter.adapted_parameters()
        await engine.predict(images(32, seed=1))
        await engine.restore_snapshot("after-one")
        restored = engine.adapter.adapted_parameters()
        with pytest.raises(SnapshotNotFound):
            await engine.restore_snapshot("missing")
        await engine.reset()
        info = await engine.adaptation_info()
        await engine.stop()
        return saved, params, restored, info, engine

    saved, params, restored, info, engine = run(scenario())
    assert saved.parameter_version == 1 and [s.name for s in engine.list_snapshots()] == ["after-one"]
    assert all(torch.equal(params[k], v) for k, v in restored.items())
    assert info["resets"] == {"manual": 1} and info["health"]["parameter_drift_ratio"] == 0.0


def test_configuration_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        ModelConfig(name="x", architecture="digits", factory="a:b")
    with pytest.raises(ValueError, match="lrr"):
        ModelConfig(name="x", architecture="digits", options={"lrr": 1})
    bad = tmp_path / "models.yaml"
    bad.write_text("models:\n  - name: a\n    architecture: digits\n    mode: sometimes\n")
    with pytest.raises(ConfigError, match=r"models\.0\.mode"):
        load_settings(bad)
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")
    good = tmp_path / "models.toml"
    good.write_text('[[models]]\nname = "cifar"\narchitecture = "resnet20"\nweights = "w.th"\nmethod = "tent"\n')
    settings = load_settings(good)
    assert settings.models[0].weights == tmp_path / "w.th"  # relative to the config file
    assert Settings().resolved_models()[0].name == "digits"  # zero-configuration default


def test_a_lone_request_after_a_large_batch_is_normalised_with_its_statistics():
    async def answers(recent: bool):
        engine = await started(make_engine(method="norm", min_adapt_batch=8, recent_statistics=recent))
        x = images(16)
        batch = await engine.predict(x)
        lone = await engine.predict(x[:1])
        fallbacks = engine.small_batch.frozen_fallbacks
        await engine.stop()
        return batch[0].probabilities, lone[0].probabilities, fallbacks

    in_batch, alone, fallbacks = run(answers(recent=True))
    # the batch's own statistics, recorded (with the unbiased variance, as BatchNorm keeps it: ~1e-4 apart)
    torch.testing.assert_close(alone, in_batch, atol=3e-4, rtol=1e-3)
    assert fallbacks == 0
    in_batch, padded, _ = run(answers(recent=False))  # the context policy: padded with other recent inputs
    assert not torch.allclose(padded, in_batch, atol=3e-4)


def test_lone_requests_follow_the_adapted_weights_through_the_traced_graph():
    async def scenario():
        engine = await started(make_engine(method="tent", min_adapt_batch=8))
        await engine.predict(images(16))
        await engine.predict(images(1, seed=8))  # the graph is traced here, before the weights move
        for seed in range(1, 3):
            await engine.predict(images(16, seed=seed))  # sync steps: the weights move in place
        x = images(1, seed=9)
        served = (await engine.predict(x))[0].probabilities

        def eager() -> torch.Tensor:
            assert engine.small_batch.recent is not None
            with engine.small_batch.recent.applied():
                return engine.adapter.predict(x).softmax(1)[0]

        expected = await engine.run_on_worker(eager)
        graph_used = engine.small_batch._recent_graph_module is not None
        drift = engine.adapter.parameter_drift()
        await engine.stop()
        return served, expected, graph_used, drift

    served, expected, graph_used, drift = run(scenario())
    assert graph_used and drift > 0
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)


def test_sync_answers_go_out_before_the_update_and_a_failed_update_fails_no_request():
    async def scenario():
        engine = await started(make_engine(options={"e0": 10.0, "redundancy_eps": 2.0}))
        optimizer = engine.adapter.optimizer
        original, release = optimizer.step, threading.Event()

        def held_step(*args, **kwargs):  # the first update waits until the client has its answer, then fails
            optimizer.step = original
            if not release.wait(10):
                raise AssertionError("the answer waited for the update")
            raise RuntimeError("optimiser blew up")

        optimizer.step = held_step
        answered = await asyncio.wait_for(engine.predict(images(16, seed=1)), 5)
        release.set()
        later = await engine.predict(images(16, seed=2))  # the worker keeps serving and adapting
        info = await engine.adaptation_info()
        await engine.stop()
        return answered, later, info

    answered, later, info = run(scenario())
    assert len(answered) == 16 and answered[0].parameter_version == 0
    assert len(later) == 16 and info["updates"] == 1  # the failed update did not count


def test_a_step_reports_its_prediction_before_the_weights_move():
    adapter = adapters.create("eata", small_bn_cnn(), num_classes=10, e0=10.0, redundancy_eps=2.0)
    seen = {}

    def on_prediction(logits, entropy, reliable, selected, divergence):
        seen["divergence"] = divergence  # eata has no model divergence
        seen["logits"] = logits.clone()
        seen["params"] = {n: p.detach().clone() for n, p in adapter.params.items()}
        seen["selected"] = selected.clone()

    before = {n: p.detach().clone() for n, p in adapter.params.items()}
    result = adapter.step(images(16), on_prediction)
    assert result.updated
    assert torch.equal(seen["logits"], result.logits) and torch.equal(seen["selected"], result.selected)
    assert seen["divergence"] is None and result.divergence is None
    assert all(torch.equal(seen["params"][n], before[n]) for n in before)  # called before the update
    assert any(not torch.equal(p, before[n]) for n, p in adapter.params.items())


def test_large_no_gradient_batches_are_answered_by_a_traced_batch_graph_that_keeps_recording_statistics():
    async def scenario():  # norm: batch statistics without updates, so the weights hold still between answers
        engine = await started(make_engine(method="norm", mode="async", min_adapt_batch=8))
        await engine.predict(images(16))  # the first recorded pass runs eagerly
        recent = engine.small_batch.recent
        assert recent is not None
        updates = recent.updates
        x = images(16, seed=5)
        served = torch.stack([p.probabilities for p in await engine.predict(x)])
        graph_used = engine.small_batch._batch_graph_module is not None
        recorded = recent.updates - updates
        eager = await engine.run_on_worker(lambda: engine.adapter.predict(x).softmax(1))
        await engine.stop()
        return served, eager, graph_used, recorded

    served, eager, graph_used, recorded = run(scenario())
    assert graph_used and recorded >= 1
    torch.testing.assert_close(served, eager, atol=1e-5, rtol=1e-4)


def test_async_answers_to_iid_traffic_come_from_a_traced_graph_that_follows_the_adapted_weights():
    """The served default (correlated_traffic: auto): while the traffic is judged i.i.d., a large batch is
    answered by a traced graph that reads the live weights, as the eager pass would answer it; while it is
    judged correlated, by the eager pass (the probe's normalisation, LAME)."""

    async def scenario():
        engine = await started(make_engine(mode="async", correlated_traffic="auto", min_adapt_batch=16))
        switch = engine.adapter.switch
        switch.probe_due = lambda: False  # the test sets the judgement (random images may look correlated)
        switch.correlated = False
        x = images(32, seed=5)

        async def served_and_eager(x: torch.Tensor = x) -> tuple[torch.Tensor, torch.Tensor]:
            served = torch.stack([p.probabilities for p in await engine.predict(x)])
            eager = await engine.run_on_worker(lambda: engine.adapter.predict(x).softmax(1))
            return served, eager

        first = await served_and_eager()
        small = await served_and_eager(x[:4])  # too few to estimate statistics: blended with the moving average
        graphs = engine.small_batch._robust_graphs
        graph_used = graphs.get(1.0) is not None and graphs.get(engine.adapter.options.bn_momentum) is not None

        def move_weights() -> None:
            with torch.no_grad():
                for p in engine.adapter.params.values():
                    p.add_(0.3)

        await engine.run_on_worker(move_weights)
        moved = await served_and_eager()
        graph, calls = engine.small_batch._robust_graphs[1.0], []
        engine.small_batch._robust_graphs[1.0] = lambda batch: calls.append(1) or graph(batch)
        switch.correlated = True
        correlated = await served_and_eager()
        await engine.stop()
        return graph_used, first, small, moved, correlated, calls

    graph_used, first, small, moved, correlated, calls_while_correlated = run(scenario())
    assert graph_used
    for served, eager in (first, small, moved, correlated):
        torch.testing.assert_close(served, eager, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(moved[0], first[0], atol=1e-3)  # the graph answers with the updated weights
    assert not calls_while_correlated  # correlated: the eager pass (the probe's normalisation, LAME)


def test_a_probe_evaluation_does_not_change_the_statistics_small_batches_are_normalised_with():
    from service.health import ProbeSet

    async def scenario():
        engine = await started(make_engine(method="norm", min_adapt_batch=8))
        unlike_the_traffic = images(32, seed=3) + 4.0
        engine.monitor.probe = ProbeSet(unlike_the_traffic, torch.zeros(32, dtype=torch.long))
        await engine.predict(images(16))
        x = images(1, seed=4)
        before = (await engine.predict(x))[0].probabilities
        await engine.evaluate_probe()
        after = (await engine.predict(x))[0].probabilities
        await engine.stop()
        return before, after

    before, after = run(scenario())
    torch.testing.assert_close(after, before)


def test_the_small_batch_policy_benchmark_runs_through_the_public_engine() -> None:
    """The short form of ``python -m benchmarks.small_batch_policy``: it must keep working as the engine moves."""
    from benchmarks.small_batch_policy import measure

    ((name, recent, padded),) = measure(images=64, corruptions=["fog"], fisher_size=64)
    assert name == "fog"
    assert 0.3 < recent <= 1.0 and 0.3 < padded <= 1.0  # fog at severity 5: the frozen ResNet-20 gets ~66 %


@pytest.mark.parametrize(("margin", "resets"), [(0.05, {"worse_than_source": 1}), (None, {})])
def test_a_model_the_probe_finds_worse_than_its_source_is_reset(margin, resets):
    """Adaptation must never leave a model worse than not adapting: the probe set decides, and acts."""
    from service.health import ProbeSet

    async def scenario():
        engine = await started(make_engine(method="tent", reset_when_worse_than_source=margin))
        x = images(64, seed=5)
        labels = engine.source.predict(x).argmax(1)  # the frozen source model is 100 % right on its labels
        engine.monitor.probe = ProbeSet(x, labels)
        with torch.no_grad():  # an update that ruined the model (as collapse on correlated batches does)
            for p in engine.adapter.params.values():
                p.mul_(-3.0)
        result = await engine.evaluate_probe()
        info = await engine.adaptation_info()
        await engine.stop()
        return result, info

    result, info = run(scenario())
    assert result["probe_forgetting_ratio"] < -0.05  # reported either way
    assert info["resets"] == resets
    assert (info["health"]["parameter_drift_ratio"] == 0.0) == bool(resets)  # back at the source weights


def test_correlated_traffic_serves_the_switch_and_lame_and_replicates_them():
    """``correlated_traffic``: the switch's correlated mode (``always``: throughout, so no update) with LAME,
    a lone image answered from the moving average, explicit options winning; under ``auto`` (kept i.i.d.
    here) a follower loading the leader's state answers as it does."""
    async def scenario():
        always = await started(make_engine(method="eata", correlated_traffic=True, options={"e0": 10.0}))
        iid = {"e0": 10.0, "bn_switch": {"enter": 0.0, "leave": 0.0}}  # an untrained model predicts few classes
        leader = await started(make_engine(method="eata", correlated_traffic="auto", options=iid))
        follower = await started(make_engine(method="eata", correlated_traffic="auto", options=iid))
        for seed in range(4):
            await always.predict(images(16, seed=seed))
            await leader.predict(images(16, seed=seed))  # adaptation steps move weights and statistics
        lone = await leader.predict(images(1, seed=9))
        follower.import_state(leader.export_state(), version=7)
        x = images(16, seed=11)
        a, b = leader.adapter.predict(x), follower.adapter.predict(x)
        for engine in (always, leader, follower):
            await engine.stop()
        return always, leader, follower, lone, a, b

    always, leader, follower, lone, a, b = run(scenario())
    options = always.adapter.options
    assert options.bn_stats == "auto" and options.bn_switch.always_correlated
    assert options.lame.enabled and options.lame.max_class_diversity == 0.9 and options.e0 == 10.0
    assert always.adapter.switch.correlated and always.adapter.stats.updates == 0
    assert leader.small_batch.frozen_fallbacks == 0 and len(lone) == 1  # the moving average answered
    assert leader.adapter.stats.updates > 0
    torch.testing.assert_close(a, b)  # parameters and moving statistics came over
    assert follower.adapter.stats.parameter_version == 7
    plain = make_engine(method="eata").adapter.options
    assert plain.bn_stats == "batch" and not plain.lame.enabled  # 'never' (false): the papers
    assert ModelConfig(name="m", architecture="digits").correlated_traffic == "auto"  # the served default
    auto = make_engine(method="eata", correlated_traffic="auto").adapter
    assert auto.options.bn_stats == "auto" and auto.options.lame.max_class_diversity == 0.9
    assert auto.switch is not None and not auto.switch.correlated


def test_a_follower_configured_with_other_options_refuses_the_leaders_state():
    leader = make_engine(method="eata", options={"e0": 10.0})
    sgd = make_engine(method="eata", options={"e0": 10.0, "optimizer": "sgd"})
    with pytest.raises(StateRefused, match="optimizer: 'adam' in the state, 'sgd' here"):
        sgd.import_state(leader.export_state(), version=3)
    assert sgd.adapter.stats.parameter_version == 0  # nothing taken


def test_the_efficient_preset_back_propagates_a_share_of_the_selected_samples_only():
    from service.settings import EFFICIENCY

    efficient = make_engine(method="eata", efficiency="efficient").adapter.options
    assert efficient.backward == "selected" and efficient.max_selected == EFFICIENCY["efficient"]["max_selected"]
    papers = make_engine(method="eata").adapter.options
    assert papers.backward != "selected" and papers.max_selected is None and papers.lr == 0.001
    explicit = make_engine(method="eata-c", efficiency="efficient", options={"lr": 0.01}).adapter.options
    assert explicit.lr == 0.01 and explicit.backward == "selected"  # options set explicitly win
    with pytest.raises(ValueError, match="efficiency 'efficient' tunes EATA's redundancy filter; method 'tent'"):
        ModelConfig(name="m", architecture="digits", method="tent", efficiency="efficient")
    # The bench applies the same preset to EATA and EATA-C and leaves the other methods as they are.
    from benchmarks.cli import served_overrides

    merged = served_overrides(("tent", "eata"), {"eata": {"lr": 0.01}}, efficiency="efficient")
    assert merged["tent"] == {} and merged["eata"] == {**EFFICIENCY["efficient"], "lr": 0.01}
