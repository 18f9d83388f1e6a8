"""Shared state in Redis: atomic moving average, snapshots, replicas that adapt as one, and faults.

Every test uses the real redis-server (127.0.0.1:6379, or a private one it starts) and unique model
names, so runs never see each other's keys.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from servers import RedisProcess, free_port, running_server

from adapters.corruptions import corrupt
from adapters.models.digits import digits_split
from service.http.app import create_app
from service.redis_state import LeaderLease, LeaseLost, ParameterChannel, RedisConnection, RedisProbabilityCache
from service.replication import Replica
from service.settings import ModelConfig, Settings

REDIS = "redis://127.0.0.1:6379/0"


def unique(name: str = "digits") -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def drifted() -> tuple[np.ndarray, np.ndarray]:
    _, (x, y) = digits_split()
    return corrupt(x[:256], "frost", 5, seed=0), y[:256]


def infer(client, model: str, images: np.ndarray) -> dict:
    body = {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.reshape(-1).tolist()}]}
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def settings_for(model: str, url: str = REDIS, **model_fields) -> Settings:
    return Settings(redis_url=url, lease_ttl_ms=600, sync_interval_ms=100,
                    models=[ModelConfig(name=model, architecture="digits", method="eata", **model_fields)])


def test_concurrent_updates_of_the_moving_average_are_never_lost():
    connection = RedisConnection(REDIS)
    model = unique()
    caches = [RedisProbabilityCache(connection, model) for _ in range(2)]
    caches[0].update(torch.tensor([1.0, 0.0]), 0.9)

    def hammer(cache: RedisProbabilityCache) -> None:
        for _ in range(30):
            cache.update(torch.zeros(2), 0.9)

    threads = [threading.Thread(target=hammer, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each of the 60 blends multiplies m by 0.9 whatever the order; a lost update would leave more.
    assert caches[1].get()[0].item() == pytest.approx(0.9**60, rel=1e-4)


def test_snapshots_persist_in_redis_and_a_restarted_replica_resumes_them(drifted):
    model = unique()
    x, _ = drifted
    with TestClient(create_app(settings_for(model))) as client:
        infer(client, model, x[:64])
        saved = client.post(f"/v1/models/{model}/snapshots", json={"name": "adapted"}).json()
        adapted = client.get(f"/v1/models/{model}/adaptation").json()
    assert adapted["steps"] >= 1
    with TestClient(create_app(settings_for(model, resume_snapshot="adapted"))) as client:
        info = client.get(f"/v1/models/{model}/adaptation").json()
        listed = client.get(f"/v1/models/{model}/snapshots").json()
    assert info["health"]["parameter_version"] == saved["parameter_version"] and info["steps"] == adapted["steps"]
    assert info["health"]["parameter_drift_ratio"] == pytest.approx(adapted["health"]["parameter_drift_ratio"])
    assert [s["name"] for s in listed["snapshots"]] == ["adapted"]


def test_a_snapshot_adapted_with_other_options_is_refused_with_409_naming_the_difference(drifted):
    model = unique()
    x, _ = drifted
    with TestClient(create_app(settings_for(model))) as client:
        infer(client, model, x[:64])
        assert client.post(f"/v1/models/{model}/snapshots", json={"name": "adapted"}).status_code == 201
    with TestClient(create_app(settings_for(model, options={"lr": 0.01}, resume_snapshot="adapted"))) as client:
        started = client.get(f"/v1/models/{model}/adaptation").json()  # resume refused: from the source
        refused = client.post(f"/v1/models/{model}/snapshots/adapted/restore")
        after = client.get(f"/v1/models/{model}/adaptation").json()
    assert started["steps"] == 0 and started["health"]["parameter_drift_ratio"] == 0.0
    assert refused.status_code == 409
    assert "snapshot 'adapted' cannot be restored" in refused.json()["error"]
    assert "lr: 0.001 in the state, 0.01 here" in refused.json()["error"]
    assert after["steps"] == 0 and after["health"]["parameter_drift_ratio"] == 0.0


def test_a_published_state_of_another_model_or_undecodable_bytes_is_refused(drifted, caplog):
    model = unique()
    connection = RedisConnection(REDIS)
    channel = ParameterChannel(connection, model)
    channel.publish({"method": "eata", "model_hash": "0000", "params": {}, "optimizer": None})
    with TestClient(create_app(settings_for(model, role="follower"))) as client:
        info = client.get(f"/v1/models/{model}/adaptation").json()
        assert info["health"]["parameter_drift_ratio"] == 0.0 and info["replication"]["refused_snapshots"]
        version = connection.client.incr(channel.counter_key)
        connection.client.set(f"{channel.blob_prefix}:{version}", b"garbage")
        connection.client.set(channel.version_key, version)
        deadline = time.monotonic() + 5
        while client.get(f"/v1/models/{model}/adaptation").json()["replication"]["loaded_version"] < version:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        infer(client, model, drifted[0][:32])  # still serving
    assert "refused published parameters" in caplog.text
    assert "undecodable" in caplog.text and "model 0000" in caplog.text


def test_redis_down_at_start_then_back_then_killed_mid_run(drifted):
    x, _ = drifted
    server = RedisProcess()
    model = unique()
    with TestClient(create_app(settings_for(model, url=server.url))) as client:
        ready = client.get("/v2/health/ready").json()
        assert ready["status"] == "degraded" and "state store down" in ready["reason"]
        assert infer(client, model, x[:32])["outputs"][0]["shape"] == [32, 10]  # answered from local state
        server.start()
        try:
            deadline = time.monotonic() + 15
            while client.get("/v2/health/ready").json()["status"] != "ok":
                assert time.monotonic() < deadline, "the store did not reconnect"
                time.sleep(0.2)
            infer(client, model, x[32:96])
            assert redis.Redis.from_url(server.url).exists(f"tta:{model}:prob_mean")  # re-synchronised
            server.kill()
            answers = [infer(client, model, x[i : i + 32]) for i in range(96, 160, 32)]
            assert all(a["outputs"][0]["shape"] == [32, 10] for a in answers)
            status = client.get(f"/v1/models/{model}/adaptation").json()["replication"]
            assert status["store_up"] is False and status["store_error"]
            assert client.get("/v2/health/ready").json()["status"] == "degraded"
            assert client.post(f"/v1/models/{model}/snapshots", json={"name": "x"}).status_code == 503
            server.start()
            deadline = time.monotonic() + 15
            while client.get("/v2/health/ready").json()["status"] != "ok":
                assert time.monotonic() < deadline, "the store did not reconnect after a restart"
                time.sleep(0.2)
        finally:
            server.kill()


def test_two_server_processes_adapt_as_one_and_the_follower_takes_over(tmp_path, drifted):
    x, _ = drifted
    model = unique()
    for role in ("leader", "follower"):
        (tmp_path / f"{role}.yaml").write_text(
            f"redis_url: {REDIS}\nlease_ttl_ms: 1000\nsync_interval_ms: 200\n"
            f"models:\n  - {{name: {model}, architecture: digits, method: eata, role: {role}}}\n"
        )
    with (
        running_server(tmp_path / "leader.yaml", port=free_port()) as (leader, leader_proc),
        running_server(tmp_path / "follower.yaml") as (follower, _),
        httpx.Client(base_url=leader, timeout=30) as lc,
        httpx.Client(base_url=follower, timeout=30) as fc,
    ):
        deadline = time.monotonic() + 10
        while not lc.get(f"/v1/models/{model}/adaptation").json()["replication"]["is_leader"]:
            assert time.monotonic() < deadline, "the configured leader never took the lease"
            time.sleep(0.1)
        for i in range(0, 192, 64):
            infer(lc, model, x[i : i + 64])
        leader_info = lc.get(f"/v1/models/{model}/adaptation").json()
        assert leader_info["steps"] == 3 and leader_info["parameter_version"] > 0
        deadline = time.monotonic() + 3
        while fc.get(f"/v1/models/{model}/adaptation").json()["parameter_version"] != leader_info[
            "parameter_version"
        ]:
            assert time.monotonic() < deadline, "the follower did not catch up within 3 s"
            time.sleep(0.1)
        follower_info = fc.get(f"/v1/models/{model}/adaptation").json()
        assert follower_info["replication"]["is_leader"] is False and follower_info["steps"] == 0
        batch = x[192:256]
        b = infer(fc, model, batch)  # the follower first: the leader publishes a new version after this batch
        a = infer(lc, model, batch)  # answered before the leader adapts on it: the follower's weights
        assert a["parameters"]["parameter_version"] == b["parameters"]["parameter_version"]
        assert np.allclose(a["outputs"][0]["data"], b["outputs"][0]["data"], atol=1e-5), (
            lc.get(f"/v1/models/{model}/adaptation").json(), fc.get(f"/v1/models/{model}/adaptation").json())

        leader_proc.kill()  # no lease release: the follower must wait for it to lapse
        deadline = time.monotonic() + 10
        while not fc.get(f"/v1/models/{model}/adaptation").json()["replication"]["is_leader"]:
            assert time.monotonic() < deadline, "the follower did not take over"
            time.sleep(0.2)
        infer(fc, model, x[:64])
        taken = fc.get(f"/v1/models/{model}/adaptation").json()
        assert taken["steps"] == 1 and taken["parameter_version"] > leader_info["parameter_version"]


def test_versions_continue_above_what_replicas_hold_after_redis_loses_its_data():
    connection = RedisConnection(REDIS)
    channel = ParameterChannel(connection, unique())
    assert channel.publish({"params": {}}) == 1
    for key in (channel.version_key, channel.counter_key):  # as after a Redis restart without persistence
        connection.client.delete(key)
    assert channel.publish({"params": {}}, at_least=72) == 73  # not 1: followers holding 72 must move on
    assert channel.publish({"params": {}}) == 74 and channel.latest_version() == 74


def test_a_leader_that_lost_its_lease_cannot_publish_even_before_it_notices():
    """Fencing: the lease is checked inside the publishing script, not at the leader's next renewal."""
    model = unique()
    connection = RedisConnection(REDIS)
    channel = ParameterChannel(connection, model)
    old, new = LeaderLease(connection, model, "old", ttl_ms=60_000), LeaderLease(connection, model, "new", 60_000)
    assert old.acquire_or_renew() and channel.publish({"params": {}}, lease=old) == 1
    connection.client.delete(old.key)  # its lease lapsed (a pause, a partition) ...
    assert new.acquire_or_renew()  # ... and another replica took it
    with pytest.raises(LeaseLost, match="old no longer holds the leader lease"):
        channel.publish({"params": {"stale": 1}}, lease=old)
    assert channel.latest_version() == 1  # nothing was written
    assert channel.publish({"params": {}}, lease=new) == 2

    class Model:  # the engine's side of the replication contract, reduced to what publishing uses
        name = model

        def __init__(self) -> None:
            self.versions: list[int] = []

        def export_state(self) -> dict:
            return {"params": {}}

        def adopt_version(self, version: int) -> None:
            self.versions.append(version)

    replica = Replica(connection, model, "leader", replica_id="old", lease_ttl_ms=60_000)
    replica.is_leader = True  # it still believes it leads
    stale = Model()
    replica.publish(stale)
    assert not replica.is_leader and stale.versions == [] and channel.latest_version() == 2


def test_a_configured_leader_takes_the_lease_back_from_a_follower_that_led_alone(drifted):
    model = unique()
    x, _ = drifted

    def replication(client) -> dict:
        return client.get(f"/v1/models/{model}/adaptation").json()["replication"]

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 15
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    follower_settings = settings_for(model, role="follower").model_copy(update={"replica_id": "f"})
    leader_settings = settings_for(model, role="leader").model_copy(update={"replica_id": "l"})
    with TestClient(create_app(follower_settings)) as follower:
        wait_for(lambda: replication(follower)["is_leader"], "the lone follower never took the lease")
        infer(follower, model, x[:32])  # adapts and publishes
        published = replication(follower)["published_version"]
        assert published > 0
        with TestClient(create_app(leader_settings)) as leader:
            wait_for(lambda: replication(leader)["is_leader"] and not replication(follower)["is_leader"],
                     "the configured leader did not get the lease back")
            assert replication(leader)["loaded_version"] >= published  # it continues from the follower's state
            infer(leader, model, x[32:64])
            new_version = replication(leader)["published_version"]
            assert new_version > published
            wait_for(lambda: replication(follower)["loaded_version"] >= new_version, "the follower did not follow")
