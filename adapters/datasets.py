"""Labelled image files as arrays, in the formats people actually have, and as model input.

Every reader returns ``(x, y)``: ``x`` uint8 ``N x H x W x 3`` (RGB), ``y`` int64 labels. Three layouts
are understood, chosen by what the path is:

- an ``.npz`` holding arrays ``x`` and ``y`` (what the benchmarks and tests write);
- the official CIFAR-10 python archive ``cifar-10-python.tar.gz``, read without extracting it;
- its extracted folder ``cifar-10-batches-py/``.

The official archive stores pickled batches. Pickle can run code, so the batches are read with an
unpickler that builds only plain containers and numpy arrays: a tampered file is refused, not run.
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

#: The batch of the official archive that holds the 10,000 test images.
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FOLDER = "cifar-10-batches-py"
FORMATS = (
    "an .npz with arrays 'x' (uint8 N x H x W x 3) and 'y' (labels), the official CIFAR-10 archive "
    "cifar-10-python.tar.gz, or its extracted cifar-10-batches-py/ folder"
)


class DataFileError(ValueError):
    """A data file that is missing or not in a layout we read; the message names the file and the formats."""


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW in [0, 1], the input every zoo model expects."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)


def load_images(path: str | Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from an npz, the CIFAR-10 python archive or its folder (``split``: test or train)."""
    path = Path(path)
    if path.is_dir():
        return _load_cifar10_folder(path, split)
    if not path.is_file():
        raise DataFileError(f"data file not found: {path} (expected {FORMATS})")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _load_cifar10_archive(path, split)
    return load_npz(path)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an ``x`` (uint8 NxHxWx3) / ``y`` (int) npz, with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file not found: {path} (expected {FORMATS})")
    try:
        with np.load(path) as data:
            if "x" not in data or "y" not in data:
                raise DataFileError(f"{path} must hold arrays 'x' (uint8 NxHxWx3) and 'y'; found {list(data)}")
            x, y = data["x"], data["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"{path} is not a readable npz ({exc}); expected {FORMATS}") from exc
    return _checked(x, y, path)


def _checked(x: np.ndarray, y: np.ndarray, source: Path | str) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise DataFileError(f"{source}: 'x' must be uint8 NxHxWx3, got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataFileError(f"{source}: {len(x)} images but labels of shape {y.shape}")
    return x, y.astype(np.int64)


def _batch_names(split: str) -> tuple[str, ...]:
    if split == "test":
        return (CIFAR10_TEST_BATCH,)
    if split == "train":
        return CIFAR10_TRAIN_BATCHES
    raise ValueError(f"split must be 'test' or 'train', not {split!r}")


def _load_cifar10_folder(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if (folder / CIFAR10_FOLDER).is_dir():  # the folder the archive was extracted into
        folder = folder / CIFAR10_FOLDER
    parts = []
    for name in _batch_names(split):
        path = folder / name
        if not path.is_file():
            raise DataFileError(f"{folder} is not a cifar-10-batches-py folder: {name} is missing (expected {FORMATS})")
        parts.append(_decode_batch(path.read_bytes(), path))
    return _concatenate(parts, folder)


def _load_cifar10_archive(archive: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with tarfile.open(archive) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            parts = []
            for name in _batch_names(split):
                if name not in members:
                    raise DataFileError(f"{archive} holds no CIFAR-10 batch {name!r} (expected {FORMATS})")
                handle = tar.extractfile(members[name])
                assert handle is not None  # a regular file member always has contents
                parts.append(_decode_batch(handle.read(), f"{archive}:{members[name].name}"))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFileError(f"{archive} is not a readable tar archive ({exc}); expected {FORMATS}") from exc
    return _concatenate(parts, archive)


def _concatenate(parts: list[tuple[np.ndarray, np.ndarray]], source: Path) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return _checked(x, y, source)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, numbers and numpy arrays; any other global is refused."""

    _ALLOWED: ClassVar[dict[str, object]] = {
        "_reconstruct": np.empty(0).__reduce__()[0],
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }

    def find_class(self, module: str, name: str) -> object:
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            return self._ALLOWED[name]
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at pickle protocol 2
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")


def _decode_batch(data: bytes, source: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """One official batch: ``data`` is N x 3072 uint8 (1024 red, then green, then blue, row-major)."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
        pixels = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataFileError(f"{source} is not a CIFAR-10 python batch ({exc})") from exc
    if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise DataFileError(f"{source}: 'data' must be N x 3072, got {pixels.shape}")
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels
