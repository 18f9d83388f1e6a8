"""Named snapshots of an adapter's state (save, list, restore), behind a small store interface.

The in-process store is the default; a Redis-backed store can replace it so a restarted replica
resumes its adapted state.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class SnapshotInfo:
    name: str
    created: float
    parameter_version: int
    steps: int


class SnapshotStore(Protocol):
    def save(self, model: str, name: str, state: dict[str, Any]) -> SnapshotInfo: ...

    def load(self, model: str, name: str) -> dict[str, Any]:
        """The saved state; raises KeyError when there is no such snapshot."""

    def list(self, model: str) -> list[SnapshotInfo]: ...


class InMemorySnapshotStore:
    """Snapshots held in this process (lost on restart)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], tuple[SnapshotInfo, dict[str, Any]]] = {}

    def save(self, model: str, name: str, state: dict[str, Any]) -> SnapshotInfo:
        stats = state.get("stats", {})
        info = SnapshotInfo(name, time.time(), int(stats.get("parameter_version", 0)), int(stats.get("steps", 0)))
        self._items[(model, name)] = (info, copy.deepcopy(state))
        return info

    def load(self, model: str, name: str) -> dict[str, Any]:
        if (model, name) not in self._items:
            raise KeyError(name)
        return copy.deepcopy(self._items[(model, name)][1])

    def list(self, model: str) -> list[SnapshotInfo]:
        return sorted((info for (m, _), (info, _) in self._items.items() if m == model), key=lambda i: i.created)
