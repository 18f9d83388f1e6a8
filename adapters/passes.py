"""Marking a model's forward passes that are the adapter's own work, not an answer to the inputs.

EATA-C runs sub-network passes next to the full one, and ``backward='selected'`` re-forwards the
selected samples with gradient. Those passes see the same weights but not the served traffic's
statistics (a sub-network skips blocks; a re-forward sees a filtered subset), so anything that
learns from served passes (:class:`adapters.recent_statistics.RecentBatchStatistics`) must be able
to tell them apart. The mark lives on the model, so the adapter and the observer need not know each
other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_ATTRIBUTE = "_tta_auxiliary_passes"


@contextmanager
def auxiliary_pass(model: nn.Module) -> Iterator[None]:
    """Inside, ``model``'s forward passes are the adapter's own (nesting allowed)."""
    model.__dict__[_ATTRIBUTE] = model.__dict__.get(_ATTRIBUTE, 0) + 1
    try:
        yield
    finally:
        model.__dict__[_ATTRIBUTE] -= 1


def is_auxiliary_pass(model: nn.Module) -> bool:
    """Whether a pass of ``model`` starting now runs inside :func:`auxiliary_pass`."""
    return model.__dict__.get(_ATTRIBUTE, 0) > 0
