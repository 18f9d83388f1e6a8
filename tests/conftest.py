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


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
