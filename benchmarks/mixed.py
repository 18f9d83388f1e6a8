"""The ``mixed`` protocol: clean traffic, every corruption rising and falling in severity, clean again.

A server mostly sees clean or mildly shifted images and only sometimes a severe shift, and a
calibration claim must hold on all of them. The stream, never reset::

    clean:start,
    for each corruption (spec order): severity 1, 2, 3, 4, 5, 4, 3, 2, 1,
    clean:end

Every segment holds ``segment_size`` images (``--limit``, default 1,000). Both clean segments are the
same images (the first ``segment_size`` of the test set), so their difference is what adaptation did
to the model. Corrupted segment ``k`` (counted from 1 over the whole stream) takes the test images
``k * segment_size ...`` onwards, wrapping around the set, so the nine segments of one corruption are
different images while 9 x ``segment_size`` <= 10,000; it is corrupted with the seed ``(seed, k)``.
``--order`` / ``--dirichlet`` reorder the images inside each segment, as they do inside a corruption.

Results are grouped by segment kind: ``clean``, ``sev 1-3`` and ``sev 4-5``; each kind's error and
ECE are computed over all its images pooled (not averaged over segments).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The severity profile of one corruption: rising, then falling.
PROFILE: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)
#: Images per segment when ``--limit`` is not given.
DEFAULT_SEGMENT_SIZE = 1000
KINDS: tuple[str, ...] = ("clean", "sev 1-3", "sev 4-5")


@dataclass(frozen=True)
class Segment:
    """One stretch of the stream: ``severity`` 0 is clean."""

    label: str
    corruption: str | None
    severity: int
    index: int  # position among the corrupted segments, from 1 (0 for clean): picks images and seed

    @property
    def kind(self) -> str:
        return kind_of(self.severity)


def kind_of(severity: int) -> str:
    """The reporting group of a severity (0 = clean)."""
    if severity == 0:
        return "clean"
    return "sev 1-3" if severity <= 3 else "sev 4-5"


def schedule(corruptions: Sequence[str], profile: Sequence[int] = PROFILE) -> list[Segment]:
    """The segments in stream order; labels are unique (``gaussian_noise:2:up``, ``...:5``, ``...:2:down``)."""
    peak = max(profile)
    top = profile.index(peak)
    segments = [Segment("clean:start", None, 0, 0)]
    for name in corruptions:
        for position, severity in enumerate(profile):
            phase = "" if severity == peak else (":up" if position < top else ":down")
            segments.append(Segment(f"{name}:{severity}{phase}", name, severity, len(segments)))
    segments.append(Segment("clean:end", None, 0, 0))
    return segments


def segment_images(segment: Segment, size: int, total: int) -> np.ndarray:
    """Indices into the clean test set of a segment's images (see the module docstring)."""
    start = segment.index * size
    return (start + np.arange(size)) % total


def load_segments(
    segments: Sequence[Segment],
    clean: tuple[np.ndarray, np.ndarray],
    size: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | Path,
    progress: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every segment's (images, labels), corrupted on the fly and cached like the other protocols."""
    from adapters.corruptions import corrupt_dataset

    x, y = clean
    if size > len(x):
        raise ValueError(f"a segment of {size} images needs at least that many clean images; the set has {len(x)}")
    streams = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(segments), unit="segment", desc="corrupting segments")
    for segment in segments:
        index = segment_images(segment, size, len(x))
        images, labels = x[index], y[index]
        if segment.corruption is not None:
            images = corrupt_dataset(
                images, segment.corruption, segment.severity, seed=(seed, segment.index), cache_dir=cache_dir
            )
        streams[segment.label] = (images, labels)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return streams
