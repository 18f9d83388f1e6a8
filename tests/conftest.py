"""Shared fixtures. The suite needs the read-only shared data folder: without it, one clear error.

``TTA_SHARED`` names the folder (default ``../shared`` beside this checkout; the test suite is not
part of the installed package, so the default may come from its own location). It is exported so that
the benchmark helpers and every server or CLI subprocess a test starts read the same folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adapters.datasets import load_npz
from benchmarks.data import SHARED_ENV, checkpoint_path, cifar10_test_path

CHECKOUT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get(SHARED_ENV) or CHECKOUT.parent / "shared").resolve()
NEEDED = ("data/cifar10_test.npz", "models")


def pytest_configure(config: pytest.Config) -> None:
    """Stop before collecting anything when the shared folder is missing: one message, not dozens."""
    missing = [name for name in NEEDED if not (SHARED / name).exists()]
    if missing:
        pytest.exit(
            f"the test suite needs the shared data folder: {SHARED} lacks {', '.join(missing)}. "
            f"Set {SHARED_ENV} to the folder holding data/cifar10_test.npz and models/ (see README, Tests).",
            returncode=2,
        )
    os.environ[SHARED_ENV] = str(SHARED)


@pytest.fixture(scope="session")
def shared() -> Path:
    return SHARED


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
