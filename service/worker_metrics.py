"""One Prometheus scrape for every worker process (``tta-serve serve --workers N``).

The kernel hands a scrape of the shared port to one worker, picked per connection, so a worker that
reported only its own series would show Prometheus a different process at each scrape: counters
would jump back and forth. Instead each worker also listens on a unix socket in the run directory,
and the worker that answers ``/metrics`` collects the others' own series there (``/metrics?scope=worker``)
and returns all of them, each with a ``worker`` label, plus ``tta_worker_up{worker}`` (0: that worker
did not answer within ``timeout_s``, e.g. while it restarts; its series are missing from that scrape).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

WORKER_SCOPE = "worker"  # ``/metrics?scope=worker``: this worker's series only, unlabelled


def socket_path(run_dir: Path, worker: int) -> Path:
    """Where worker ``worker`` listens for its siblings (the run directory is private to the user)."""
    return run_dir / f"worker-{worker}.sock"


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge(parts: dict[int, str | None]) -> bytes:
    """Every worker's exposition text as one, each sample labelled with its worker; None: no answer."""
    families: dict[str, Metric] = {}
    for worker, text in sorted(parts.items()):
        for family in text_string_to_metric_families(text or ""):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [s._replace(labels={**s.labels, "worker": str(worker)}) for s in family.samples]
    up = GaugeMetricFamily("tta_worker_up", "1: this worker's series are in the scrape; 0: it did not answer "
                           "(starting or restarting)", labels=["worker"])
    for worker, text in sorted(parts.items()):
        up.add_metric([str(worker)], 0.0 if text is None else 1.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), up]))
    return generate_latest(registry)


class WorkerMetrics:
    """Gathers the sibling workers' series for this worker's ``/metrics``."""

    def __init__(self, run_dir: Path, worker: int, count: int, timeout_s: float = 2.0) -> None:
        self.run_dir = run_dir
        self.worker = worker
        self.count = count
        self.timeout_s = timeout_s

    async def render(self, own: bytes) -> bytes:
        others = [w for w in range(self.count) if w != self.worker]
        texts = await asyncio.gather(*(self._fetch(w) for w in others))
        return merge({self.worker: own.decode(), **dict(zip(others, texts, strict=True))})

    async def _fetch(self, worker: int) -> str | None:
        transport = httpx.AsyncHTTPTransport(uds=str(socket_path(self.run_dir, worker)))
        try:
            async with httpx.AsyncClient(transport=transport, timeout=self.timeout_s) as client:
                response = await client.get("http://worker/metrics", params={"scope": WORKER_SCOPE})
                response.raise_for_status()
                return response.text
        except httpx.HTTPError as exc:
            log.warning("metrics: worker %s did not answer (%s); its series are missing from this scrape",
                        worker, exc or type(exc).__name__)
            return None
