"""CIFAR-10-C's validation corruption ``spatter``, with numpy/scipy stand-ins for its OpenCV steps.

The published generator draws a "liquid layer" (Gaussian noise, blurred, thresholded). At severities
1-3 it paints water: the layer's Canny edges, a 5x5 chamfer distance to them truncated at 20 pixels,
a 3x3 box blur, histogram equalisation, an embossing 3x3 filter and another box blur shape the drops;
the drops, normalised to their peak and scaled, add pale turquoise (175, 238, 238). At severities 4-5
it paints mud: the thresholded layer, blurred, kept where it is at least 0.8, replaces the image by
brown (63, 42, 20). Each OpenCV call is re-implemented here as OpenCV documents it (Canny with a 3x3
Sobel, L1 gradient magnitude and 8-connected hysteresis; ``DIST_L2`` with the 5x5 mask 1 / 1.4 /
2.1969; ``equalizeHist``; ``filter2D`` and ``blur`` with the reflect-101 border), so the project needs
no OpenCV. Two deliberate guards: the 8-bit liquid layer is clipped (the original wraps values above
1.0, a >4-sigma event) and a layer with no drop at all leaves the image unchanged (the original
divides by zero).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SIZE = 32
WATER = np.array([175, 238, 238]) / 255.0  # pale turquoise, RGB
MUD = np.array([63, 42, 20]) / 255.0  # brown, RGB
CANNY_LOW, CANNY_HIGH = 50, 150
DISTANCE_CAP = 20.0  # cv2.threshold(dist, 20, 20, THRESH_TRUNC)
CHAMFER = (1.0, 1.4, 2.1969)  # OpenCV's DIST_L2 5x5 mask: axial, diagonal, knight's move
EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
# cv2 Canny's fixed-point tangents: tan(22.5 deg) in Q15.
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)
_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = True  # 8-connectivity inside an image, none across the batch axis


def canny(images: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """cv2.Canny(aperture 3, L1 gradient) on a uint8 batch (N,H,W): True on edge pixels.

    Sobel with replicated borders; a pixel survives non-maximum suppression if its magnitude beats
    the two neighbours across its gradient direction (horizontal, vertical or one diagonal, sectors
    split at 22.5 and 67.5 degrees with OpenCV's tie rules); edges are the survivors above ``low``
    8-connected to one above ``high``.
    """
    img = images.astype(np.int64)
    dx = ndimage.correlate1d(ndimage.correlate1d(img, [-1, 0, 1], axis=2, mode="nearest"), [1, 2, 1], axis=1,
                             mode="nearest")
    dy = ndimage.correlate1d(ndimage.correlate1d(img, [-1, 0, 1], axis=1, mode="nearest"), [1, 2, 1], axis=2,
                             mode="nearest")
    mag = np.abs(dx) + np.abs(dy)
    pad = np.pad(mag, ((0, 0), (1, 1), (1, 1)))  # outside the image the magnitude is 0
    mid = slice(1, -1)
    left, right = pad[:, mid, :-2], pad[:, mid, 2:]
    up, down = pad[:, :-2, mid], pad[:, 2:, mid]
    same_sign = (dx ^ dy) >= 0
    diag_a = np.where(same_sign, pad[:, :-2, :-2], pad[:, :-2, 2:])  # previous row, column -s
    diag_b = np.where(same_sign, pad[:, 2:, 2:], pad[:, 2:, :-2])  # next row, column +s
    xs, ys = np.abs(dx), np.abs(dy) << _CANNY_SHIFT
    tg22x = xs * _TG22
    horizontal = ys < tg22x
    vertical = ~horizontal & (ys > tg22x + (xs << (_CANNY_SHIFT + 1)))
    diagonal = ~horizontal & ~vertical
    peak = (
        (horizontal & (mag > left) & (mag >= right))
        | (vertical & (mag > up) & (mag >= down))
        | (diagonal & (mag > diag_a) & (mag > diag_b))
    )
    candidate = peak & (mag > low)
    labels, count = ndimage.label(candidate, structure=_PLANE)
    keep = np.zeros(count + 1, dtype=bool)
    keep[labels[candidate & (mag > high)]] = True
    keep[0] = False
    return keep[labels]


def chamfer_distance(edges: np.ndarray) -> np.ndarray:
    """cv2.distanceTransform(DIST_L2, 5) of "not an edge": 5x5 chamfer distance to the nearest edge pixel.

    Two raster passes (OpenCV's algorithm); inside a row the left (right) neighbour is a running
    minimum, so each row is one vectorised step over the whole batch. No edge: infinite.
    """
    a, b, c = CHAMFER
    _, h, w = edges.shape
    d = np.where(edges, 0.0, np.inf)
    ramp = a * np.arange(w)
    for rows, step in ((range(h), 1), (range(h - 1, -1, -1), -1)):
        for r in rows:
            cand = [d[:, r]]
            for dr, weights in ((1, ((0, a), (1, b), (-1, b), (2, c), (-2, c))), (2, ((1, c), (-1, c)))):
                src = r - step * dr
                if not 0 <= src < h:
                    continue
                prev = d[:, src]
                for dc, weight in weights:
                    shifted = np.full_like(prev, np.inf)
                    if dc > 0:
                        shifted[:, dc:] = prev[:, :-dc]
                    elif dc < 0:
                        shifted[:, :dc] = prev[:, -dc:]
                    else:
                        shifted = prev
                    cand.append(shifted + weight)
            row = np.min(cand, axis=0)
            if step == 1:  # left neighbour: d[j] = min_k<=j (d[k] + a (j - k))
                row = np.minimum.accumulate(row - ramp, axis=1) + ramp
            else:  # right neighbour, scanning right to left
                flipped = row[:, ::-1]
                row = (np.minimum.accumulate(flipped - ramp, axis=1) + ramp)[:, ::-1]
            d[:, r] = row
    return d


def equalize_hist(images: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist per uint8 image of a batch (N,H,W).

    The lowest occupied level maps to 0, level j to round(255 * (count <= j minus count at the lowest)
    / (pixels minus count at the lowest)); a one-level image stays as it is.
    """
    n = len(images)
    hist = np.zeros((n, 256), dtype=np.int64)
    np.add.at(hist, (np.arange(n)[:, None], images.reshape(n, -1)), 1)
    total = images[0].size
    lowest = np.argmax(hist > 0, axis=1)
    low_count = hist[np.arange(n), lowest]
    cumulative = np.cumsum(hist, axis=1) - low_count[:, None]
    flat = low_count == total
    scale = 255.0 / np.where(flat, 1, total - low_count)
    lut = np.clip(np.rint(cumulative * scale[:, None]), 0, 255).astype(np.uint8)
    lut[np.arange(256)[None, :] < lowest[:, None]] = 0
    out = np.take_along_axis(lut, images.reshape(n, -1).astype(np.intp), axis=1).reshape(images.shape)
    return np.where(flat[:, None, None], images, out)


def _box3(images: np.ndarray) -> np.ndarray:
    """cv2.blur(3x3): mean of each 3x3 neighbourhood, reflect-101 border."""
    return ndimage.uniform_filter(images.astype(np.float64), size=(1, 3, 3), mode="mirror")


def _water(x: np.ndarray, layer: np.ndarray, strength: float) -> np.ndarray:
    """Turquoise drops whose shape comes from the distance to the liquid layer's edges."""
    layer8 = np.clip(layer * 255, 0, 255).astype(np.uint8)
    dist = np.minimum(chamfer_distance(canny(layer8)), DISTANCE_CAP)
    dist = _box3(dist).astype(np.uint8)
    dist = equalize_hist(dist)
    dist = ndimage.correlate(dist.astype(np.int64), EMBOSS[None], mode="mirror")
    dist = np.clip(dist, 0, 255).astype(np.uint8)
    dist = np.rint(_box3(dist))  # cv2.blur on uint8 rounds back to 8 bit
    mask = layer8 * dist
    peak = mask.max(axis=(1, 2), keepdims=True)
    mask = np.divide(mask, peak, out=np.zeros_like(mask), where=peak > 0) * strength
    return np.clip(x + mask[..., None] * WATER, 0, 1)


def _mud(x: np.ndarray, layer: np.ndarray, threshold: float, sigma: float) -> np.ndarray:
    """Opaque brown where the blurred, thresholded liquid layer is at least 0.8."""
    mask = ndimage.gaussian_filter((layer > threshold).astype(np.float64), (0, sigma, sigma), mode="nearest",
                                   truncate=4.0)
    mask[mask < 0.8] = 0
    mask = mask[..., None]
    return np.clip(x * (1 - mask) + MUD * mask, 0, 1)


def spatter(
    x: np.ndarray,
    rngs: list[np.random.Generator],
    mean: float,
    std: float,
    sigma: float,
    threshold: float,
    strength: float,
    mud: float,
) -> np.ndarray:
    """The published spatter on a uint8 batch (N,32,32,3), one liquid layer drawn per image; 0..255 back."""
    layer = np.stack([rng.normal(loc=mean, scale=std, size=(SIZE, SIZE)) for rng in rngs])
    layer = ndimage.gaussian_filter(layer, (0, sigma, sigma), mode="nearest", truncate=4.0)  # skimage gaussian
    layer[layer < threshold] = 0
    image = x / 255.0
    out = _mud(image, layer, threshold, strength) if mud else _water(image, layer, strength)
    return out * 255
