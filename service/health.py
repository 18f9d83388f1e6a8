"""Label-free and labelled health signals of an adapting model: collapse, forgetting, agreement.

Unsupervised adaptation can collapse (every input mapped to one class), forget the source task or
grow over-confident, and nothing in the request path says so. The engine keeps three instruments,
all read by the API (``GET /v1/models/{name}/adaptation``, ``health``) and by the Prometheus
collector from the same snapshot, so the two always agree:

* :class:`PredictionWindow`: the last N served predictions -> entropy of the predicted-class
  distribution (low = collapse) and mean confidence.
* :class:`SourceAgreement`: a sampled share of served batches re-run through the frozen source model,
  exported to ONNX at start-up and run by onnxruntime on its own thread (bounded queue, dropped and
  counted when busy), so it never competes for the model's worker -> agreement rate.
* :class:`ProbeSet`: labelled clean images evaluated with the adapted weights (no update) and with
  the source model -> probe accuracies and their gap (forgetting).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from service.onnx_export import exporting
from service.probe_inputs import probe_images

log = logging.getLogger(__name__)

ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-3  # max |onnxruntime - PyTorch| logits, relative to their scale, accepted at export


#: Batches smaller than this say little about how many classes the traffic mixes.
DIVERSITY_MIN_BATCH = 4
#: Served batches averaged into the class-diversity ratio.
DIVERSITY_BATCHES = 64


def distinct_class_ratio(batch_labels: list[int], window: Counter[int], window_size: int) -> float:
    """Distinct predicted classes in a batch over the number expected if its images were drawn
    independently from the recent traffic's class mix: about 1 for shuffled traffic at any batch size,
    about 1/k when each batch holds one of k equally likely classes (a camera that sees one kind of
    object at a time). Label-free: it reads predictions only. Not the adapters' relative class diversity
    (``adapters.correlation``, an entropy ratio that gates updates and LAME per batch): this count separates
    one-class batches more sharply (about 0.1 against 0.5-0.7), which an alert needs."""
    n = len(batch_labels)
    expected = sum(1.0 - (1.0 - count / window_size) ** n for count in window.values())
    return len(set(batch_labels)) / max(expected, 1.0)


class PredictionWindow:
    """The last ``size`` served predictions (label, confidence), and how class-correlated the recent
    batches are (:func:`distinct_class_ratio`, averaged over the last ``DIVERSITY_BATCHES``); thread-safe."""

    def __init__(self, size: int) -> None:
        self._recent: deque[tuple[int, float]] = deque(maxlen=size)
        self._counts: Counter[int] = Counter()
        self._diversity: deque[float] = deque(maxlen=DIVERSITY_BATCHES)
        self._lock = threading.Lock()

    def add(self, labels: torch.Tensor, confidence: torch.Tensor) -> None:
        """One served batch's predictions."""
        batch = labels.tolist()
        with self._lock:
            for pair in zip(batch, confidence.tolist(), strict=True):
                if len(self._recent) == self._recent.maxlen:
                    self._counts[self._recent[0][0]] -= 1
                self._recent.append(pair)
                self._counts[pair[0]] += 1
            if len(batch) >= DIVERSITY_MIN_BATCH:
                window = +self._counts  # drops classes whose count fell to zero
                self._diversity.append(distinct_class_ratio(batch, window, len(self._recent)))

    def clear(self) -> None:
        with self._lock:
            self._recent.clear()
            self._counts.clear()
            self._diversity.clear()

    def summary(self) -> dict[str, Any]:
        """Samples in the window, entropy (nats) of its predicted-class distribution, mean confidence."""
        with self._lock:
            recent = list(self._recent)
            counts = +self._counts
            diversity = sum(self._diversity) / len(self._diversity) if self._diversity else None
        if not recent:
            return {"prediction_window_samples": 0, "predicted_class_entropy_nats": None,
                    "mean_confidence_ratio": None, "batch_distinct_classes_ratio": None}
        n = len(recent)
        class_entropy = -sum(c / n * math.log(c / n) for c in counts.values())
        return {
            "prediction_window_samples": n,
            "predicted_class_entropy_nats": max(class_entropy, 0.0),
            "mean_confidence_ratio": sum(conf for _, conf in recent) / n,
            "batch_distinct_classes_ratio": diversity,
        }


class MeanWindow:
    """The mean of the last ``size`` values (EATA-C's per-prediction divergence); thread-safe."""

    def __init__(self, size: int) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, values: list[float]) -> None:
        with self._lock:
            self._values.extend(values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def mean(self) -> float | None:
        """None while empty (not measured: a method without the value, or nothing served yet)."""
        with self._lock:
            return sum(self._values) / len(self._values) if self._values else None


# ------------------------------------------------------------------------------------ source agreement
def export_onnx(module: nn.Module, input_size: tuple[int, int]) -> bytes:
    """A CPU copy of ``module`` (float NCHW in [0, 1] -> logits) as ONNX bytes with a dynamic batch axis.

    The TorchScript-based exporter (``dynamo=False``) works offline and needs no ``onnxscript``.
    """
    frozen = copy.deepcopy(module).cpu().eval()
    buffer = io.BytesIO()
    with exporting():  # one export at a time: two models start their agreement checks together
        torch.onnx.export(
            frozen, (probe_images(2, input_size),), buffer, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
        )
    return buffer.getvalue()


class SourceAgreement:
    """How often the served (adapted) answers agree with the frozen source model's, label-free.

    High agreement with rising confidence is healthy; agreement falling while confidence rises means
    the model is trusting itself away from what it knew (collapse or forgetting). Under a strong
    shift some disagreement is the point of adapting, so read it next to the probe and feedback.
    """

    def __init__(
        self,
        module: nn.Module,
        input_size: tuple[int, int],
        *,
        fraction: float,
        window: int,
        queue_size: int = 2,
    ) -> None:
        self.fraction = fraction
        self._credit = 1.0  # systematic sampling: the first batch, then every 1/fraction-th
        self._module = module
        self._input_size = input_size
        self._queue_size = queue_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tta-agreement")
        self._pending = 0
        self._lock = threading.Lock()
        self._recent: deque[bool] = deque(maxlen=window)
        self._session: Any = None
        self.up: bool | None = None  # None until the export has finished
        self.error: str | None = None
        self.checked_samples = 0
        self.dropped_batches = 0
        self.ready: Future = self._pool.submit(self._prepare)

    def _prepare(self) -> None:
        """Export the source model and open an onnxruntime session; on failure log, flag, keep serving."""
        try:
            import onnxruntime as ort

            model = export_onnx(self._module, self._input_size)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # leave the cores to the model's worker
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            probe = probe_images(4, self._input_size)
            with torch.no_grad():
                expected = copy.deepcopy(self._module).cpu().eval()(probe).numpy()
            (got,) = session.run(None, {"images": probe.numpy()})
            gap = float(np.abs(got - expected).max()) / max(float(np.abs(expected).max()), 1.0)
            if gap > ONNX_TOLERANCE:
                raise ValueError(f"onnxruntime disagrees with PyTorch by {gap:.2g} (relative)")
        except Exception as exc:  # the exporter and onnxruntime raise many types for unsupported operators
            self.up, self.error = False, f"{type(exc).__name__}: {exc}"
            log.error("source agreement off: cannot run the source model with onnxruntime (%s)", self.error)
            return
        self._session, self.up = session, True
        self._module = None  # the session is all that is needed from now on

    def offer(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Maybe check this served batch (worker thread): sampled, and dropped when the queue is full."""
        if self.up is False:
            return
        self._credit += self.fraction
        if self._credit < 1.0:
            return
        self._credit -= 1.0
        with self._lock:
            if self._pending >= self._queue_size:
                self.dropped_batches += 1
                return
            self._pending += 1
        try:
            self._pool.submit(self._check, images.detach().cpu().float(), labels.detach().cpu())
        except RuntimeError:  # stopped
            with self._lock:
                self._pending -= 1

    def _check(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        try:
            if self._session is None:
                return
            (logits,) = self._session.run(None, {"images": np.ascontiguousarray(images.numpy())})
            agree = (torch.from_numpy(logits).argmax(1) == labels).tolist()
            with self._lock:
                self._recent.extend(agree)
                self.checked_samples += len(agree)
        except Exception:  # never let a monitoring fault reach serving
            log.exception("source agreement check failed")
        finally:
            with self._lock:
                self._pending -= 1

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until queued checks are done (tests, and a clean read after a burst)."""
        deadline = time.monotonic() + timeout
        self.ready.result(timeout)
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending == 0:
                    return
            time.sleep(0.01)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            n, agreeing = len(self._recent), sum(self._recent)
            checked, dropped = self.checked_samples, self.dropped_batches
        return {
            "source_agreement_up": self.up,
            "source_agreement_error": self.error,
            "source_agreement_ratio": agreeing / n if n else None,
            "source_agreement_window_samples": n,
            "source_agreement_checked_samples_total": checked,
            "source_agreement_dropped_batches_total": dropped,
        }

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------ probe set
@dataclass
class ProbeResult:
    adapted: float
    source: float
    samples: int
    evaluated_at: float


class ProbeSet:
    """Labelled in-distribution images: accuracy of the adapted weights (in their adaptation
    configuration, no update) minus the source model's accuracy is the forgetting gap."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError(f"probe set: {images.shape[0]} images for {labels.shape[0]} labels")
        self.images = images
        self.labels = labels
        self.source_accuracy: float | None = None  # the source never changes: evaluated once

    @classmethod
    def from_npz(cls, path: Path, size: int, input_size: tuple[int, int]) -> ProbeSet:
        from adapters.datasets import load_images, to_tensor

        x, y = load_images(path)
        if tuple(x.shape[1:3]) != tuple(input_size):
            raise ValueError(f"probe_data {path}: images are {x.shape[1]}x{x.shape[2]}, the model takes "
                             f"{input_size[0]}x{input_size[1]}")
        return cls(to_tensor(x[:size]), torch.from_numpy(y[:size]))

    def chunks(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Near-equal batches of at most ``batch_size``: no tiny last batch (batch statistics)."""
        k = -(-self.images.shape[0] // batch_size)
        return list(zip(self.images.tensor_split(k), self.labels.tensor_split(k), strict=True))

    @staticmethod
    def correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
        return int((logits.argmax(1).cpu() == labels).sum())
