"""Latency the Redis round trips add to one adaptation step (median and p99).

    python -m loadtest.redis_overhead [--steps 300] [--redis-url redis://127.0.0.1:6379/0]

Per step a leader replica reads the shared moving average, blends its update in (Lua), and publishes
its adapted parameters and optimiser state (safetensors bytes, Lua + PUBLISH). This times exactly
those calls for CIFAR ResNet-20 (batch 200, EATA) next to the step itself, with the in-process store
as the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import numpy as np
import torch

import adapters
from adapters.models import build_cifar_resnet
from benchmarks.data import checkpoint_path
from service.redis_state import ParameterChannel, RedisConnection, RedisProbabilityCache


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_cifar_resnet("resnet20", checkpoint_path("resnet20"))
    connection = RedisConnection(args.redis_url)
    name = f"overhead-{uuid.uuid4().hex[:8]}"
    cache = RedisProbabilityCache(connection, name)
    channel = ParameterChannel(connection, name)
    adapter = adapters.create("eata", model, prob_cache=cache)
    x = torch.rand(200, 3, 32, 32)
    adapter.step(x)
    get_ms, update_ms, publish_ms = [], [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        cache.get()
        get_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        cache.update(torch.rand(10).softmax(0), 0.9)
        update_ms.append((time.perf_counter() - start) * 1000)
        state = {"method": adapter.name, "model_hash": adapter.source_hash, "params": adapter.adapted_parameters(),
                 "optimizer": adapter.optimizer.state_dict()}
        start = time.perf_counter()
        channel.publish(state)
        publish_ms.append((time.perf_counter() - start) * 1000)
    step_ms = []
    for _ in range(10):
        start = time.perf_counter()
        adapter.step(x)
        step_ms.append((time.perf_counter() - start) * 1000)
    total = [a + b + c for a, b, c in zip(get_ms, update_ms, publish_ms, strict=True)]
    print(f"{'per step':32s} {'median ms':>10s} {'p99 ms':>8s}")
    for label, values in (("read moving average (GET)", get_ms), ("blend moving average (Lua)", update_ms),
                          ("publish parameters (Lua+PUBLISH)", publish_ms), ("all Redis round trips", total),
                          ("the EATA step itself (batch 200)", step_ms)):
        print(f"{label:32s} {statistics.median(values):10.2f} {percentile(values, 99):8.2f}")
    connection.client.delete(*connection.client.keys(f"tta:{name}:*"))


if __name__ == "__main__":
    main()
