"""Image decoding for routed requests, and CLIP's preprocessing reproduced exactly.

CLIP must see what it saw in training: OpenAI's transform is Resize(shortest side, bicubic, on the
PIL image) -> CenterCrop -> RGB -> /255 -> Normalize(mean, std). The sizes and crop offsets below
follow torchvision's arithmetic (``int`` for the long side, ``round`` for the crop offsets), so the
result matches it to float precision. Squashing instead of cropping, BGR, or ImageNet statistics
would each move the inputs by whole units.

Routed requests keep the decoded image (not a fixed-size array as ``service.preprocess`` does)
because CLIP, a detector's letterbox and a classifier each need their own resize from the original.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from service.clip.manifest import ImageSpec
from service.errors import ImageTooLarge, InvalidInput
from service.preprocess import uint8_nhwc_to_tensor

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def open_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Encoded bytes -> an upright RGB image; the pixel limit is checked from the header first."""
    if not data:
        raise InvalidInput(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{what} is {width}x{height} pixels; the limit is {max_pixels} pixels")
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{what} is too large to decode: {exc}") from None
    except InvalidInput:
        raise
    except Exception as exc:  # Pillow raises many types on hostile bytes; all mean "not an image"
        raise InvalidInput(f"{what} cannot be decoded as an image ({type(exc).__name__}: {exc})") from None


def resize_shortest_side(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: the short side becomes ``size``, the long one scales (int)."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == img.size:
        return img
    return img.resize(new_size, _RESAMPLE[interpolation])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)``: round((dim - size) / 2) offsets, zero padding when smaller."""
    width, height = img.size
    if width < size or height < size:
        padded = Image.new("RGB", (max(width, size), max(height, size)))
        padded.paste(img, ((max(size - width, 0)) // 2, (max(size - height, 0)) // 2))
        img, (width, height) = padded, padded.size
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def clip_pixels(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """One RGB image -> float32 [3, crop, crop], normalised as the CLIP model expects."""
    img = center_crop(resize_shortest_side(img.convert("RGB"), spec.resize, spec.interpolation), spec.crop)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def clip_batch(images: list[Image.Image], spec: ImageSpec) -> np.ndarray:
    """Images of any sizes -> one float32 [N, 3, crop, crop] batch for the image tower."""
    return np.stack([clip_pixels(img, spec) for img in images])


def classifier_tensor(images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """Images -> the engine's float NCHW in [0, 1] at ``size`` (height, width), resized as ``decode_image`` does."""
    arrays = []
    for img in images:
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.uint8))
    return uint8_nhwc_to_tensor(np.stack(arrays))
