"""Accuracy, calibration (ECE) and forgetting, as the benchmark and the service report them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ECE_BINS = 15


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((logits.argmax(1) == labels.to(logits.device)).float().mean())


@dataclass
class CalibrationAccumulator:
    """Streaming ECE: per-bin sample count, summed confidence and summed correctness.

    15 equal-width bins over max-softmax confidence; ECE = sum over bins of
    (bin mass) * |accuracy - mean confidence|, reported in percent.
    """

    bins: int = ECE_BINS
    count: torch.Tensor = field(init=False)
    confidence: torch.Tensor = field(init=False)
    correct: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.bins, dtype=torch.float64)
        self.confidence = torch.zeros(self.bins, dtype=torch.float64)
        self.correct = torch.zeros(self.bins, dtype=torch.float64)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        conf = confidence.detach().double().cpu().flatten()
        hit = correct.detach().double().cpu().flatten()
        # Bin i holds (i/bins, (i+1)/bins]; confidence 0 goes to the first bin.
        index = (torch.ceil(conf * self.bins).long() - 1).clamp(0, self.bins - 1)
        self.count.index_add_(0, index, torch.ones_like(conf))
        self.confidence.index_add_(0, index, conf)
        self.correct.index_add_(0, index, hit)

    def add_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        probs = logits.detach().softmax(1)
        conf, pred = probs.max(1)
        self.add(conf, pred.cpu() == labels.cpu())

    @property
    def samples(self) -> int:
        return int(self.count.sum())

    def ece(self) -> float:
        """Expected calibration error in percent (0 when empty)."""
        total = self.count.sum()
        if total == 0:
            return 0.0
        used = self.count > 0
        gap = (self.correct[used] - self.confidence[used]).abs()
        return 100.0 * float(gap.sum() / total)

    def accuracy(self) -> float:
        total = self.count.sum()
        return 0.0 if total == 0 else 100.0 * float(self.correct.sum() / total)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent of a batch of logits against true labels."""
    acc = CalibrationAccumulator(bins)
    acc.add_logits(logits, labels)
    return acc.ece()


def forgetting(adapted_clean_accuracy: float, source_clean_accuracy: float) -> float:
    """Clean accuracy of the adapted model minus the source model's (negative = forgotten), in points."""
    return adapted_clean_accuracy - source_clean_accuracy
