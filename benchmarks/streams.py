"""Orders of the images inside one corruption: shuffled, sorted by class, or Dirichlet blocks.

A camera does not send a shuffled dataset: it sees one kind of object for a while, then another.
Batch statistics and entropy minimisation on a batch of one or two classes break adapting methods,
so the benchmark must be able to replay such traffic. Every function here is pure: labels and a seed
in, a permutation (indices into the labels) out.

* ``shuffled``: the dataset's own order. The CIFAR-10 test set is stored shuffled, so this is the
  i.i.d. stream every earlier number in docs/benchmarks.md was measured on.
* ``correlated``: seeded shuffle, then a stable sort by label (the mariodoebler benchmark's CIFAR
  "correlated" setting): all of class 0, then all of class 1, ...; nearly every batch is one class.
* ``dirichlet``: NOTE's ``sort_by_dirichlet`` as described in docs (spec correlated.md section 1),
  K chunks whose class mix is drawn from Dir(alpha); small alpha gives long single-class runs, large
  alpha approaches a shuffled stream.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Order = Literal["shuffled", "correlated", "dirichlet"]
ORDERS: tuple[str, ...] = ("shuffled", "correlated", "dirichlet")
#: The reference redraws until every chunk holds at least this many images (NOTE, mariodoebler).
DIRICHLET_MIN_CHUNK = 10
#: The reference gives up after 120 s of redrawing; a fixed number of draws keeps it deterministic.
DIRICHLET_MAX_DRAWS = 1000


def correlated_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Seeded shuffle, then stable sort by label: class runs, each in a random order."""
    labels = np.asarray(labels)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return perm[np.argsort(labels[perm], kind="stable")]


def _dirichlet_chunks(
    labels: np.ndarray, classes: np.ndarray, alpha: float, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """One draw: for each chunk, the (class-contiguous) index groups it receives."""
    k = len(classes)
    quota = len(labels) / k
    chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
    sizes = np.zeros(k, dtype=np.int64)
    for cls in classes:
        members = rng.permutation(np.flatnonzero(labels == cls))
        q = rng.dirichlet(np.full(k, alpha))
        q[sizes >= quota] = 0.0  # a chunk that already holds its share takes no more
        if q.sum() <= 0:  # every open chunk drew ~0 (tiny alpha): spread over the open ones
            q = (sizes < quota).astype(float)
        q = q / q.sum()
        cuts = (np.cumsum(q) * len(members)).astype(np.int64)[:-1]
        for chunk, part in enumerate(np.split(members, cuts)):
            if len(part):
                chunks[chunk].append(part)
                sizes[chunk] += len(part)
    return chunks


def dirichlet_order(
    labels: np.ndarray, alpha: float, seed: int, min_chunk: int = DIRICHLET_MIN_CHUNK
) -> np.ndarray:
    """NOTE's temporally correlated order: K chunks (K classes), class mix of each drawn from Dir(alpha).

    Per class: shuffle its images, draw q ~ Dir(alpha * 1_K), zero q for chunks that already hold at
    least N/K images, renormalise, and split the class between the chunks by cumulative q. Redraw
    everything until every chunk holds at least ``min_chunk`` images (lowered to N/(2K) for tiny
    streams, where 10 per chunk would be the whole quota). Output chunk by chunk; inside a chunk its
    classes come in random order, each contiguous.
    """
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    needed = min(min_chunk, len(labels) // (2 * len(classes)))
    for _ in range(DIRICHLET_MAX_DRAWS):
        chunks = _dirichlet_chunks(labels, classes, alpha, rng)
        if min(sum(len(p) for p in parts) for parts in chunks) >= needed:
            break
    else:
        raise ValueError(
            f"no Dirichlet({alpha}) split of {len(labels)} images gave every chunk {needed} images "
            f"in {DIRICHLET_MAX_DRAWS} draws"
        )
    pieces = [parts[i] for parts in chunks for i in rng.permutation(len(parts))]
    return np.concatenate(pieces).astype(np.int64)


def stream_order(labels: np.ndarray, order: Order, seed: int, alpha: float | None = None) -> np.ndarray:
    """The permutation for ``order`` (``alpha`` only for ``dirichlet``)."""
    if order == "shuffled":
        return np.arange(len(labels))
    if order == "correlated":
        return correlated_order(labels, seed)
    if order == "dirichlet":
        if alpha is None:
            raise ValueError("the dirichlet order needs alpha")
        return dirichlet_order(labels, alpha, seed)
    raise ValueError(f"unknown stream order {order!r}; choose one of {list(ORDERS)}")


def class_runs(labels: np.ndarray) -> int:
    """Number of maximal runs of equal consecutive labels (10 for a 10-class sorted stream)."""
    labels = np.asarray(labels)
    return int(len(labels) > 0) + int(np.count_nonzero(labels[1:] != labels[:-1]))
