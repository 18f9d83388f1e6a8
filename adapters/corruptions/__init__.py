"""The 15 CIFAR-10-C corruptions at severities 1-5, regenerated with numpy, scipy and Pillow.

CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019) is rebuilt from the published generator's CIFAR
parameters, so the benchmarks and the demo need no download. Every corruption
works on a whole batch at once; only the random draws are made image by image, so that a batch and
image-by-image calls give the same pixels.

Random streams: image ``i`` of a batch corrupted with seed ``s`` draws from
``np.random.default_rng([*s, i])``; a single image draws from ``np.random.default_rng([*s])`` (an int
seed ``s`` counts as ``(s,)``). Hence ``corrupt(batch, name, k, seed=s)[i]`` equals
``corrupt(batch[i], name, k, seed=(*s, i))``, and a dataset's images never depend on how it is chunked.

The frost corruption blends crops of five texture photographs. The published generator shrinks each
to 0.2x before cropping; the package ships exactly those shrunk textures (``frost/``, 130 KB, with
``SHA256SUMS`` checked on load), so frost needs no file from the user. They were derived from the
published textures (Hendrycks & Dietterich, Apache-2.0; also inside the ``imagecorruptions`` package)
by :func:`shrink_frost_texture`, and a test checks them against the originals.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from adapters.corruptions.spatter import spatter as _spatter

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: The published generator's four extra corruptions (``make_cifar_c.py``), kept apart from the reported
#: 15: defaults (e.g. for class-correlated streams) are chosen on these, never on the reported stream.
#: Spatter's OpenCV steps are re-implemented in :mod:`adapters.corruptions.spatter`.
VALIDATION_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
SIZE = 32  # every parameter below is in pixels of a 32x32 image
CHUNK = 1000  # images corrupted together: bounds the float working memory to ~100 MB
# Bump whenever the pixels a (name, severity, seed, input) produce change: it keys corrupt_dataset's cache.
GENERATOR_VERSION = 1

Seed = int | Sequence[int]
Rngs = list[np.random.Generator]

# The published generator's CIFAR parameters, one entry per severity 1..5 (the spec's table).
PARAMS: dict[str, tuple[tuple[float, ...], ...]] = {
    "gaussian_noise": ((0.04,), (0.06,), (0.08,), (0.09,), (0.10,)),  # sigma on [0, 1]
    "shot_noise": ((500,), (250,), (100,), (75,), (50,)),  # Poisson rate per unit intensity
    "impulse_noise": ((0.01,), (0.02,), (0.03,), (0.05,), (0.07,)),  # salt-and-pepper amount
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias sigma
    # (sigma, max shift, iterations); see _glass_shuffle for what "max shift 1" means
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": ((1.06,), (1.11,), (1.16,), (1.21,), (1.26,)),  # stop of np.arange(1, stop, 0.01)
    # (mean, std, zoom, threshold, blur radius, blur sigma, blend)
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # strength, wibble decay
    "brightness": ((0.05,), (0.1,), (0.15,), (0.2,), (0.3,)),  # added to HSV value
    "contrast": ((0.75,), (0.5,), (0.4,), (0.3,), (0.15,)),  # factor towards the channel mean
    # (displacement strength, displacement smoothness, affine jitter), in pixels
    "elastic_transform": (
        (0, 0, 2.56),
        (1.6, 6.4, 2.24),
        (2.56, 1.92, 1.92),
        (3.2, 1.28, 1.6),
        (3.2, 0.96, 0.96),
    ),
    "pixelate": ((30,), (28,), (27,), (24,), (20,)),  # intermediate size in pixels
    "jpeg_compression": ((80,), (65,), (58,), (50,), (40,)),  # JPEG quality
}

# The validation corruptions' parameters, from the same generator.
VALIDATION_PARAMS: dict[str, tuple[tuple[float, ...], ...]] = {
    "speckle_noise": ((0.06,), (0.1,), (0.12,), (0.16,), (0.2,)),  # sigma of the multiplicative noise
    "gaussian_blur": ((0.4,), (0.6,), (0.7,), (0.8,), (1.0,)),  # sigma in pixels
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation * factor + offset
    # (liquid mean, liquid std, liquid blur sigma, threshold, strength, mud?): water drops at 1-3, mud at 4-5;
    # strength is the water layer's peak weight, or the mud mask's blur sigma
    "spatter": (
        (0.62, 0.1, 0.7, 0.7, 0.5, 0),
        (0.65, 0.1, 0.8, 0.7, 0.5, 0),
        (0.65, 0.3, 1.0, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ),
}

# The shipped, shrunk textures; the published originals are frost1-3.png and frost4-5.jpg (frost6 is never used).
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.png", "frost5.png")


# ---------------------------------------------------------------------------------------------------
# Shared operators
# ---------------------------------------------------------------------------------------------------


def _motion_blur(images: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage on a float batch (N,H,W,C), one angle (degrees) per image.

    The kernel is one-sided: ``2*ceil(radius)+1`` taps weighted ``exp(-i^2 / 2 sigma^2)`` at offsets
    ``round(i*cos a)`` columns and ``round(i*sin a)`` rows, with edge pixels repeated outside the image.
    """
    n, h, w = images.shape[:3]
    taps = np.arange(int(2 * np.ceil(radius) + 1))
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    rad = np.deg2rad(angles)[:, None]
    off_col = np.ceil(taps * np.cos(rad) - 0.5).astype(np.intp)  # (N, taps), ImageMagick's rounding
    off_row = np.ceil(taps * np.sin(rad) - 0.5).astype(np.intp)
    base = (np.arange(n) * h)[:, None]
    flat = images.reshape(n * h * w, -1)
    out = np.zeros(images.shape, dtype=np.float64)
    for t in np.flatnonzero(weights > 1e-9):  # the far taps of a narrow kernel cannot change a pixel
        rows = (base + np.clip(np.arange(h) + off_row[:, t, None], 0, h - 1)) * w
        cols = np.clip(np.arange(w) + off_col[:, t, None], 0, w - 1)
        out += weights[t] * flat.take(rows[:, :, None] + cols[:, None, :], axis=0)
    return out


@lru_cache(maxsize=64)
def _zoom_operator(zoom: float, size: int = SIZE) -> np.ndarray:
    """The published ``clipped_zoom`` along one axis as a (size x size) matrix.

    It takes the centre ``ceil(size/zoom)`` pixels, zooms them with ``scipy.ndimage.zoom(order=1)``
    and trims the centre ``size`` pixels; linear interpolation is separable, so an image zooms as
    ``Z @ image @ Z.T`` and many zooms become one matrix product.
    """
    crop = int(np.ceil(size / zoom))
    top = (size - crop) // 2
    zoomed = ndimage.zoom(np.eye(crop), (zoom, 1), order=1)  # column j = the zoomed unit vector e_j
    trim = (zoomed.shape[0] - size) // 2
    operator = np.zeros((size, size))
    operator[:, top : top + crop] = zoomed[trim : trim + size]
    operator.flags.writeable = False
    return operator


def _fold(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Bring integer indices back into [0, n): 'mirror' is cv2's REFLECT_101, 'reflect' repeats the edge."""
    if mode == "mirror":
        period = 2 * n - 2
        index = np.abs(index) % period
        return np.where(index >= n, period - index, index)
    period = 2 * n
    index = index % period
    return np.where(index >= n, period - 1 - index, index)


def _bilinear(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Sample a batch (N,H,W,C) at fractional (rows, cols) of shape (N,H,W), like map_coordinates(order=1)."""
    n, h, w, c = images.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    fr = (rows - r0).astype(images.dtype)[..., None]
    fc = (cols - c0).astype(images.dtype)[..., None]
    r0, c0 = r0.astype(np.intp), c0.astype(np.intp)
    base = (np.arange(n) * h)[:, None, None]
    ra, rb = (base + _fold(r0, h, mode)) * w, (base + _fold(r0 + 1, h, mode)) * w
    ca, cb = _fold(c0, w, mode), _fold(c0 + 1, w, mode)
    flat = images.reshape(n * h * w, c)  # one flat take per corner is far cheaper than 3-array indexing
    top = flat.take(ra + ca, axis=0) * (1 - fc) + flat.take(ra + cb, axis=0) * fc
    bottom = flat.take(rb + ca, axis=0) * (1 - fc) + flat.take(rb + cb, axis=0) * fc
    return top * (1 - fr) + bottom * fr


def _glass_shuffle(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """One pass of the published glass-blur pixel loop over a uint8 batch, as a single gather.

    The published loop visits rows and columns 31..2 in descending order and runs
    ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with ``(h', w') = (h+dy, w+dx)``,
    ``dy, dx = randint(-1, 1)`` in {-1, 0}. On numpy views that "swap" only copies ``x[h', w']`` into
    ``x[h, w]``, and the source has not been visited yet, so the whole pass is
    ``x[h, w] = x_before[h+dy, w+dx]``. ``shifts`` holds (dy, dx) per pixel: (N, 2, 30, 30).
    """
    n = len(images)
    span = np.arange(2, SIZE)
    rows = span[:, None] + shifts[:, 0]
    cols = span[None, :] + shifts[:, 1]
    out = images.copy()
    out[:, 2:, 2:] = images[np.arange(n)[:, None, None], rows, cols]
    return out


PLASMA_DRAWS = SIZE * SIZE - 1  # uniforms one 32x32 plasma fractal consumes: 3 * (1 + 4 + ... + 256)


def _plasma_fractal(uniforms: np.ndarray, decay: float) -> np.ndarray:
    """Diamond-square height maps (N, 32, 32) in [0, 1], the published ``plasma_fractal`` for a batch.

    ``uniforms`` (N, 1023) in [-1, 1) replace the published ``np.random.uniform`` calls so each map
    comes from its image's own stream; the published noise is ``wibble * U(-wibble, wibble)``.
    """
    n = len(uniforms)
    maps = np.zeros((n, SIZE, SIZE))
    step, wibble, used = SIZE, 100.0, 0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        nonlocal used
        k = total.shape[1] * total.shape[2]
        noise = uniforms[:, used : used + k].reshape(total.shape) * wibble * wibble
        used += k
        return total / 4 + noise

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares = squares + np.roll(squares, -1, axis=2)
        maps[:, half::step, half::step] = wibbled_mean(squares)
        centres, corners = maps[:, half::step, half::step], maps[:, ::step, ::step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, ::step, half::step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half::step, ::step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


class AssetError(RuntimeError):
    """A file shipped with the package is missing or altered: the installation is broken."""


def shrink_frost_texture(image: Image.Image) -> np.ndarray:
    """A published frost texture as RGB, shrunk to 0.2x the way the published cv2.resize(INTER_LINEAR) does it.

    At an exact 1/5 scale, cv2's bilinear resize samples source pixel ``5*i + 2`` with weight 1 (no
    anti-aliasing), so a strided slice reproduces it. RGBA textures lose alpha, as with cv2.imread.
    """
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    return np.ascontiguousarray(rgb[2::5, 2::5][: round(h * 0.2), : round(w * 0.2)])


@lru_cache(maxsize=1)
def frost_textures() -> tuple[np.ndarray, ...]:
    """The five shrunk frost textures shipped in the package, checked against ``frost/SHA256SUMS``."""
    folder = resources.files(__name__) / "frost"
    try:
        listing = (folder / "SHA256SUMS").read_text()
    except OSError as exc:
        raise AssetError(f"frost/SHA256SUMS missing from the installed package ({exc}); reinstall tta-serve") from exc
    sums = {name: digest for digest, name in (line.split() for line in listing.splitlines() if line.strip())}
    textures = []
    for name in FROST_FILES:
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            raise AssetError(f"frost texture {name} missing from the installed package; reinstall tta-serve") from exc
        if hashlib.sha256(data).hexdigest() != sums.get(name):
            raise AssetError(f"frost texture {name} does not match its SHA-256 in SHA256SUMS; reinstall tta-serve")
        with Image.open(io.BytesIO(data)) as image:
            texture = np.asarray(image.convert("RGB"))
        texture.flags.writeable = False
        textures.append(texture)
    return tuple(textures)


# ---------------------------------------------------------------------------------------------------
# The corruptions: uint8 batch (N,32,32,3) + one generator per image -> values on the 0..255 scale
# ---------------------------------------------------------------------------------------------------


def _gaussian_noise(x: np.ndarray, rngs: Rngs, sigma: float) -> np.ndarray:
    noise = np.stack([rng.normal(scale=sigma, size=x.shape[1:]) for rng in rngs])
    return np.clip(x / 255.0 + noise, 0, 1) * 255


def _shot_noise(x: np.ndarray, rngs: Rngs, rate: float) -> np.ndarray:
    x = x / 255.0
    counts = np.stack([rng.poisson(image * rate) for rng, image in zip(rngs, x, strict=True)])
    return np.clip(counts / rate, 0, 1) * 255


def _impulse_noise(x: np.ndarray, rngs: Rngs, amount: float) -> np.ndarray:
    """skimage ``random_noise(mode='s&p')``: each value flips with p=amount, to 1 or 0 with equal odds."""
    draws = np.stack([rng.random((2, *x.shape[1:])) for rng in rngs])
    flipped, salted = draws[:, 0] < amount, draws[:, 1] < 0.5
    out = x / 255.0
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out * 255


@lru_cache(maxsize=8)
def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The published ``disk``: a normalised disk on a 17x17 grid, smoothed by a 3x3 Gaussian."""
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    gauss = np.exp(-(np.array([-1.0, 0.0, 1.0]) ** 2) / (2 * alias_blur**2))
    gauss /= gauss.sum()
    kernel = ndimage.correlate1d(ndimage.correlate1d(disk, gauss, axis=0), gauss, axis=1)
    used = np.flatnonzero(kernel.any(axis=0))
    reach = max(8 - used.min(), used.max() - 8)
    return kernel[8 - reach : 9 + reach, 8 - reach : 9 + reach]


def _defocus_blur(x: np.ndarray, rngs: Rngs, radius: float, alias_blur: float) -> np.ndarray:
    kernel = _disk_kernel(radius, alias_blur)
    out = ndimage.correlate(x / 255.0, kernel[None, :, :, None], mode="mirror")  # cv2.filter2D border
    return np.clip(out, 0, 1) * 255


def _glass_blur(x: np.ndarray, rngs: Rngs, sigma: float, max_shift: float, iterations: float) -> np.ndarray:
    if max_shift != 1:
        raise NotImplementedError("the single-gather pixel loop assumes the published max shift of 1")
    blur = (0, sigma, sigma, 0)
    image = (ndimage.gaussian_filter(x / 255.0, blur, mode="nearest", truncate=4.0) * 255).astype(np.uint8)
    for _ in range(int(iterations)):
        shifts = np.stack([rng.integers(-1, 1, size=(2, SIZE - 2, SIZE - 2)) for rng in rngs])
        image = _glass_shuffle(image, shifts)
    out = ndimage.gaussian_filter(image / 255.0, blur, mode="nearest", truncate=4.0)
    return np.clip(out, 0, 1) * 255


def _motion_blur_corruption(x: np.ndarray, rngs: Rngs, radius: float, sigma: float) -> np.ndarray:
    angles = np.array([rng.uniform(-45, 45) for rng in rngs])
    return np.rint(_motion_blur(x.astype(np.float64), radius, sigma, angles))  # ImageMagick rounds to 8 bit


@lru_cache(maxsize=8)
def _zoom_blur_operator(stop: float) -> np.ndarray:
    """Sum over the zoom factors of kron(Z, Z): all zoomed copies of a flattened image in one product."""
    total = np.zeros((SIZE * SIZE, SIZE * SIZE))
    for zoom in np.arange(1, stop, 0.01):  # the published factors, arange's float end point included
        z = _zoom_operator(float(zoom))
        total += np.kron(z, z)
    return total.astype(np.float32)


def _zoom_blur(x: np.ndarray, rngs: Rngs, stop: float) -> np.ndarray:
    n = len(x)
    count = len(np.arange(1, stop, 0.01))
    flat = (x.astype(np.float32) / 255).transpose(1, 2, 0, 3).reshape(SIZE * SIZE, n * 3)
    zoomed = (_zoom_blur_operator(stop) @ flat).reshape(SIZE, SIZE, n, 3).transpose(2, 0, 1, 3)
    out = (x.astype(np.float32) / 255 + zoomed) / (count + 1)
    return np.clip(out, 0, 1) * 255


def _snow(
    x: np.ndarray,
    rngs: Rngs,
    mean: float,
    std: float,
    zoom: float,
    threshold: float,
    radius: float,
    sigma: float,
    blend: float,
) -> np.ndarray:
    n = len(x)
    layers, angles = np.empty((n, SIZE, SIZE)), np.empty(n)
    for i, rng in enumerate(rngs):
        layers[i] = rng.normal(loc=mean, scale=std, size=(SIZE, SIZE))
        angles[i] = rng.uniform(-135, -45)
    z = _zoom_operator(float(zoom))
    layers = z @ layers @ z.T
    layers[layers < threshold] = 0
    layers = (np.clip(layers, 0, 1) * 255).astype(np.uint8)  # the published 8-bit PNG hand-off
    snow = np.rint(_motion_blur(layers[..., None].astype(np.float64), radius, sigma, angles)) / 255
    image = x.astype(np.float32) / 255
    gray = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # cv2 RGB2GRAY
    image = blend * image + (1 - blend) * np.maximum(image, gray[..., None] * 1.5 + 0.5)
    return np.clip(image + snow + np.rot90(snow, 2, axes=(1, 2)), 0, 1) * 255


def _frost(x: np.ndarray, rngs: Rngs, image_weight: float, frost_weight: float) -> np.ndarray:
    textures = frost_textures()
    crops = np.empty(x.shape, dtype=np.float64)
    for i, rng in enumerate(rngs):
        texture = textures[rng.integers(len(textures))]
        top = rng.integers(0, texture.shape[0] - SIZE)
        left = rng.integers(0, texture.shape[1] - SIZE)
        crops[i] = texture[top : top + SIZE, left : left + SIZE]
    return image_weight * x + frost_weight * crops


def _fog(x: np.ndarray, rngs: Rngs, strength: float, decay: float) -> np.ndarray:
    image = x / 255.0
    max_val = image.max(axis=(1, 2, 3), keepdims=True)
    uniforms = np.stack([rng.uniform(-1, 1, PLASMA_DRAWS) for rng in rngs])
    image = image + strength * _plasma_fractal(uniforms, decay)[..., None]
    return np.clip(image * max_val / (max_val + strength), 0, 1) * 255


def _brightness(x: np.ndarray, rngs: Rngs, shift: float) -> np.ndarray:
    """Add to HSV value: with hue and saturation fixed, RGB scales with V, so no HSV round trip."""
    image = x / 255.0
    value = image.max(axis=-1, keepdims=True)
    new_value = np.minimum(value + shift, 1.0)
    scale = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, image * scale, new_value) * 255  # black has S=0: it turns gray


def _contrast(x: np.ndarray, rngs: Rngs, factor: float) -> np.ndarray:
    image = x / 255.0
    means = image.mean(axis=(1, 2), keepdims=True)
    return np.clip((image - means) * factor + means, 0, 1) * 255


# The published affine reference triangle, (x, y) points around the centre of a 32x32 image.
_ELASTIC_TRIANGLE = np.array([[26.0, 26.0], [26.0, 6.0], [6.0, 6.0]])


def _elastic_transform(x: np.ndarray, rngs: Rngs, strength: float, smoothness: float, jitter: float) -> np.ndarray:
    n = len(x)
    jitters, fields = np.empty((n, 3, 2)), np.empty((n, 2, SIZE, SIZE))
    for i, rng in enumerate(rngs):
        jitters[i] = rng.uniform(-jitter, jitter, size=(3, 2))
        fields[i] = rng.uniform(-1, 1, size=(2, SIZE, SIZE))  # dx, dy
    # cv2.warpAffine(M) with M mapping the triangle to its jittered copy samples the source at
    # M^-1(dst): the affine map from the jittered triangle back to the reference one.
    moved = np.concatenate([_ELASTIC_TRIANGLE + jitters, np.ones((n, 3, 1))], axis=2)
    inverse = np.linalg.solve(moved, np.broadcast_to(_ELASTIC_TRIANGLE, (n, 3, 2)))  # (N, 3, 2)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    pixels = np.stack([cols, rows, np.ones_like(rows)], axis=-1)  # homogeneous (x, y, 1) per pixel
    source = pixels @ inverse[:, None]  # (N, H, W, 2): where each output pixel samples, as (x, y)
    image = _bilinear(x.astype(np.float32) / 255, source[..., 1], source[..., 0], mode="mirror")
    smooth = ndimage.gaussian_filter(fields, (0, 0, smoothness, smoothness), mode="reflect", truncate=3.0)
    dx, dy = (smooth * strength).astype(np.float32).transpose(1, 0, 2, 3)
    image = _bilinear(image, rows + dy, cols + dx, mode="reflect")
    return np.clip(image, 0, 1) * 255


def _pixelate(x: np.ndarray, rngs: Rngs, size: float) -> np.ndarray:
    out = np.empty_like(x)
    small = (int(size), int(size))
    for i, image in enumerate(x):
        shrunk = Image.fromarray(image).resize(small, Image.Resampling.BOX)
        out[i] = np.asarray(shrunk.resize((SIZE, SIZE), Image.Resampling.BOX))
    return out


def _jpeg_compression(x: np.ndarray, rngs: Rngs, quality: float) -> np.ndarray:
    out = np.empty_like(x)
    for i, image in enumerate(x):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


def _speckle_noise(x: np.ndarray, rngs: Rngs, sigma: float) -> np.ndarray:
    image = x / 255.0
    noise = np.stack([rng.normal(scale=sigma, size=x.shape[1:]) for rng in rngs])
    return np.clip(image + image * noise, 0, 1) * 255


def _gaussian_blur(x: np.ndarray, rngs: Rngs, sigma: float) -> np.ndarray:
    """skimage ``gaussian(multichannel=True)``: spatial axes only, edge pixels repeated, 4 sigma."""
    out = ndimage.gaussian_filter(x / 255.0, (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
    return np.clip(out, 0, 1) * 255


def _saturate(x: np.ndarray, rngs: Rngs, factor: float, offset: float) -> np.ndarray:
    """HSV saturation S -> clip(S * factor + offset, 0, 1) with hue and value kept, without an HSV round trip.

    With H and V fixed each channel is V - S * (V - c) / S_old; a gray pixel (S = 0) has hue 0 (red)
    in skimage's rgb2hsv, so it becomes (V, V(1-S'), V(1-S')).
    """
    image = x / 255.0
    value = image.max(axis=-1, keepdims=True)
    chroma = value - image.min(axis=-1, keepdims=True)
    sat = np.divide(chroma, value, out=np.zeros_like(value), where=value > 0)
    new_sat = np.clip(sat * factor + offset, 0, 1)
    ratio = np.divide(new_sat, sat, out=np.zeros_like(sat), where=sat > 0)
    colored = value - ratio * (value - image)
    red = np.concatenate([value, value * (1 - new_sat), value * (1 - new_sat)], axis=-1)
    return np.clip(np.where(sat > 0, colored, red), 0, 1) * 255


_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_corruption,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "spatter": _spatter,
    "saturate": _saturate,
}


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def _check_images(images: np.ndarray) -> tuple[np.ndarray, bool]:
    """The input as a (N,32,32,3) uint8 batch, and whether it was a single image."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {array.dtype}")
    if array.ndim not in (3, 4) or array.shape[-3:] != (SIZE, SIZE, 3):
        raise ValueError(
            f"images must be one {SIZE}x{SIZE}x3 image (HxWxC, RGB) or an Nx{SIZE}x{SIZE}x3 batch; "
            f"got shape {array.shape} (the CIFAR-10-C parameters are defined for 32x32 images)"
        )
    return (array[None], True) if array.ndim == 3 else (array, False)


def _check_args(name: str, severity: int, seed: Seed) -> tuple[int, ...]:
    """Validate a corruption request; return the seed as a tuple of ints."""
    if not isinstance(name, str) or name not in _FUNCTIONS:
        raise ValueError(
            f"unknown corruption {name!r}; valid names: {', '.join((*CORRUPTIONS, *VALIDATION_CORRUPTIONS))}"
        )
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int from 1 to 5, got {severity!r}")
    parts = (seed,) if isinstance(seed, int | np.integer) else seed
    if (
        not isinstance(parts, tuple | list)
        or not parts
        or any(isinstance(p, bool) or not isinstance(p, int | np.integer) or p < 0 for p in parts)
    ):
        raise ValueError(f"seed must be a non-negative int or a non-empty tuple of them, got {seed!r}")
    return tuple(int(p) for p in parts)


def _run(batch: np.ndarray, name: str, severity: int, rngs: Rngs) -> np.ndarray:
    """Apply one corruption to a chunk, clip to [0, 255] and truncate to uint8 like the original."""
    params = PARAMS[name] if name in PARAMS else VALIDATION_PARAMS[name]
    out = _FUNCTIONS[name](batch, rngs, *params[severity - 1])
    return np.clip(out, 0, 255).astype(np.uint8)


def _corrupt_batch(batch: np.ndarray, name: str, severity: int, key: tuple[int, ...], progress: bool) -> np.ndarray:
    """Corrupt a (N,32,32,3) batch chunk by chunk; image i always uses the stream ``[*key, i]``."""
    out = np.empty_like(batch)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(batch), unit="img", desc=f"{name} s{severity}")
    for start in range(0, len(batch), CHUNK):
        stop = min(start + CHUNK, len(batch))
        rngs = [np.random.default_rng([*key, i]) for i in range(start, stop)]
        out[start:stop] = _run(batch[start:stop], name, severity, rngs)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return out


def corrupt(images: np.ndarray, name: str, severity: int, seed: Seed = 0) -> np.ndarray:
    """Corrupt one uint8 32x32x3 image or an Nx32x32x3 batch; same shape and dtype back.

    Deterministic for a seed (an int or a tuple of ints): ``corrupt(batch, name, k, seed=s)[i]`` equals
    ``corrupt(batch[i], name, k, seed=(*s, i))``. Blurs, brightness, contrast, pixelate and JPEG
    draw nothing and ignore the seed.
    """
    batch, single = _check_images(images)
    key = _check_args(name, severity, seed)
    if single:
        return _run(batch, name, severity, [np.random.default_rng(list(key))])[0]
    return _corrupt_batch(batch, name, severity, key, progress=False)


def _cache_file(batch: np.ndarray, name: str, severity: int, key: tuple[int, ...]) -> str:
    """File name keyed by (name, severity, seed) and a hash of the generator version and the input."""
    digest = hashlib.sha256(f"v{GENERATOR_VERSION} {batch.shape}".encode())
    digest.update(np.ascontiguousarray(batch).data)
    seed = "-".join(map(str, key))
    return f"{name}-s{severity}-seed{seed}-{digest.hexdigest()[:16]}.npy"


def corrupt_dataset(
    x: np.ndarray,
    name: str,
    severity: int,
    seed: Seed = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """``corrupt`` over a whole (N,32,32,3) dataset, cached as .npy so benchmark reruns skip the work.

    The cache file is keyed by name, severity, seed and a hash of the input (and GENERATOR_VERSION);
    an unreadable or mismatched file is recomputed. ``progress`` shows a tqdm bar.
    """
    batch, single = _check_images(x)
    if single:
        raise ValueError(f"corrupt_dataset expects an Nx{SIZE}x{SIZE}x3 batch; use corrupt() for one image")
    key = _check_args(name, severity, seed)
    if cache_dir is None:
        return _corrupt_batch(batch, name, severity, key, progress)
    path = Path(cache_dir) / _cache_file(batch, name, severity, key)
    if path.is_file():
        try:
            cached = np.load(path)
        except (OSError, ValueError):
            cached = None  # truncated or foreign file: recompute and overwrite
        if cached is not None and cached.shape == batch.shape and cached.dtype == np.uint8:
            return cached
    out = _corrupt_batch(batch, name, severity, key, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy.tmp", delete=False) as handle:
        np.save(handle, out)
    os.replace(handle.name, path)  # atomic: a concurrent reader never sees half a file
    return out
