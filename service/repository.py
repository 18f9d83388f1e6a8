"""The model repository: which models exist, and loading, replacing and unloading them while serving.

A model is known from the configuration or from a config posted with its load. Loading builds the
engine off the event loop (other models keep serving meanwhile) and swaps it in only once it runs, so
a reload replaces a model without a failed request; unloading first stops routing requests to it, then
lets it finish what it queued. Its adapted state can be kept as a snapshot on unload and restored on a
later load. No HTTP here: ``service/http/routes_repository.py`` exposes it (Triton's repository API).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Literal

from service.engine import EngineRegistry
from service.errors import ModelLoadError, SnapshotIncompatible, SnapshotNotFound, UnknownModel
from service.settings import ModelConfig
from service.snapshots import SnapshotInfo

log = logging.getLogger(__name__)

State = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]


@dataclass
class ModelState:
    name: str
    state: State
    reason: str = ""


class ModelRepository:
    """Loads and unloads the models of ``registry`` (whose ``factory`` builds engines)."""

    def __init__(self, registry: EngineRegistry, configured: list[ModelConfig]) -> None:
        if registry.factory is None:
            raise ValueError("the registry has no engine factory: models cannot be loaded at run time")
        self.registry = registry
        self.configs = {config.name: config for config in configured}
        self._busy: dict[str, State] = {}
        self._reasons: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def index(self, ready_only: bool = False) -> list[ModelState]:
        """Every known model with its state (READY, LOADING, UNLOADING, or UNAVAILABLE with the reason)."""
        served = set(self.registry.names())
        states = []
        for name in sorted(served | set(self.configs) | set(self._busy)):
            if name in self._busy:
                states.append(ModelState(name, self._busy[name]))
            elif name in served and self.registry.get(name).ready:
                states.append(ModelState(name, "READY"))
            else:
                states.append(ModelState(name, "UNAVAILABLE", self._reasons.get(name, "not loaded")))
        return [s for s in states if s.state == "READY"] if ready_only else states

    async def load(self, name: str, config: ModelConfig | None = None, snapshot: str | None = None) -> None:
        """Load (or reload) ``name``: from ``config`` when given (it is kept), else from the configuration."""
        config = config or self.configs.get(name)
        if config is None:
            raise UnknownModel(name, sorted(self.configs))
        if config.name != name:
            raise ModelLoadError(f"the posted config names model {config.name!r}, not {name!r}")
        async with self._lock(name):
            self._busy[name] = "LOADING"
            try:
                engine = await asyncio.to_thread(self.registry.factory, config)  # type: ignore[misc]
                await engine.start()
                if snapshot is not None:
                    try:
                        await engine.restore_snapshot(snapshot)
                    except (SnapshotNotFound, SnapshotIncompatible):
                        await engine.stop()
                        raise
            except Exception as exc:
                self._reasons[name] = f"load failed: {exc}"
                raise
            finally:
                self._busy.pop(name, None)
            self.configs[name] = config
            self._reasons.pop(name, None)
            previous = self.registry.add(engine)
            if previous is not None:  # a reload: the old engine answers what it queued, then stops
                await previous.stop()
            log.info("model %s loaded%s", name, f" from snapshot {snapshot}" if snapshot else "")

    async def unload(self, name: str, snapshot: str | None = None) -> SnapshotInfo | None:
        """Stop serving ``name``; with ``snapshot``, keep its adapted state under that name first."""
        async with self._lock(name):
            engine = self.registry.get(name)
            # The snapshot first, while the model still serves: if saving fails, nothing has changed.
            saved = await engine.save_snapshot(snapshot) if snapshot is not None else None
            self.registry.remove(name)  # new requests get 404 from here on
            self._busy[name] = "UNLOADING"
            try:
                await engine.stop()  # answers what it queued first
            finally:
                self._busy.pop(name, None)
            self._reasons[name] = "unloaded"
            log.info("model %s unloaded%s", name, f" (state kept as snapshot {snapshot})" if snapshot else "")
            return saved

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())
