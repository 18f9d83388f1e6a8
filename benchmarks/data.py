"""Where the data a user brings lives: named by a flag or a ``TTA_*`` variable, never guessed.

The benchmarks need the CIFAR-10 test set and CIFAR ResNet checkpoints (and optionally the published
CIFAR-10-C folder). Each comes, in this order, from its command-line flag, its own variable, or the
folder ``$TTA_SHARED`` (laid out as ``data/cifar10_test.npz`` and ``models/<checkpoint>``). Nothing is
looked up relative to where the package is installed: when none is given, :class:`DataNotGiven` says
which flag and variable to set and what file they should name (docs/data.md says where to get it).
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters.datasets import FORMATS

SHARED_ENV = "TTA_SHARED"
CIFAR10_ENV = "TTA_CIFAR10"
CIFAR10C_ENV = "TTA_CIFAR10C_DIR"
MODELS_ENV = "TTA_MODELS_DIR"


class DataNotGiven(LookupError):
    """A data file the command needs was named nowhere (or named but absent); says how to name it."""


def shared_dir() -> Path | None:
    """The folder ``$TTA_SHARED`` names, or None when the variable is unset."""
    value = os.environ.get(SHARED_ENV)
    return Path(value).expanduser() if value else None


def _env_path(name: str, child: str | None = None) -> Path | None:
    value = os.environ.get(name)
    if not value:
        return None
    return Path(value).expanduser() / child if child else Path(value).expanduser()


def _resolve(what: str, expected: str, sources: list[tuple[Path | None, str]], how: str) -> Path:
    """The first source given (flag, variable, shared folder), which must exist; else say ``how``."""
    for path, origin in sources:
        if path is not None:
            if not path.exists():
                raise DataNotGiven(f"{what} not found: {path} (from {origin}). Expected {expected}.")
            return path
    raise DataNotGiven(f"{what} not given: {how}. Expected {expected}. See docs/data.md.")


def cifar10_test_path(given: Path | None = None, flag: str = "--clean-data") -> Path:
    """The CIFAR-10 test set: ``--clean-data``, ``$TTA_CIFAR10`` or ``$TTA_SHARED/data/cifar10_test.npz``."""
    return _resolve(
        "CIFAR-10 test set",
        FORMATS,
        [
            (given, flag),
            (_env_path(CIFAR10_ENV), CIFAR10_ENV),
            (_env_path(SHARED_ENV, "data/cifar10_test.npz"), SHARED_ENV),
        ],
        f"pass {flag} FILE or set {CIFAR10_ENV}=FILE (or {SHARED_ENV} to a folder holding data/cifar10_test.npz)",
    )


def cifar10c_dir(given: Path | None = None, flag: str = "--cifar10c-dir") -> Path | None:
    """The published CIFAR-10-C folder when named by ``--cifar10c-dir`` or ``$TTA_CIFAR10C_DIR``; else None.

    Optional: without it the benchmark regenerates CIFAR-10-C from the clean set.
    """
    sources = [(given, flag), (_env_path(CIFAR10C_ENV), CIFAR10C_ENV)]
    if all(path is None for path, _ in sources):
        return None
    return _resolve("CIFAR-10-C folder", "the published layout: <corruption>.npy and labels.npy", sources, "")


def checkpoint_path(model: str, given: Path | None = None, flag: str = "--weights") -> Path:
    """An akamaster CIFAR checkpoint: ``--weights``, ``$TTA_MODELS_DIR/<file>`` or ``$TTA_SHARED/models/<file>``."""
    from adapters.models import AKAMASTER_FILES

    file = AKAMASTER_FILES[model]
    return _resolve(
        f"{model} checkpoint",
        f"the akamaster file {file} (a torch state_dict)",
        [
            (given, flag),
            (_env_path(MODELS_ENV, file), MODELS_ENV),
            (_env_path(SHARED_ENV, f"models/{file}"), SHARED_ENV),
        ],
        f"pass {flag} FILE or set {MODELS_ENV} to the folder holding {file} "
        f"(or {SHARED_ENV} to a folder holding models/)",
    )
