"""A short soak in CI: faults during load, and no accepted request lost or answered twice.

Runs ``python -m loadtest.soak`` for ~24 s of load (two replicas on a private Redis, plus the
restart of the killed replica): Redis killed and restarted, the leader replica SIGKILLed and
restarted, and bad requests of every kind mixed in. The soak itself does the bookkeeping (see its
docstring); this test checks its report. No baseline here (it would double the time); the full
soak in docs/reliability.md compares accuracy with a fault-free run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    command = [sys.executable, "-m", "loadtest.soak", "--minutes", "0.4", "--no-baseline", "--leader-kills", "1",
               "--down-s", "2", "--rate", "10", "--batch", "8", "--bad-rate", "3", "--json", str(out)]
    # Its own session, so a timeout can end the soak and the servers it started, and nothing else.
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "TTA_THREADS": "1"})
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the soak did not finish in 300 s:\n{output.decode(errors='replace')[-4000:]}")
    text = output.decode(errors="replace")
    assert out.is_file(), f"no report (exit {proc.returncode}):\n{text[-4000:]}"
    data = json.loads(out.read_text())
    data["_output"] = text
    return data


def test_every_fault_was_injected(report):
    events = [f["event"] for f in report["faulted"]["faults"]]
    assert "redis killed" in events and "redis restarted (empty)" in events, events
    assert "replica killed (SIGKILL)" in events and "replica ready" in events, events
    assert not any("skipped" in e for e in events), events


def test_no_accepted_request_was_lost_failed_or_answered_twice(report):
    good = report["faulted"]["good"]
    assert good["sent"] >= 200
    assert good["answered"] == good["sent"], report["_output"][-3000:]
    assert good["lost"] == 0 and good["failed"] == 0
    assert good["duplicates"] == 0 and good["misdelivered"] == 0
    assert good["cut_off_outside_kills"] == 0
    assert good["attempts"].get("refused", 0) > 0, "the kill should have refused some connections"
    assert good["accuracy"] > 80  # a sanity floor: answers are real predictions (about 90% expected here)


def test_every_bad_request_got_a_4xx_with_an_error_body(report):
    bad = report["faulted"]["bad"]
    assert bad["not_4xx"] == 0 and bad["without_json_error"] == 0, bad["kinds"]
    expected = {"malformed_json": "400", "oversized": "413", "nan": "400", "wrong_shape": "400",
                "wrong_length": "400", "traversal_name": "404"}
    for kind, status in expected.items():
        assert set(bad["kinds"][kind]["statuses"]) == {status}, (kind, bad["kinds"][kind])


def test_the_soak_exit_status_and_verdict_agree(report):
    assert report["verdict"]["ok"], report["verdict"]
