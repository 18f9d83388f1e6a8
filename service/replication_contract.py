"""What replication and the engine know of each other: two small protocols, no classes.

The replica (``service/replication.py``) moves adapted state between replicas; the engine
(``service/engine.py``) serves and adapts. Neither imports the other: the engine implements
:class:`ReplicatedModel` and holds a :class:`ReplicationPeer`, so the replica never sees the engine
or the adapter classes, and the engine never sees Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class StateRefused(ValueError):
    """A published state this model cannot load (another method or model, or unreadable); says why."""


def count_refusal(refused: dict[str, int], reason: str) -> None:
    """Count a refused state under its reason's first word ("method", "model", ...): the key every
    replication peer reports in ``refused_snapshots``, whichever transport refused it."""
    key = reason.split(" ")[0]
    refused[key] = refused.get(key, 0) + 1


class ReplicatedModel(Protocol):
    """What a served model offers replication (the engine implements it)."""

    name: str

    def export_state(self) -> dict[str, Any]:
        """The adapted state to publish (worker thread): method, model hash, parameters, optimiser state."""
        ...

    def import_state(self, state: dict[str, Any], version: int) -> None:
        """Load a published state as ``version`` (worker thread); raises :class:`StateRefused` naming why."""
        ...

    def adopt_version(self, version: int) -> None:
        """The state just exported was published as ``version`` (worker thread)."""
        ...

    async def run_on_worker(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model's thread, between batches: the only place weights change."""
        ...


class ReplicationPeer(Protocol):
    """What the engine asks of replication (the Redis replica implements it)."""

    role: str
    is_leader: bool

    @property
    def store_up(self) -> bool: ...

    def may_adapt(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def publish(self, model: ReplicatedModel) -> None:
        """Publish the model's state after an update (worker thread); never fails a request."""
        ...

    async def run(self, model: ReplicatedModel) -> None: ...

    async def sync_once(self, model: ReplicatedModel) -> None: ...
