"""Several replicas adapting as one model: leader lease, parameter publishing and following.

* ``leader``: adapts and publishes each update (adapted parameters and optimiser state, safetensors
  bytes) with a version from Redis that only ever increases.
* ``follower``: serves, does not adapt, and hot-swaps to the newest published parameters between
  batches (on the model's worker thread, so no request sees half-loaded weights). It learns of new
  versions from pub/sub and, since pub/sub drops messages while disconnected, also by polling.
* ``independent``: adapts alone and shares only the redundancy moving average.

Leader and follower replicas compete for one lease key with an expiry: whoever holds it adapts. A
follower waits two lease periods after start-up before competing, so a configured leader starting at
the same time wins; when the leader dies its lease lapses and a follower takes over, starting from
the last published state. A configured leader that does not hold the lease keeps a claim on it, which
a follower holding the lease answers by publishing its state and handing the lease over; followers
never compete while such a claim lives. So the ``leader`` role leads whenever it runs, also when it
started (or restarted) after a follower had taken over. Redis faults never fail requests: every
replica keeps serving from its local state, reports the store as down, and re-synchronises when Redis
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import redis.asyncio as aioredis

from adapters.serialization import StateDecodeError
from service.errors import StoreUnavailable
from service.redis_state import LeaderLease, LeaseLost, ParameterChannel, RedisConnection
from service.replication_contract import ReplicatedModel, StateRefused, count_refusal

log = logging.getLogger(__name__)


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Replica:
    """The replication side of one served model (a :class:`ReplicationPeer`; the model a :class:`ReplicatedModel`)."""

    def __init__(
        self,
        connection: RedisConnection,
        model: str,
        role: str,
        replica_id: str | None = None,
        lease_ttl_ms: int = 3000,
        sync_interval_ms: int = 500,
    ) -> None:
        self.connection = connection
        self.model = model
        self.role = role
        self.replica_id = replica_id or default_replica_id()
        self.channel = ParameterChannel(connection, model)
        self.lease = None if role == "independent" else LeaderLease(connection, model, self.replica_id, lease_ttl_ms)
        self.lease_ttl = lease_ttl_ms / 1000
        self.interval = min(sync_interval_ms / 1000, self.lease_ttl / 3)
        self.is_leader = False
        self.loaded_version = 0
        self.published_version = 0
        self.refused: dict[str, int] = {}
        self._started = time.monotonic()
        self._wake = asyncio.Event()
        self._needs_publish = False
        connection.on_reconnect(self._on_reconnect)

    # ------------------------------------------------------------------ what the engine asks
    def may_adapt(self) -> bool:
        return self.role == "independent" or self.is_leader

    @property
    def store_up(self) -> bool:
        return self.connection.up

    def status(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "replica_id": self.replica_id,
            "is_leader": self.is_leader,
            "loaded_version": self.loaded_version,
            "published_version": self.published_version,
            "store_up": self.connection.up,
            "store_error": self.connection.last_error,
            "refused_snapshots": dict(self.refused),
        }

    def publish(self, model: ReplicatedModel) -> None:
        """Publish the model's state (worker thread, after an update); keeps serving if Redis is down."""
        try:
            version = self.channel.publish(model.export_state(), at_least=self.loaded_version, lease=self.lease)
        except StoreUnavailable:
            self._needs_publish = True
            return
        except LeaseLost as exc:  # another replica leads now: follow it from the next tick on
            self.is_leader = False
            self._needs_publish = False
            log.warning("%s", exc)
            return
        self._needs_publish = False
        self.published_version = self.loaded_version = version
        model.adopt_version(version)

    def apply(self, model: ReplicatedModel, version: int, state: dict[str, Any]) -> bool:
        """Load a published state (worker thread); refuse, with a logged reason, one the model cannot take."""
        try:
            model.import_state(state, version)
        except StateRefused as exc:
            self._refuse(version, str(exc))
            return False
        self.loaded_version = version
        return True

    def _refuse(self, version: int, reason: str) -> None:
        log.error("model %s: refused published parameters v%s: %s", self.model, version, reason)
        count_refusal(self.refused, reason)
        self.loaded_version = max(self.loaded_version, version)  # do not retry the same bad version

    # ------------------------------------------------------------------ the background loop
    async def run(self, model: ReplicatedModel) -> None:
        """Renew or compete for the lease, follow new versions and listen for announcements."""
        listener = asyncio.create_task(self._listen(), name=f"replica-listen-{self.model}")
        try:
            while True:
                await self._tick(model)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                self._wake.clear()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            if self.is_leader and self.lease is not None:
                with contextlib.suppress(StoreUnavailable):
                    await asyncio.to_thread(self.lease.release)

    async def sync_once(self, model: ReplicatedModel) -> None:
        """Load the newest published state now (start-up: a restarted replica resumes)."""
        await self._follow(model)

    async def _tick(self, model: ReplicatedModel) -> None:
        try:
            await asyncio.to_thread(self.connection.check)
            if self.lease is not None:
                await self._elect(model)
            if not self.is_leader:
                await self._follow(model)
            elif self._needs_publish:
                await model.run_on_worker(lambda: self.publish(model))
        except StoreUnavailable:
            pass  # logged by the connection; serving continues from local state

    async def _elect(self, model: ReplicatedModel) -> None:
        lease = self.lease
        assert lease is not None
        if self.role == "leader" and not self.is_leader:
            await asyncio.to_thread(lease.request)
        elif self.role == "follower":
            claimant = await asyncio.to_thread(lease.requested_by)
            if claimant is not None:  # a configured leader is alive and asks: defer to it
                if self.is_leader:
                    await model.run_on_worker(lambda: self.publish(model))  # it continues from our state
                    await asyncio.to_thread(lease.release)
                    self.is_leader = False
                    log.warning("model %s: replica %s handed the leader lease to the configured leader %s",
                                self.model, self.replica_id, claimant)
                return
            if not self.is_leader and time.monotonic() - self._started < 2 * self.lease_ttl:
                return  # start-up grace: a configured leader starting at the same time wins
        holds = await asyncio.to_thread(lease.acquire_or_renew)
        if holds and not self.is_leader:
            await self._follow(model)  # continue from the last published state
            self.is_leader = True
            log.warning("model %s: replica %s is now the leader", self.model, self.replica_id)
        elif not holds and self.is_leader:
            self.is_leader = False
            log.warning("model %s: replica %s lost the leader lease; following", self.model, self.replica_id)

    async def _follow(self, model: ReplicatedModel) -> None:
        version = await asyncio.to_thread(self.channel.latest_version)
        if version <= self.loaded_version:
            return
        try:
            state = await asyncio.to_thread(self.channel.fetch, version)
        except StateDecodeError as exc:
            self._refuse(version, f"undecodable: {exc}")
            return
        if state is None:
            return
        await model.run_on_worker(lambda: self.apply(model, version, state))

    async def _listen(self) -> None:
        """Wake the loop on each announced version; polling covers what pub/sub misses."""
        while True:
            client = aioredis.Redis.from_url(self.connection.url, socket_connect_timeout=1)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(self.channel.channel)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # disconnected: polling carries on; resubscribe shortly
                await asyncio.sleep(self.interval)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _on_reconnect(self) -> None:
        """Redis is back: a leader republishes what it learned while cut off; followers catch up."""
        self._needs_publish = self.is_leader
