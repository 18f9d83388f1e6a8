"""Shared fixtures: the read-only shared data folder, required under CI (fail, never skip)."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.data import checkpoint_path, cifar10_test_path, load_npz, shared_dir


@pytest.fixture(scope="session")
def shared():
    path = shared_dir()
    if not path.is_dir():
        msg = f"shared data folder {path} is missing; set TTA_SHARED"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def cifar10(shared):
    return load_npz(cifar10_test_path())


@pytest.fixture(scope="session")
def resnet20_weights(shared):
    return checkpoint_path("resnet20")


@pytest.fixture(scope="session", autouse=True)
def _digits_cache(tmp_path_factory):
    """One digits-model cache per session (unless the caller set TTA_CACHE_DIR): it trains once."""
    if "TTA_CACHE_DIR" not in os.environ:
        os.environ["TTA_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "tta-cache")
    yield


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
