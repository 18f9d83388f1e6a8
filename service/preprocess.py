"""Turn what clients send (image files, base64, raw v2 tensors) into the engine's input.

The engine takes float NCHW tensors in [0, 1] at the model's input size; everything here ends there.
Image decoding guards against decompression bombs by checking the header's pixel count before any
pixel is decoded. Raw tensors are converted with whole-array numpy operations (no per-element
Python), since the binary v2 path exists to be cheap.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from service.errors import ImageTooLarge, InvalidInput

FP32 = "FP32"
UINT8 = "UINT8"
BYTES = "BYTES"  # encoded image files (PNG, JPEG, ...), one per element, decoded like /v1 uploads
SUPPORTED_DATATYPES = (FP32, UINT8)
_NUMPY_DTYPES = {FP32: np.dtype("<f4"), UINT8: np.dtype("u1")}


# ---------------------------------------------------------------------------------------- images
def decode_image(data: bytes, size: tuple[int, int], max_pixels: int, what: str = "image") -> np.ndarray:
    """One encoded image (PNG, JPEG, anything Pillow reads) -> uint8 HxWx3 RGB at ``size`` (height, width).

    EXIF orientation is applied, so a phone photo is seen upright. ``what`` names the image in errors.
    """
    if not data:
        raise InvalidInput(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{what} is {width}x{height} pixels; the limit is {max_pixels} pixels")
        if img.format == "JPEG":  # decode a downscaled JPEG directly when it is much larger (either orientation)
            img.draft("RGB", (max(size), max(size)))
        img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{what} is too large to decode: {exc}") from None
    except InvalidInput:
        raise
    except Exception as exc:  # Pillow's plugins raise many types on hostile bytes; all mean "not an image"
        raise InvalidInput(f"{what} cannot be decoded as an image ({type(exc).__name__}: {exc})") from None


def images_to_tensor(blobs: list[bytes], size: tuple[int, int], max_pixels: int, names: list[str]) -> torch.Tensor:
    """Decode a request's images into one float NCHW batch in [0, 1]."""
    if not blobs:
        raise InvalidInput("no images in the request")
    pixels = np.stack([decode_image(b, size, max_pixels, n) for b, n in zip(blobs, names, strict=True)])
    return uint8_nhwc_to_tensor(pixels)


def check_count(count: int, limit: int) -> None:
    """A request holds at least one image and at most ``limit``."""
    if count == 0:
        raise InvalidInput("no images in the request")
    if count > limit:
        raise InvalidInput(f"{count} images in one request; the limit is {limit}")


def decode_base64(text: str, what: str = "image") -> bytes:
    """Standard base64 (a ``data:image/...;base64,`` prefix is allowed) -> bytes."""
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise InvalidInput(f"{what}: a data URL needs a ',' before its base64 payload")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{what} is not valid base64 ({exc})") from None


# ---------------------------------------------------------------------------------------- v2 tensors
def bytes_elements(raw: bytes | memoryview) -> list[bytes]:
    """Triton's binary BYTES tensor: each element a 4-byte little-endian length, then that many bytes."""
    view, out, offset = memoryview(raw), [], 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput(f"BYTES tensor: {len(view) - offset} trailing bytes cannot hold an element's length")
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"BYTES tensor: an element declares {length} bytes but {len(view) - offset} remain")
        out.append(bytes(view[offset : offset + length]))
        offset += length
    return out


def bytes_tensor(elements: list[bytes]) -> bytes:
    """The inverse of :func:`bytes_elements`: Triton's binary encoding of a BYTES tensor."""
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def expected_shape(datatype: str, input_shape: tuple[int, int, int]) -> list[int]:
    """The v2 tensor layout for a datatype: FP32 is NCHW, UINT8 is NHWC (-1 is the batch)."""
    c, h, w = input_shape
    return [-1, c, h, w] if datatype == FP32 else [-1, h, w, c]


def check_tensor_header(datatype: str, shape: list[int], input_shape: tuple[int, int, int]) -> int:
    """Validate a v2 input's datatype and shape against the model; returns the element count."""
    if datatype not in SUPPORTED_DATATYPES:
        raise InvalidInput(f"datatype {datatype!r} is not supported; use FP32 (NCHW) or UINT8 (NHWC)")
    want = expected_shape(datatype, input_shape)
    if len(shape) != 4 or list(shape[1:]) != want[1:] or shape[0] < 1:
        layout = "NCHW" if datatype == FP32 else "NHWC"
        raise InvalidInput(f"{datatype} input must have shape {want} ({layout}, N >= 1), got {list(shape)}")
    return int(np.prod(shape))


def array_from_bytes(raw: bytes | memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """A little-endian raw tensor -> numpy array of ``shape`` (zero copy; read-only)."""
    dtype = _NUMPY_DTYPES[datatype]
    count = int(np.prod(shape))
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"binary data is {len(raw)} bytes but shape {list(shape)} of {datatype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def array_from_json(data: list, datatype: str, shape: list[int]) -> np.ndarray:
    """A v2 JSON ``data`` list (flat or nested, row-major) -> numpy array of ``shape``."""
    try:
        values = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"data must be a list of numbers ({exc})") from None
    count = int(np.prod(shape))
    if values.size != count:
        raise InvalidInput(f"data has {values.size} values but shape {list(shape)} needs {count}")
    if datatype == UINT8:
        if not (np.all(values >= 0) and np.all(values <= 255) and np.all(values == np.floor(values))):
            raise InvalidInput("UINT8 data must be integers in 0..255")
        return values.astype(np.uint8).reshape(shape)
    return values.astype(np.float32).reshape(shape)


def uint8_nhwc_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 NxHxWx3 -> float NCHW in [0, 1]."""
    return torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2).contiguous().div_(255.0)


def array_to_tensor(values: np.ndarray, datatype: str) -> torch.Tensor:
    """A validated v2 tensor -> the engine's float NCHW in [0, 1] (UINT8 / 255; FP32 taken as is).

    FP32 is copied once (native byte order, writable) so the request body is not kept alive by
    tensors the engine retains as BatchNorm context.
    """
    if datatype == UINT8:
        return uint8_nhwc_to_tensor(values)
    return torch.from_numpy(values.astype(np.float32, copy=True))
