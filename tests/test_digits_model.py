"""The built-in digits model: trained from scikit-learn's data on first use, then cached."""

from __future__ import annotations

import torch

from adapters.models.digits import CACHE_NAME, digits_split, load_digits_model


def test_digits_model_trains_once_caches_and_classifies_held_out_digits(tmp_path):
    model = load_digits_model(cache=tmp_path)
    assert (tmp_path / CACHE_NAME).is_file()
    _, (x, y) = digits_split()
    logits = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert (logits.argmax(1).numpy() == y).mean() > 0.9
    again = load_digits_model(cache=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_a_corrupt_cache_is_rebuilt(tmp_path):
    (tmp_path / CACHE_NAME).write_bytes(b"garbage")
    model = load_digits_model(cache=tmp_path)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
