"""EATA-C's fitted confidence map (issue 17): Platt scaling of the top probability, fitted on clean data."""

from __future__ import annotations

import pytest
import torch
from helpers import images, small_bn_cnn

import adapters
from adapters.confidence_map import mapped_confidence, top_probability_logit
from adapters.methods.eata_c import temperature_to_confidence
from adapters.metrics import expected_calibration_error


def overconfident(n: int = 4000, accuracy: float = 0.7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose top probability is about 0.99 while only ``accuracy`` of the labels are right."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=g)
    predicted = logits.argmax(1)
    logits[torch.arange(n), predicted] += 6.0
    wrong = torch.rand(n, generator=g) > accuracy
    labels = torch.where(wrong, (predicted + 1) % 10, predicted)
    return logits, labels


def test_a_fitted_map_turns_overconfidence_into_the_accuracy_it_has():
    logits, labels = overconfident()
    a, b = adapters.fit_confidence_map(logits[:2000], labels[:2000])
    held_out, truth = logits[2000:], labels[2000:]
    mapped = mapped_confidence(held_out, (a, b))
    answered = temperature_to_confidence(held_out, mapped)  # what EATA-C returns: same labels, mapped confidence
    assert torch.equal(answered.argmax(1), held_out.argmax(1))
    assert float(mapped.mean()) == pytest.approx(0.7, abs=0.03)
    assert expected_calibration_error(held_out, truth) > 20 and expected_calibration_error(answered, truth) < 5


def test_eata_c_fitted_confidence_keeps_every_label_and_answers_the_maps_confidence():
    model, x = small_bn_cnn(), images(32, seed=4)
    full = adapters.create("eata-c", model, confidence="full").step(x).logits
    fitted = adapters.create("eata-c", model, confidence="fitted", confidence_map=(-0.4, 0.5)).step(x).logits
    assert torch.equal(fitted.argmax(1), full.argmax(1))
    expected = torch.sigmoid(-0.4 + 0.5 * top_probability_logit(full)).float()
    torch.testing.assert_close(fitted.softmax(1).max(1).values, expected, atol=1e-3, rtol=1e-3)


def test_fitted_confidence_without_a_map_is_refused_by_name():
    with pytest.raises(adapters.AdapterConfigError, match="confidence_map"):
        adapters.create("eata-c", small_bn_cnn(), confidence="fitted")


def test_the_server_fits_eata_cs_confidence_map_from_confidence_data_at_start_up(tmp_path):
    import numpy as np

    from adapters.models.digits import digits_split
    from service.engine import ModelEngine
    from service.model_sources import load_model
    from service.settings import ModelConfig

    (x, y), _ = digits_split()
    data = tmp_path / "clean.npz"
    np.savez(data, x=x[:600], y=y[:600])
    config = ModelConfig(name="digits", architecture="digits", method="eata-c", confidence_data=data,
                         confidence_size=500)
    loaded = load_model(config, torch.device("cpu"))
    assert loaded.confidence_map is not None and loaded.confidence_map != (0.0, 1.0)
    engine = ModelEngine(config, loaded, device=torch.device("cpu"))
    assert engine.adapter.options.confidence == "fitted"
    assert engine.adapter.options.confidence_map == pytest.approx(loaded.confidence_map)
    with pytest.raises(ValueError, match="confidence_data"):
        ModelConfig(name="d", architecture="digits", method="eata", confidence_data=data)


def test_without_confidence_data_the_map_is_fitted_on_the_fisher_set_or_the_built_in_clean_split(tmp_path):
    import numpy as np

    from adapters.models.digits import digits_split
    from service.model_sources import load_model
    from service.settings import ModelConfig

    (x, y), _ = digits_split()
    fisher = tmp_path / "fisher.npz"
    np.savez(fisher, x=x[:300], y=y[:300])
    cpu = torch.device("cpu")
    built_in = load_model(ModelConfig(name="d", architecture="digits", method="eata-c"), cpu).confidence_map
    from_fisher = load_model(ModelConfig(name="d", architecture="digits", method="eata-c", fisher_data=fisher),
                             cpu).confidence_map
    assert built_in is not None and from_fisher is not None and from_fisher != pytest.approx(built_in)
    # A confidence the operator chose is kept: nothing is fitted.
    chosen = ModelConfig(name="d", architecture="digits", method="eata-c", options={"confidence": "subnetwork"})
    assert load_model(chosen, cpu).confidence_map is None
    assert chosen.effective_options()["confidence"] == "subnetwork"


def test_eata_c_without_clean_data_warns_once_and_not_when_its_map_is_configured(caplog):
    from service.model_sources import load_model
    from service.settings import ModelConfig

    cpu = torch.device("cpu")
    bare = ModelConfig(name="m", factory="helpers:small_bn_cnn", input_size=(8, 8), method="eata-c",
                       classes=[str(i) for i in range(10)])
    assert load_model(bare, cpu).confidence_map is None
    assert "no labelled clean data to fit its confidence map" in caplog.text
    caplog.clear()
    mapped = bare.model_copy(update={"options": {"confidence_map": (-0.4, 0.5)}})
    assert load_model(mapped, cpu).confidence_map is None  # nothing fitted: the configured map serves
    assert mapped.effective_options()["confidence_map"] == (-0.4, 0.5)
    assert "no labelled clean data" not in caplog.text
