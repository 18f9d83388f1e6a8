"""The built-in ``digits`` model: a small BatchNorm CNN on scikit-learn's handwritten digits.

It needs no download (the 1,797 digit images ship inside scikit-learn), trains in seconds on a CPU
and is cached under the user's cache directory, so tta-serve serves something real out of the box.
Digits are rendered as 32x32 RGB images so they flow through the same image path as CIFAR.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters.datasets import to_tensor
from adapters.models.zoo import load_state_dict_file, load_weights

DIGIT_CLASSES = [str(d) for d in range(10)]
CACHE_NAME = "digits-cnn-v1.safetensors"
TRAIN_SIZE = 1200  # the first 1,200 digits train the model; the remaining 597 are held out


def cache_dir() -> Path:
    """``$TTA_CACHE_DIR``, else ``$XDG_CACHE_HOME/tta-serve``, else ``~/.cache/tta-serve``."""
    if "TTA_CACHE_DIR" in os.environ:
        return Path(os.environ["TTA_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tta-serve"


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU x3 with pooling, for 3x32x32 inputs in [0, 1].

    The first 2x2 average pool costs nothing in accuracy (the digits are 8x8 scans) and makes
    training four times cheaper.
    """

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        nn.AvgPool2d(2),
        *block(3, 8), *block(8, 16), *block(16, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 Nx32x32x3 RGB images (white strokes on black) and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # N x 1 x 8 x 8
    big = F.interpolate(small, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    rgb = (big.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return rgb, data.target.astype(np.int64)


def digits_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) splits of :func:`digits_images`."""
    x, y = digits_images()
    return (x[:TRAIN_SIZE], y[:TRAIN_SIZE]), (x[TRAIN_SIZE:], y[TRAIN_SIZE:])


def train_digits_model(epochs: int = 10, seed: int = 0) -> nn.Module:
    """Train :func:`digits_cnn` on the training split (a few seconds on one CPU thread).

    One thread: the network is too small to gain from more, and on a busy machine extra threads
    spin and make training many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    (x, y), _ = digits_split()
    xt, yt = to_tensor(x), torch.from_numpy(y)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def load_digits_model(cache: Path | None = None, retrain: bool = False) -> nn.Module:
    """The trained digits model: from the cache if present, else trained now and cached."""
    from safetensors.torch import save_file

    path = (cache or cache_dir()) / CACHE_NAME
    model = digits_cnn()
    if path.is_file() and not retrain:
        try:
            load_weights(model, load_state_dict_file(path), source=str(path))
            return model.eval()
        except Exception:  # a corrupt cache is rebuilt rather than failing start-up
            path.unlink(missing_ok=True)
    model = train_digits_model()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return model
