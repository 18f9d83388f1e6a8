"""The model-thread ceiling benchmark measures each mode's engine as the server builds it."""

from __future__ import annotations

import pytest
import torch

from benchmarks.data import cifar10_test_path
from loadtest.model_thread_cost import measure_mode


@pytest.fixture(autouse=True)
def _keep_threads():
    """measure_mode configures torch as the server would (its thread count): restore the suite's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_sync_engine_reports_its_answer_and_its_slower_adaptation_step(resnet20_weights):
    rates = measure_mode("sync", resnet20_weights, cifar10_test_path(), seconds=0.3, contend="thread")
    assert rates["threads"] >= 1
    assert 0 < rates["step"] < rates["answer"]  # a step adds a backward pass to the answer's forward


def test_a_frozen_engine_has_no_step(resnet20_weights):
    rates = measure_mode("off", resnet20_weights, cifar10_test_path(), seconds=0.2, contend=None)
    assert rates["answer"] > 0 and "step" not in rates
