"""The regenerated CIFAR-10-C: determinism, shapes, the batch rule, input checks and model-level fidelity."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from adapters import corruptions
from adapters.corruptions import CORRUPTIONS, corrupt, corrupt_dataset
from adapters.models import build_cifar_resnet
from benchmarks.check_corruptions import REFERENCE_ERROR, error_rate

# Corruptions that draw nothing: the seed cannot change them.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}


@pytest.fixture(scope="module")
def images(cifar10: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return cifar10[0][:8]


def test_names_follow_the_spec_order() -> None:
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
        "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
        "jpeg_compression",
    )  # fmt: skip
    assert set(corruptions.PARAMS) == set(CORRUPTIONS)
    assert all(len(levels) == 5 for levels in corruptions.PARAMS.values())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_and_seeds(images: np.ndarray, name: str) -> None:
    single = corrupt(images[0], name, 3, seed=1)
    assert single.shape == (32, 32, 3) and single.dtype == np.uint8
    batch = corrupt(images, name, 3, seed=1)
    assert batch.shape == images.shape and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch, corrupt(images, name, 3, seed=1))
    other = corrupt(images, name, 3, seed=2)
    if name in DETERMINISTIC:
        np.testing.assert_array_equal(batch, other)
    else:
        assert not np.array_equal(batch, other)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_batch_equals_image_by_image(images: np.ndarray, name: str) -> None:
    batch = corrupt(images[:4], name, 5, seed=7)
    one_by_one = np.stack([corrupt(image, name, 5, seed=(7, i)) for i, image in enumerate(images[:4])])
    np.testing.assert_array_equal(batch, one_by_one)
    # a tuple seed extends the same way, and chunking never changes an image
    nested = corrupt(images[:2], name, 5, seed=(7, 3))
    np.testing.assert_array_equal(nested[1], corrupt(images[1], name, 5, seed=(7, 3, 1)))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_damage_grows_with_severity(cifar10: tuple[np.ndarray, np.ndarray], name: str) -> None:
    x = cifar10[0][:64]
    mild, harsh = (np.abs(corrupt(x, name, k).astype(float) - x).mean() for k in (1, 5))
    if name == "elastic_transform":
        # The published table trades the affine jitter (2.56 px at severity 1, 0.96 px at 5) for a
        # stronger local warp, so the pixel distance shrinks while the model's error grows.
        assert harsh < mild
    else:
        assert harsh > 1.2 * mild > 0, (mild, harsh)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "gaussian"}, "unknown corruption 'gaussian'; valid names: gaussian_noise, shot_noise"),
        ({"severity": 0}, "severity must be an int from 1 to 5"),
        ({"severity": 6}, "severity must be an int from 1 to 5"),
        ({"severity": 2.0}, "severity must be an int from 1 to 5"),
        ({"severity": True}, "severity must be an int from 1 to 5"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"seed": 1.5}, "seed must be a non-negative int"),
        ({"seed": ()}, "seed must be a non-negative int"),
    ],
)
def test_invalid_arguments_raise(images: np.ndarray, kwargs: dict, message: str) -> None:
    args = {"images": images, "name": "gaussian_noise", "severity": 3, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        corrupt(**args)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((32, 32, 3), np.float32), "must be uint8"),
        (np.zeros((32, 32), np.uint8), "got shape \\(32, 32\\)"),
        (np.zeros((32, 32, 4), np.uint8), "got shape"),
        (np.zeros((2, 16, 16, 3), np.uint8), "got shape"),
        (np.zeros((1, 2, 32, 32, 3), np.uint8), "got shape"),
    ],
)
def test_invalid_images_raise(array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corrupt(array, "contrast", 1)


def test_glass_shuffle_is_the_published_loop() -> None:
    """The single gather equals the published per-pixel loop, numpy-view 'swap' included."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    shifts = rng.integers(-1, 1, size=(2, 30, 30))
    expected = image.copy()
    for h in range(31, 1, -1):
        for w in range(31, 1, -1):
            dy, dx = shifts[0, h - 2, w - 2], shifts[1, h - 2, w - 2]
            expected[h, w], expected[h + dy, w + dx] = expected[h + dy, w + dx], expected[h, w]
    np.testing.assert_array_equal(corruptions._glass_shuffle(image[None], shifts[None])[0], expected)


def test_zoom_operator_is_clipped_zoom() -> None:
    rng = np.random.default_rng(0)
    layer = rng.random((32, 32))
    for zoom in (1.0, 1.06, 1.25, 1.75, 2.25):
        crop = math.ceil(32 / zoom)
        top = (32 - crop) // 2
        zoomed = ndimage.zoom(layer[top : top + crop, top : top + crop], zoom, order=1)
        trim = (zoomed.shape[0] - 32) // 2
        z = corruptions._zoom_operator(zoom)
        np.testing.assert_allclose(z @ layer @ z.T, zoomed[trim : trim + 32, trim : trim + 32], atol=1e-12)


def test_motion_blur_matches_a_literal_imagemagick_loop() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1, 12, 10, 1))
    angle, radius, sigma = 30.0, 6, 2.0
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    expected = np.zeros_like(image)
    for y in range(12):
        for x in range(10):
            for i in range(width):
                u = min(max(x + math.ceil(i * math.cos(math.radians(angle)) - 0.5), 0), 9)
                v = min(max(y + math.ceil(i * math.sin(math.radians(angle)) - 0.5), 0), 11)
                expected[0, y, x, 0] += weights[i] * image[0, v, u, 0]
    np.testing.assert_allclose(corruptions._motion_blur(image, radius, sigma, np.array([angle])), expected)


def test_brightness_matches_an_hsv_round_trip(images: np.ndarray) -> None:
    out = corrupt(images[:2], "brightness", 5).astype(int)
    for n, row, col in [(0, 0, 0), (0, 5, 17), (1, 31, 31), (1, 12, 3)]:
        h, s, v = colorsys.rgb_to_hsv(*(images[n, row, col] / 255.0))
        expected = np.array(colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0))) * 255
        assert np.abs(out[n, row, col] - np.floor(expected + 1e-9)).max() <= 1
    black = corrupt(np.zeros((32, 32, 3), np.uint8), "brightness", 5)
    assert (black == int(0.3 * 255)).all()


def test_frost_textures_are_read_once(images: np.ndarray) -> None:
    corrupt(images, "frost", 5)
    before = corruptions.frost_textures.cache_info()
    corrupt(images, "frost", 4)
    after = corruptions.frost_textures.cache_info()
    assert after.misses == before.misses and after.hits > before.hits


def test_shipped_frost_textures_are_the_published_ones_shrunk(shared: Path) -> None:
    """The package's textures equal the published originals (shared/data/frost) shrunk as cv2 does."""
    originals = shared / "data" / "frost"
    names = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
    for shipped, name in zip(corruptions.frost_textures(), names, strict=True):
        with Image.open(originals / name) as image:
            np.testing.assert_array_equal(shipped, corruptions.shrink_frost_texture(image))
    assert [t.shape[:2] for t in corruptions.frost_textures()] == [
        (120, 180), (63, 112), (63, 112), (70, 105), (99, 132),
    ]  # fmt: skip


def test_altered_frost_texture_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A texture whose bytes differ from SHA256SUMS names itself instead of corrupting silently."""
    from importlib import resources

    shipped = resources.files("adapters.corruptions") / "frost"
    copy = tmp_path / "adapters" / "corruptions" / "frost"
    copy.mkdir(parents=True)
    for name in (*corruptions.FROST_FILES, "SHA256SUMS"):
        (copy / name).write_bytes((shipped / name).read_bytes())
    (copy / "frost4.png").write_bytes((copy / "frost4.png").read_bytes() + b"tampered")
    monkeypatch.setattr(resources, "files", lambda package: copy.parent)
    corruptions.frost_textures.cache_clear()
    try:
        with pytest.raises(corruptions.AssetError, match=r"frost4\.png does not match its SHA-256"):
            corruptions.frost_textures()
    finally:
        monkeypatch.undo()
        corruptions.frost_textures.cache_clear()


def test_corrupt_dataset_caches(images: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = corrupt_dataset(images, "fog", 4, seed=3, cache_dir=tmp_path, progress=True)
    np.testing.assert_array_equal(first, corrupt(images, "fog", 4, seed=3))
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].name.startswith("fog-s4-seed3-")

    def fail(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("recomputed despite a cached result")

    monkeypatch.setattr(corruptions, "_corrupt_batch", fail)
    np.testing.assert_array_equal(corrupt_dataset(images, "fog", 4, seed=3, cache_dir=tmp_path), first)
    with pytest.raises(AssertionError):  # another input is another key
        corrupt_dataset(images[:4], "fog", 4, seed=3, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="expects an Nx32x32x3 batch"):
        corrupt_dataset(images[0], "fog", 4)


@pytest.fixture(scope="module")
def resnet20(resnet20_weights: Path) -> torch.nn.Module:
    return build_cifar_resnet("resnet20", resnet20_weights).eval()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_frozen_resnet20_accuracy_near_reference(
    cifar10: tuple[np.ndarray, np.ndarray], resnet20: torch.nn.Module, name: str
) -> None:
    """At severity 5 a frozen ResNet-20 must land near the published CIFAR-10-C error (500 images)."""
    x, y = cifar10[0][:500], cifar10[1][:500]
    error = error_rate(resnet20, corrupt(x, name, 5, seed=0), y)
    assert abs(error - REFERENCE_ERROR[name]) <= 10.0, f"{name}: {error:.1f} % vs {REFERENCE_ERROR[name]} %"


# --------------------------------------------------------------------------- validation corruptions
def test_validation_corruptions_stay_out_of_the_reported_stream(images: np.ndarray) -> None:
    """Defaults are chosen on these; the 15 reported corruptions never include them."""
    assert not set(corruptions.VALIDATION_CORRUPTIONS) & set(CORRUPTIONS)
    for name in corruptions.VALIDATION_CORRUPTIONS:
        batch = corrupt(images, name, 5, seed=1)
        assert batch.shape == images.shape and batch.dtype == np.uint8 and not np.array_equal(batch, images)
        np.testing.assert_array_equal(batch[1], corrupt(images[1], name, 5, seed=(1, 1)))
    assert not np.array_equal(corrupt(images, "speckle_noise", 5, seed=1), corrupt(images, "speckle_noise", 5, seed=2))


def test_saturate_matches_an_hsv_round_trip(images: np.ndarray) -> None:
    """The published saturate: RGB -> HSV, S = clip(S * 2.5 + 0.2, 0, 1), back (severity 5); gray included."""
    x = images[:2].copy()
    x[0, :4, :4] = 128  # gray pixels: hue 0, so they turn red
    expected = np.empty(x.shape)
    for index in np.ndindex(x.shape[:3]):
        h, s, v = colorsys.rgb_to_hsv(*(x[index] / 255.0))
        expected[index] = colorsys.hsv_to_rgb(h, min(max(s * 2.5 + 0.2, 0), 1), v)
    expected = (np.clip(expected, 0, 1) * 255).astype(np.uint8)
    assert np.abs(corrupt(x, "saturate", 5).astype(int) - expected).max() <= 1


def test_gaussian_blur_is_the_published_filter(images: np.ndarray) -> None:
    expected = ndimage.gaussian_filter(images / 255.0, (0, 1.0, 1.0, 0), mode="nearest", truncate=4.0)
    np.testing.assert_array_equal(corrupt(images, "gaussian_blur", 5), (np.clip(expected, 0, 1) * 255).astype(np.uint8))


# --------------------------------------------------------------------------- spatter (validation)
def test_spatter_shape_dtype_and_seeds(images: np.ndarray) -> None:
    for severity in corruptions.SEVERITIES:
        batch = corrupt(images, "spatter", severity, seed=1)
        assert batch.shape == images.shape and batch.dtype == np.uint8
        np.testing.assert_array_equal(batch, corrupt(images, "spatter", severity, seed=1))
        assert not np.array_equal(batch, corrupt(images, "spatter", severity, seed=2))
        np.testing.assert_array_equal(batch[3], corrupt(images[3], "spatter", severity, seed=(1, 3)))


def test_spatter_damage_grows_with_severity(cifar10: tuple[np.ndarray, np.ndarray]) -> None:
    """Water (1-3) covers more of the image at each step; mud (4-5) likewise; mud is brown and opaque."""
    x = cifar10[0][:200]
    changed = []
    for severity in corruptions.SEVERITIES:
        out = corrupt(x, "spatter", severity, seed=0)
        changed.append(float((out != x).any(axis=-1).mean()))
        if severity <= 3:  # water only ever adds turquoise: no channel gets darker
            assert (out.astype(int) >= x.astype(int)).all()
    assert 0 < changed[0] < changed[1] < changed[2]
    assert 0 < changed[3] < changed[4]
    mud = corrupt(x, "spatter", 5, seed=0)
    painted = (mud != x).any(axis=-1)
    assert (np.abs(mud[painted].astype(int) - [63, 42, 20]).max(axis=-1) <= 40).mean() > 0.5


def test_spatter_opencv_stand_ins() -> None:
    """The chamfer distance uses OpenCV's 5x5 L2 weights; Canny finds a step edge and nothing in flat images."""
    from adapters.corruptions.spatter import canny, chamfer_distance, equalize_hist

    edges = np.zeros((1, 7, 7), dtype=bool)
    edges[0, 3, 3] = True
    d = chamfer_distance(edges)[0]
    assert (d[3, 3], d[3, 4], d[4, 4], d[4, 5], d[3, 5]) == pytest.approx((0, 1, 1.4, 2.1969, 2))
    assert np.isinf(chamfer_distance(np.zeros((1, 4, 4), dtype=bool))).all()
    step = np.zeros((2, 16, 16), dtype=np.uint8)
    step[0, :, 8:] = 200
    found = canny(step)
    assert found[0].any() and not found[1].any()
    assert set(np.flatnonzero(found[0].any(axis=0))) <= {7, 8}  # one thin line at the step
    flat = np.full((1, 4, 4), 9, dtype=np.uint8)
    np.testing.assert_array_equal(equalize_hist(flat), flat)
    ramp = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    assert equalize_hist(ramp).min() == 0 and equalize_hist(ramp).max() == 255
