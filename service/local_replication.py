"""Replication between worker processes on one host, through files in a shared run directory.

``tta-serve serve --workers N`` runs N processes on one port (``service/workers.py``). Worker 0 leads
every adapting model: it adapts and, after each update, writes the model's state to
``<run dir>/<model>.state`` (a temporary file renamed over the old one, so a reader sees a whole state
or the previous one, never half of one). The others follow: every ``poll_ms`` they ``stat`` that file
(one syscall on tmpfs, no Redis round trip) and, when it changed, read it and load it on the model's
worker thread between batches. The file starts with the version (8 bytes, little-endian), which only
ever increases: a restarted leader resumes from the file, so it continues from the last published
state and version. No lease: the supervisor decides the roles and restarts a dead leader.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import adapters
from adapters.serialization import StateDecodeError, state_from_bytes, state_to_bytes
from service.replication_contract import ReplicatedModel, StateRefused, count_refusal
from service.settings import ModelConfig

log = logging.getLogger(__name__)

_VERSION_BYTES = 8
DEFAULT_POLL_MS = 25


class PublishedState:
    """One model's published state in the run directory: write whole, read whole."""

    def __init__(self, run_dir: Path, model: str) -> None:
        self.path = run_dir / f"{model}.state"

    def write(self, version: int, payload: bytes) -> None:
        """Replace the published state atomically (rename within the directory)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as out:
            out.write(version.to_bytes(_VERSION_BYTES, "little"))
            out.write(payload)
        os.replace(tmp, self.path)

    def stamp(self) -> tuple[int, int] | None:
        """What changes with each write (inode, mtime); None while nothing is published."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def read(self) -> tuple[int, dict[str, Any]] | None:
        """(version, state), or None while nothing is published; raises StateDecodeError on bad bytes."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) < _VERSION_BYTES:
            raise StateDecodeError(f"{self.path} is truncated ({len(data)} bytes)")
        return int.from_bytes(data[:_VERSION_BYTES], "little"), state_from_bytes(data[_VERSION_BYTES:])


class LocalReplica:
    """The replication side of one model in one worker process (a :class:`ReplicationPeer`)."""

    def __init__(self, run_dir: Path, model: str, worker: int, leader: bool,
                 poll_ms: float = DEFAULT_POLL_MS) -> None:
        self.model = model
        self.worker = worker
        self.role = "leader" if leader else "follower"
        self.is_leader = leader
        self.replica_id = f"worker-{worker}"
        self.published = PublishedState(run_dir, model)
        self.interval = poll_ms / 1000
        self.loaded_version = 0
        self.published_version = 0
        self.refused: dict[str, int] = {}
        self.last_error: str | None = None
        self._seen: tuple[int, int] | None = None

    # ------------------------------------------------------------------ what the engine asks
    def may_adapt(self) -> bool:
        return self.is_leader

    @property
    def store_up(self) -> bool:
        return self.last_error is None

    def status(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "replica_id": self.replica_id,
            "transport": "local",
            "worker": self.worker,
            "pid": os.getpid(),
            "is_leader": self.is_leader,
            "loaded_version": self.loaded_version,
            "published_version": self.published_version,
            "store_up": self.store_up,
            "store_error": self.last_error,
            "refused_snapshots": dict(self.refused),
        }

    def publish(self, model: ReplicatedModel) -> None:
        """Write the model's state as the next version (worker thread, after an update); never raises."""
        version = max(self.loaded_version, self.published_version) + 1
        try:
            self.published.write(version, state_to_bytes(model.export_state()))
        except OSError as exc:
            self._fault(f"cannot publish to {self.published.path}: {exc}")
            return
        self.last_error = None
        self.published_version = self.loaded_version = version
        model.adopt_version(version)

    # ------------------------------------------------------------------ following
    async def sync_once(self, model: ReplicatedModel) -> None:
        """Load the newest published state now: a (re)started leader or follower resumes from it."""
        await self._follow(model)

    async def run(self, model: ReplicatedModel) -> None:
        """Followers poll the state file's stamp and load each new version; the leader has nothing to do."""
        if self.is_leader:
            return
        while True:
            await asyncio.sleep(self.interval)
            await self._follow(model)

    async def _follow(self, model: ReplicatedModel) -> None:
        try:
            stamp = self.published.stamp()
            if stamp is None or stamp == self._seen:
                return
            read = await asyncio.to_thread(self.published.read)
        except StateDecodeError as exc:
            self._seen = stamp
            self._fault(f"unreadable published state: {exc}")
            return
        except OSError as exc:
            self._fault(f"cannot read {self.published.path}: {exc}")
            return
        self._seen = stamp
        self.last_error = None
        if read is None:
            return
        version, state = read
        if version <= self.loaded_version:
            return
        await model.run_on_worker(lambda: self._apply(model, version, state))

    def _apply(self, model: ReplicatedModel, version: int, state: dict[str, Any]) -> None:
        try:
            model.import_state(state, version)
        except StateRefused as exc:
            log.error("model %s: worker %s refused published parameters v%s: %s", self.model, self.worker,
                      version, exc)
            count_refusal(self.refused, str(exc))
        self.loaded_version = version  # a refused version is not retried

    def _fault(self, message: str) -> None:
        if message != self.last_error:  # one line per new fault, not one per poll
            log.error("model %s: worker %s: %s", self.model, self.worker, message)
        self.last_error = message


def local_peers(run_dir: Path, worker: int,
                poll_ms: float = DEFAULT_POLL_MS) -> Callable[[ModelConfig], LocalReplica | None]:
    """A peer factory for ``build_registry``: worker 0 leads every model that updates weights, the others
    follow; models that do not update weights (source, norm) need no peer."""

    def peer_for(config: ModelConfig) -> LocalReplica | None:
        if not adapters.METHODS[config.method].updates_parameters:
            return None
        return LocalReplica(run_dir, config.name, worker, leader=worker == 0, poll_ms=poll_ms)

    return peer_for
