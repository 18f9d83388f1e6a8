"""Shared adaptation state in Redis: the redundancy moving average, snapshots, published parameters
and the leader lease.

Everything here is called from a model's worker thread (or start-up), so it uses redis-py's blocking
client with short timeouts. Redis being down never fails a request: each piece keeps a local copy,
the connection reports itself down (readiness, metrics, logs), retries with exponential backoff and
re-synchronises when Redis returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import torch

from adapters.prob_cache import InProcessProbabilityCache
from adapters.serialization import state_from_bytes, state_to_bytes
from service.errors import StoreUnavailable
from service.snapshots import SnapshotInfo

log = logging.getLogger(__name__)
T = TypeVar("T")
KEY_PREFIX = "tta"


def redacted(url: str) -> str:
    """The URL without its password, for logs, errors and readiness reasons."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisConnection:
    """A redis-py client that tracks whether Redis is up and backs off between reconnect attempts."""

    def __init__(self, url: str, *, timeout: float = 0.5, max_backoff: float = 10.0) -> None:
        self.url = url
        self.display_url = redacted(url)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.up = False
        self.last_error: str | None = None
        self._backoff = 0.1
        self._max_backoff = max_backoff
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._on_reconnect: list[Callable[[], None]] = []

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` each time Redis comes back after being down."""
        self._on_reconnect.append(callback)

    def check(self) -> bool:
        """Ping (respecting the backoff) and return whether Redis is up."""
        try:
            self.call(self.client.ping)
        except StoreUnavailable:
            return False
        return True

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one Redis command; on failure mark Redis down and raise :class:`StoreUnavailable`."""
        with self._lock:
            if not self.up and time.monotonic() < self._retry_at:
                raise StoreUnavailable(f"redis at {self.display_url} is down: {self.last_error}")
        try:
            result = fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            raise StoreUnavailable(f"redis at {self.display_url} is down: {self._scrub(exc)}") from exc
        if not self.up:
            self._mark_up()
        return result

    def _scrub(self, exc: Exception) -> str:
        """The error text with the URL's password (if any) masked."""
        text = str(exc)
        password = urlsplit(self.url).password
        return text.replace(password, "***") if password else text

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            if self.up or self.last_error is None:
                log.error("redis at %s is down: %s", self.display_url, self._scrub(exc))
            self.up = False
            self.last_error = self._scrub(exc)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self._max_backoff)

    def _mark_up(self) -> None:
        with self._lock:
            was_known_down = self.last_error is not None
            self.up = True
            self._backoff = 0.1
        if was_known_down:
            log.warning("redis at %s is back; re-synchronising", self.display_url)
        self.last_error = None
        for callback in self._on_reconnect:
            with contextlib.suppress(StoreUnavailable, redis.RedisError, OSError):
                callback()


def model_key(model: str, *parts: str) -> str:
    return ":".join((KEY_PREFIX, model, *parts))


# m <- batch_mean (first time) or momentum * m + (1 - momentum) * batch_mean, in one atomic step.
_BLEND = """
local current = redis.call('GET', KEYS[1])
local incoming = cjson.decode(ARGV[1])
local momentum = tonumber(ARGV[2])
if current then
  local old = cjson.decode(current)
  if #old == #incoming then
    for i = 1, #incoming do incoming[i] = momentum * old[i] + (1 - momentum) * incoming[i] end
  end
end
local encoded = cjson.encode(incoming)
redis.call('SET', KEYS[1], encoded)
return encoded
"""


class RedisProbabilityCache:
    """The EATA moving average shared by every replica of a model, updated atomically (Lua).

    A local copy answers while Redis is down; when it returns, the shared value wins if one exists,
    otherwise the local one is pushed.
    """

    def __init__(self, connection: RedisConnection, model: str) -> None:
        self.connection = connection
        self.key = model_key(model, "prob_mean")
        self._local = InProcessProbabilityCache()
        self._blend = connection.client.register_script(_BLEND)
        connection.on_reconnect(self.resync)

    def get(self) -> torch.Tensor | None:
        try:
            raw = self.connection.call(self.connection.client.get, self.key)
        except StoreUnavailable:
            return self._local.get()
        if raw is None:
            return None
        mean = torch.tensor(json.loads(raw), dtype=torch.float32)
        self._local.load_state_dict({"mean": mean})
        return mean

    def update(self, batch_mean: torch.Tensor, momentum: float) -> None:
        self._local.update(batch_mean, momentum)
        payload = json.dumps([float(v) for v in batch_mean.detach().float().cpu()])
        try:
            raw = self.connection.call(self._blend, keys=[self.key], args=[payload, momentum])
        except StoreUnavailable:
            return
        self._local.load_state_dict({"mean": torch.tensor(json.loads(raw), dtype=torch.float32)})

    def clear(self) -> None:
        self._local.clear()
        with contextlib.suppress(StoreUnavailable):
            self.connection.call(self.connection.client.delete, self.key)

    def resync(self) -> None:
        if self.connection.client.exists(self.key):
            return
        local = self._local.get()
        if local is not None:
            self.connection.client.set(self.key, json.dumps([float(v) for v in local]))

    def state_dict(self) -> dict[str, Any]:
        mean = self.get()
        return {"mean": mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._local.load_state_dict(state)
        mean = self._local.get()
        try:
            if mean is None:
                self.connection.call(self.connection.client.delete, self.key)
            else:
                self.connection.call(self.connection.client.set, self.key, json.dumps([float(v) for v in mean]))
        except StoreUnavailable:
            pass


class RedisSnapshotStore:
    """Named snapshots persisted in Redis as safetensors bytes, so a restarted replica can resume."""

    def __init__(self, connection: RedisConnection) -> None:
        self.connection = connection

    def save(self, model: str, name: str, state: dict[str, Any]) -> SnapshotInfo:
        stats = state.get("stats", {})
        info = SnapshotInfo(name, time.time(), int(stats.get("parameter_version", 0)), int(stats.get("steps", 0)))
        pipe = self.connection.client.pipeline(transaction=True)
        pipe.hset(model_key(model, "snapshots"), name, state_to_bytes(state))
        pipe.hset(model_key(model, "snapshot_info"), name, json.dumps(info.__dict__))
        self.connection.call(pipe.execute)
        return info

    def load(self, model: str, name: str) -> dict[str, Any]:
        raw = self.connection.call(self.connection.client.hget, model_key(model, "snapshots"), name)
        if raw is None:
            raise KeyError(name)
        return state_from_bytes(raw)

    def list(self, model: str) -> list[SnapshotInfo]:
        raw = self.connection.call(self.connection.client.hgetall, model_key(model, "snapshot_info"))
        infos = [SnapshotInfo(**json.loads(v)) for v in raw.values()]
        return sorted(infos, key=lambda i: i.created)


# Publish only a version newer than the current one and than the publisher's own last version: a
# deposed leader can never roll replicas back, and after Redis lost its data (counter back at 0) the
# versions continue above what followers already hold instead of restarting at 1.
_PUBLISH = """
if KEYS[5] and redis.call('GET', KEYS[5]) ~= ARGV[4] then return -1 end
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[3] or '0')
local version = redis.call('INCR', KEYS[3])
if version <= current then version = current + 1 end
if version <= floor then version = floor + 1 end
redis.call('SET', KEYS[3], version)
redis.call('SET', KEYS[2] .. ':' .. version, ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[1], version)
redis.call('PUBLISH', KEYS[4], version)
return version
"""


class LeaseLost(RuntimeError):
    """A publish fenced off: the publishing replica does not hold the leader lease (any more)."""


class ParameterChannel:
    """Versioned adapted-parameter snapshots: the leader publishes, followers fetch the newest."""

    def __init__(self, connection: RedisConnection, model: str, keep_ms: int = 60_000) -> None:
        self.connection = connection
        self.model = model
        self.version_key = model_key(model, "params", "version")
        self.blob_prefix = model_key(model, "params", "v")
        self.counter_key = model_key(model, "params", "counter")
        self.channel = model_key(model, "params", "announce")
        self.keep_ms = keep_ms
        self._publish = connection.client.register_script(_PUBLISH)

    def publish(self, state: dict[str, Any], at_least: int = 0, lease: LeaderLease | None = None) -> int:
        """Store ``state`` under a new version greater than ``at_least``; announce it; return it.

        With ``lease``, the store happens only while that lease's holder is this replica, checked in the
        same Lua script (a fencing check): a leader that lost its lease, even a moment ago and before its
        next renewal, cannot publish. Raises :class:`LeaseLost` then, with nothing written.
        """
        payload = state_to_bytes(state)
        keys = [self.version_key, self.blob_prefix, self.counter_key, self.channel]
        args: list[Any] = [payload, self.keep_ms, at_least]
        if lease is not None:
            keys.append(lease.key)
            args.append(lease.replica_id)
        version = int(self.connection.call(self._publish, keys=keys, args=args))
        if version < 0:
            raise LeaseLost(f"model {self.model}: replica {lease.replica_id if lease else '?'} no longer holds the "
                            "leader lease; its state was not published")
        return version

    def latest_version(self) -> int:
        raw = self.connection.call(self.connection.client.get, self.version_key)
        return int(raw or 0)

    def fetch(self, version: int) -> dict[str, Any] | None:
        raw = self.connection.call(self.connection.client.get, f"{self.blob_prefix}:{version}")
        return None if raw is None else state_from_bytes(raw)


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    """One leader per model: a key with expiry, renewed by its holder, taken over when it lapses."""

    def __init__(self, connection: RedisConnection, model: str, replica_id: str, ttl_ms: int = 3000) -> None:
        self.connection = connection
        self.key = model_key(model, "leader")
        self.request_key = model_key(model, "leader-request")
        self.replica_id = replica_id
        self.ttl_ms = ttl_ms
        self._renew = connection.client.register_script(_RENEW)
        self._release = connection.client.register_script(_RELEASE)

    def acquire_or_renew(self) -> bool:
        """True when this replica holds the lease after the call."""
        client = self.connection.client
        if self.connection.call(self._renew, keys=[self.key], args=[self.replica_id, self.ttl_ms]):
            return True
        return bool(self.connection.call(client.set, self.key, self.replica_id, nx=True, px=self.ttl_ms))

    def holder(self) -> str | None:
        raw = self.connection.call(self.connection.client.get, self.key)
        return None if raw is None else raw.decode()

    def request(self) -> None:
        """Ask for the lease as a configured leader: a claim that lives one lease period unless renewed."""
        self.connection.call(self.connection.client.set, self.request_key, self.replica_id, px=self.ttl_ms)

    def requested_by(self) -> str | None:
        """Another replica whose live claim asks for the lease, or None."""
        raw = self.connection.call(self.connection.client.get, self.request_key)
        claimant = None if raw is None else raw.decode()
        return None if claimant == self.replica_id else claimant

    def release(self) -> None:
        self.connection.call(self._release, keys=[self.key], args=[self.replica_id])
