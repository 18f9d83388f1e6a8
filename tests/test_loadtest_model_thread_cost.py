"""The model-thread ceiling benchmark (loadtest/model_thread_cost.py) measures each mode's engine as the
server builds it. ``loadtest`` is a checkout tool, not part of the installed package, so the command runs
as a subprocess from the checkout (as tests/test_loadtest_side_by_side.py does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.data import cifar10_test_path

REPO = Path(__file__).resolve().parents[1]


def test_the_one_command_reports_answers_and_a_slower_step_for_each_mode(tmp_path, resnet20_weights):
    out = tmp_path / "cost.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.model_thread_cost", "--modes", "off,sync", "--seconds", "0.3",
         "--contend", "thread", "--weights", str(resnet20_weights), "--data", str(cifar10_test_path()),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "beside a busy thread" in done.stdout
    report = json.loads(out.read_text())
    off, sync = report["modes"]["off"], report["modes"]["sync"]
    assert report["plain"] > 0 and report["contend"] == "thread"
    assert off["answer"] > 0 and "step" not in off  # a frozen model has no step
    assert 0 < sync["step"] < sync["answer"]  # a step adds a backward pass to the answer's forward
