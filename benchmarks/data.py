"""Where the shared CIFAR-10 data and checkpoints live, and how to read them.

The shared folder is read-only and never copied into the repository; its path comes from the
environment variable ``TTA_SHARED`` (default ``../shared`` beside the checkout).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared data folder: ``$TTA_SHARED`` or ``../shared`` next to the checkout."""
    return Path(os.environ.get("TTA_SHARED", REPO_ROOT.parent / "shared")).resolve()


def cifar10_test_path() -> Path:
    return Path(os.environ.get("TTA_CIFAR10", shared_dir() / "data" / "cifar10_test.npz"))


def frost_dir() -> Path:
    return Path(os.environ.get("TTA_FROST_DIR", shared_dir() / "data" / "frost"))


def checkpoint_path(model: str) -> Path:
    """Path of an akamaster CIFAR checkpoint (``$TTA_MODELS_DIR`` overrides the folder)."""
    from adapters.models import AKAMASTER_FILES

    folder = Path(os.environ.get("TTA_MODELS_DIR", shared_dir() / "models"))
    return folder / AKAMASTER_FILES[model]


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an ``x`` (uint8 NxHxWx3) / ``y`` (int) npz, with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (set TTA_SHARED or pass the path)")
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise ValueError(f"{path} must hold arrays 'x' (uint8 NxHxWx3) and 'y'; found {list(data)}")
        x, y = data["x"], data["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{path}: 'x' must be uint8 NxHxWx3, got {x.dtype} {x.shape}")
    return x, y.astype(np.int64)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW in [0, 1], the input every zoo model expects."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
