"""``tta-serve serve --workers N``: several processes on one port, worker 0 adapting for all of them.

Real processes throughout: a supervisor with two workers serving the digits model, the run-directory
transport between them, signals and a killed worker. Requests reach a worker chosen by the kernel per
connection, so the helpers open new connections until one reaches the wanted worker (its
``x-tta-worker`` header names it) and send on that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from servers import free_port, serve_command, stop, wait_ready

from adapters.corruptions import corrupt
from adapters.models.digits import digits_split
from adapters.serialization import state_to_bytes
from service.local_replication import LocalReplica, PublishedState
from service.replication_contract import StateRefused
from service.settings import ModelConfig, Settings, load_settings, usable_cores

WAIT_S = 60.0  # bounds on waits for something that happens within a second or two when all is well
MODEL = {"name": "digits", "architecture": "digits", "method": "eata", "correlated_traffic": "never",
         "agreement_fraction": 0, "probe_every_s": 0}


@pytest.fixture(scope="module")
def drifted() -> np.ndarray:
    _, (x, _) = digits_split()
    return corrupt(x[:128], "frost", 5, seed=0)


def body(images: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.reshape(-1).tolist()}]}


def on_worker(base: str, worker: int, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """Send to ``worker``: the kernel picks a worker per connection, so open connections (probed with a
    readiness request, which changes nothing) until one reaches it, then send on that kept-alive one."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with httpx.Client(base_url=base, timeout=30) as client:
            try:
                if client.get("/v2/health/ready").headers.get("x-tta-worker") != str(worker):
                    continue
                response = client.request(method, path, **kwargs)
            except httpx.TransportError:  # a worker stopping or restarting
                time.sleep(0.05)
                continue
        assert response.headers.get("x-tta-worker") == str(worker)  # the same connection, the same worker
        assert response.status_code == 200, response.text
        return response
    pytest.fail(f"worker {worker} did not answer {path} within {WAIT_S} s")


def replication(base: str, worker: int) -> dict[str, Any]:
    return on_worker(base, worker, "GET", "/v1/models/digits/adaptation").json()["replication"]


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {WAIT_S} s")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")  # exited, not yet reaped


@contextmanager
def workers(tmp_path: Path, count: int = 2) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A supervisor with ``count`` workers on a free port, every worker serving; always stopped."""
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": [MODEL]}))
    port = free_port()
    log = tmp_path / f"workers.{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command("--config", str(config), "--port", str(port), "--workers", str(count), "--log-level",
                          "warning"),
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TTA_THREADS": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, log)
            for worker in range(count):
                on_worker(base, worker, "GET", "/v2/health/ready")
            yield base, proc, log
        finally:
            stop(proc)


def test_workers_share_the_port_and_the_followers_serve_the_leaders_weights(tmp_path, drifted):
    with workers(tmp_path) as (base, _, _):
        leader, follower = replication(base, 0), replication(base, 1)
        assert (leader["role"], leader["is_leader"], leader["transport"]) == ("leader", True, "local")
        assert (follower["role"], follower["is_leader"]) == ("follower", False)
        assert leader["pid"] != follower["pid"]

        for i in range(4):  # adaptation steps on the leader, each published
            on_worker(base, 0, "POST", "/v2/models/digits/infer", json=body(drifted[32 * i:32 * (i + 1)]))
        published = replication(base, 0)["published_version"]
        assert published >= 1
        wait_until(lambda: replication(base, 1)["loaded_version"] == published, "the follower loading the state")
        follower_info = on_worker(base, 1, "GET", "/v1/models/digits/adaptation").json()
        assert follower_info["parameter_version"] == published and follower_info["updates"] == 0

        # The follower does not adapt, and the leader answers from the weights it had before the step this
        # batch causes: both answer with the weights of version ``published``, so identically.
        from_follower = on_worker(base, 1, "POST", "/v2/models/digits/infer", json=body(drifted[:32])).json()
        from_leader = on_worker(base, 0, "POST", "/v2/models/digits/infer", json=body(drifted[:32])).json()
        np.testing.assert_allclose(from_follower["outputs"][0]["data"], from_leader["outputs"][0]["data"], atol=1e-5)
        assert replication(base, 1)["published_version"] == 0  # followers never publish

        # Any worker's /metrics holds every worker's series, labelled; scope=worker only its own.
        for worker in (0, 1):
            scraped = on_worker(base, worker, "GET", "/metrics").text
            assert 'tta_worker_up{worker="0"} 1.0' in scraped and 'tta_worker_up{worker="1"} 1.0' in scraped
            assert 'tta_replica_leader{model="digits",worker="0"} 1.0' in scraped
            assert 'tta_replica_leader{model="digits",worker="1"} 0.0' in scraped
            own = on_worker(base, worker, "GET", "/metrics", params={"scope": "worker"}).text
            assert f'tta_replica_leader{{model="digits"}} {1.0 if worker == 0 else 0.0}' in own
            assert "worker=" not in own


def test_killed_workers_restart_a_restarted_leader_resumes_its_version_and_sigterm_stops_all(tmp_path, drifted):
    with workers(tmp_path) as (base, proc, log):
        on_worker(base, 0, "POST", "/v2/models/digits/infer", json=body(drifted[:32]))
        before = replication(base, 0)
        assert before["published_version"] >= 1

        follower_pid = replication(base, 1)["pid"]
        os.kill(follower_pid, signal.SIGKILL)
        wait_until(lambda: replication(base, 1)["pid"] != follower_pid, "the follower's restart")
        assert replication(base, 1)["loaded_version"] == before["published_version"]  # resumed at start-up

        os.kill(before["pid"], signal.SIGKILL)
        wait_until(lambda: replication(base, 0)["pid"] != before["pid"], "the leader's restart")
        after = replication(base, 0)
        assert after["is_leader"] and after["loaded_version"] == before["published_version"]
        on_worker(base, 0, "POST", "/v2/models/digits/infer", json=body(drifted[32:64]))
        assert replication(base, 0)["published_version"] > before["published_version"]  # versions only increase

        pids = [replication(base, worker)["pid"] for worker in (0, 1)]  # SIGTERM stops them all, restarted too
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 0
    wait_until(lambda: all(gone(pid) for pid in pids), "every worker exiting")
    text = log.read_text()
    assert "worker 1 (pid" in text and "was killed by SIGKILL; restarting it" in text


def test_workers_do_not_outlive_a_supervisor_killed_with_sigkill(tmp_path):
    with workers(tmp_path) as (base, proc, _):
        pids = [replication(base, worker)["pid"] for worker in (0, 1)]
        proc.kill()
        proc.wait()
    wait_until(lambda: all(gone(pid) for pid in pids), "every worker exiting")


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (its other child is multiprocessing's resource tracker)."""
    try:
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    except OSError:  # the supervisor has exited
        return []
    pids = []
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:  # exited meanwhile
            pass
    return pids


def test_workers_that_keep_dying_stop_the_supervisor_with_exit_1(tmp_path):
    with workers(tmp_path) as (_, proc, log):
        deadline = time.monotonic() + WAIT_S
        while proc.poll() is None and time.monotonic() < deadline:  # kill every worker as soon as it exists
            for pid in worker_pids(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        assert proc.wait(timeout=WAIT_S) == 1
    assert "workers died 6 times within 60 s; stopping all workers" in log.read_text()


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(serve_command(*args, "--log-level", "warning"), capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_a_port_in_use_stops_start_up_with_one_clear_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--port", str(port), "--workers", "2")
    assert result.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "worker" not in result.stderr.replace("--workers", "")  # no worker started


def test_redis_replication_and_workers_are_refused_together():
    result = run_serve("--port", str(free_port()), "--workers", "2", env={"TTA_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert result.returncode == 2
    assert "cannot be combined with redis_url" in result.stderr


def test_a_model_that_cannot_load_is_reported_once_and_no_follower_starts(tmp_path):
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": [{"name": "broken", "factory": "no_such_module_here:build"}]}))
    result = run_serve("--config", str(config), "--port", str(free_port()), "--workers", "2")
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert output.count("no_such_module_here") == 1, output
    assert "worker 0 failed to start (exited with code 2)" in output
    assert "worker 1" not in output


# ------------------------------------------------------------------ the transport, in one process
class Model:
    """A ReplicatedModel holding one number as its state (the transport is what is under test)."""

    name = "m"

    def __init__(self, value: float = 0.0) -> None:
        self.value, self.version = value, 0

    def export_state(self) -> dict[str, Any]:
        return {"value": self.value}

    def import_state(self, state: dict[str, Any], version: int) -> None:
        if "value" not in state:
            raise StateRefused("shape of the state differs")
        self.value, self.version = state["value"], version

    def adopt_version(self, version: int) -> None:
        self.version = version

    async def run_on_worker(self, fn):
        return fn()


def test_the_run_directory_carries_versions_that_only_increase(tmp_path, caplog):
    asyncio.run(run_directory_round_trips(tmp_path, caplog))


async def run_directory_round_trips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    leader, follower = LocalReplica(tmp_path, "m", 0, leader=True), LocalReplica(tmp_path, "m", 1, leader=False)
    source, served = Model(1.0), Model()
    await follower.sync_once(served)  # nothing published yet
    assert served.version == 0 and follower.store_up
    leader.publish(source)
    source.value = 2.0
    leader.publish(source)
    await follower.sync_once(served)
    assert (served.value, served.version, follower.loaded_version) == (2.0, 2, 2)
    assert not follower.may_adapt() and leader.may_adapt()

    restarted, resumed = LocalReplica(tmp_path, "m", 0, leader=True), Model()
    await restarted.sync_once(resumed)
    assert (resumed.value, resumed.version) == (2.0, 2)
    restarted.publish(resumed)
    assert restarted.status()["published_version"] == 3
    await follower.sync_once(served)
    assert served.version == 3

    (tmp_path / "m.state").write_bytes(b"\x04" + b"\x00" * 7 + b"garbage")  # a broken state
    await follower.sync_once(served)
    assert not follower.store_up and "unreadable published state" in follower.status()["store_error"]
    PublishedState(tmp_path, "m").write(5, state_to_bytes({"other": 1}))  # one the model refuses
    await follower.sync_once(served)
    assert follower.store_up and follower.status()["refused_snapshots"] == {"shape": 1}
    assert served.version == 3 and follower.loaded_version == 5  # a refused version is not retried
    assert "refused published parameters v5" in caplog.text


def test_workers_come_from_the_environment_and_zero_means_one_per_core(monkeypatch):
    monkeypatch.setenv("TTA_WORKERS", "3")
    assert load_settings().resolved_workers() == 3
    assert load_settings(workers=0).resolved_workers() == usable_cores()  # a flag wins over the environment
    from service.composition import default_threads

    two = Settings(workers=2, models=[ModelConfig(name="m", architecture="digits", method="eata")])
    assert default_threads(two) == max(1, usable_cores() // 2)  # each worker takes its share of the cores


def test_unset_workers_mean_one_per_core_for_frozen_models_and_one_when_a_model_adapts(monkeypatch):
    monkeypatch.delenv("TTA_WORKERS", raising=False)
    frozen = Settings(models=[ModelConfig(name="m", architecture="digits", method="source")])
    mixed = Settings(models=[ModelConfig(name="m", architecture="digits", method="source"),
                             ModelConfig(name="n", architecture="digits", method="eata")])
    assert frozen.resolved_workers() == usable_cores()
    assert mixed.resolved_workers() == 1  # an adapting model: worker 0 would learn from its share only
    assert Settings().resolved_workers() == 1  # the built-in default model adapts
    assert Settings(workers=1, models=frozen.models).resolved_workers() == 1  # a setting wins
