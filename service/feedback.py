"""Delayed-label feedback: which label each recent request id got, and the labelled window it feeds.

Clients learn true labels later (a person checks, a downstream system confirms). They quote the
request id an answer carried; the ledger turns those into a rolling accuracy and calibration error
(ECE) over the newest ``window`` labelled answers. Thread-safe: the model thread records answers while
routes report labels and scrapes read the numbers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

import adapters
from service.errors import InvalidInput, UnknownRequestIds


@dataclass(frozen=True)
class OnlineCalibration:
    """Accuracy and ECE as ratios (0-1) over the labelled window; None before any label arrived."""

    labelled: int
    accuracy: float | None
    ece: float | None


class FeedbackLedger:
    """The newest ``memory`` answers by request id, and the newest ``window`` labelled ones."""

    def __init__(self, num_classes: int, window: int = 1000, memory: int = 100_000) -> None:
        self.num_classes = num_classes
        self._answers: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._memory = memory
        self._labelled: deque[tuple[float, bool]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def remember(self, answers: Iterable[tuple[str, int, float]]) -> None:
        """Keep (label, confidence) by request id (model thread), forgetting the oldest beyond ``memory``."""
        with self._lock:
            for request_id, label, confidence in answers:
                self._answers[request_id] = (label, confidence)
            while len(self._answers) > self._memory:
                self._answers.popitem(last=False)

    def record(self, labels: dict[str, int]) -> int:
        """True labels for earlier request ids; all-or-nothing, so a typo never half-applies."""
        bad = {rid: lab for rid, lab in labels.items() if not 0 <= lab < self.num_classes}
        if bad:
            raise InvalidInput(f"labels out of range 0..{self.num_classes - 1}: {bad}")
        with self._lock:
            unknown = [rid for rid in labels if rid not in self._answers]
            if unknown:
                raise UnknownRequestIds(unknown)
            for rid, true_label in labels.items():
                predicted, confidence = self._answers.pop(rid)
                self._labelled.append((confidence, predicted == true_label))
        return len(labels)

    def calibration(self) -> OnlineCalibration:
        """Rolling accuracy and ECE over the labelled window."""
        with self._lock:
            labelled = list(self._labelled)
        if not labelled:
            return OnlineCalibration(0, None, None)
        acc = adapters.CalibrationAccumulator()
        acc.add(torch.tensor([c for c, _ in labelled]), torch.tensor([h for _, h in labelled]))
        return OnlineCalibration(len(labelled), acc.accuracy() / 100, acc.ece() / 100)
