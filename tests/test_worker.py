"""The model thread's scheduling: batches form when the model is free, admin jobs first, adaptation last."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from service.worker import ADAPT, PREDICT, BatchPolicy, ModelWorker


@dataclass
class Req:
    size: int
    name: str = ""
    enqueued: float = field(default_factory=time.perf_counter)


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []
        self.lock = threading.Lock()

    def serve(self, batch: list[Req]) -> None:
        with self.lock:
            self.events.append([r.name for r in batch])

    def job(self, name: str):
        def run() -> str:
            with self.lock:
                self.events.append(name)
            return name
        return run


def blocked_worker(policy: BatchPolicy) -> tuple[ModelWorker, Recorder, threading.Event]:
    """A worker busy with a job until the returned event is set."""
    recorder = Recorder()
    worker = ModelWorker("t", policy, recorder.serve)
    release, running = threading.Event(), threading.Event()
    worker.submit(lambda: (running.set(), release.wait(10)))
    assert running.wait(10)
    return worker, recorder, release


def test_requests_that_arrive_while_the_model_is_busy_leave_as_one_batch():
    worker, recorder, release = blocked_worker(BatchPolicy(max_batch=64, max_delay_s=0.0))
    for i in range(5):
        worker.put_request(Req(1, f"r{i}"))
    release.set()
    worker.stop()
    assert recorder.events == [["r0", "r1", "r2", "r3", "r4"]]


def test_batches_never_exceed_max_batch_and_keep_arrival_order():
    worker, recorder, release = blocked_worker(BatchPolicy(max_batch=4, max_delay_s=0.0))
    for i, size in enumerate([2, 1, 2, 3, 1]):
        worker.put_request(Req(size, f"r{i}"))
    release.set()
    worker.stop()
    assert recorder.events == [["r0", "r1"], ["r2"], ["r3", "r4"]]


def test_admin_jobs_run_before_waiting_requests_and_adaptation_after_them():
    worker, recorder, release = blocked_worker(BatchPolicy(max_batch=64, max_delay_s=0.0))
    adapt = worker.submit(recorder.job("adapt"), ADAPT)
    worker.put_request(Req(1, "r0"))
    admin = worker.submit(recorder.job("admin"), PREDICT)
    release.set()
    assert admin.result(10) == "admin" and adapt.result(10) == "adapt"
    worker.stop()
    assert recorder.events == ["admin", ["r0"], "adapt"]


def test_stop_serves_the_requests_still_waiting():
    worker, recorder, release = blocked_worker(BatchPolicy(max_batch=64, max_delay_s=5.0, wait_from_free=True))
    worker.put_request(Req(1, "late"))
    release.set()
    worker.stop(timeout=2)  # the delay would hold it for 5 s: stopping serves it at once
    assert recorder.events == [["late"]]
    assert not worker.alive


def test_a_failing_batch_does_not_stop_the_worker():
    calls: list[int] = []
    first_done = threading.Event()

    def serve(batch: list[Req]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            first_done.set()
            raise RuntimeError("boom")

    worker = ModelWorker("t", BatchPolicy(max_batch=8, max_delay_s=0.0), serve)
    worker.put_request(Req(1))
    assert first_done.wait(10)
    worker.put_request(Req(1))
    worker.stop()
    assert calls == [1, 1]


def test_a_saturated_model_still_adapts_within_its_reserved_share():
    def order_of_adaptation(min_share: float) -> int:
        """How many batches were served before the adaptation job ran, with 50 one-image batches waiting."""
        policy = BatchPolicy(max_batch=1, max_delay_s=0.0, adapt_share=0.5, adapt_min_share=min_share)
        worker, recorder, release = blocked_worker(policy)
        slow_serve = recorder.serve

        def serve(batch: list[Req]) -> None:
            time.sleep(0.002)  # every batch takes time, so the reserved budget accrues
            slow_serve(batch)

        worker._serve_batch = serve
        for i in range(50):
            worker.put_request(Req(1, f"r{i}"))
        done = worker.submit(recorder.job("adapt"), ADAPT)
        release.set()
        done.result(10)
        worker.stop()  # stopping serves what still waits
        return recorder.events.index("adapt")

    assert order_of_adaptation(0.0) == 50  # spare capacity only: after every waiting request
    assert order_of_adaptation(0.2) < 50  # reserved share: ahead of requests that still wait


def test_a_saturated_model_adapts_on_its_share_of_the_served_images():
    """adapt_traffic_share 0.25: a step on 8 images is earned by 32 served images (4 batches of 8), however
    fast those batches are served; without a reserved share it waits for every queued request."""

    def batches_served_before_the_step(traffic_share: float) -> int:
        policy = BatchPolicy(max_batch=8, max_delay_s=0.0, adapt_share=0.5, adapt_traffic_share=traffic_share)
        worker, recorder, release = blocked_worker(policy)
        for i in range(12):
            worker.put_request(Req(8, f"r{i}"))
        done = worker.submit(recorder.job("adapt"), ADAPT, images=8)
        release.set()
        done.result(10)
        worker.stop()
        return recorder.events.index("adapt")

    assert batches_served_before_the_step(0.25) == 4
    assert batches_served_before_the_step(0.5) == 2
    assert batches_served_before_the_step(0.0) == 12
