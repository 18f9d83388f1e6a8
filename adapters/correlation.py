"""Label-free signs that a batch is class-correlated (one camera scene, one kind of object).

An i.i.d. batch of 64 CIFAR-10 images covers nearly every class; a batch cut from a class-sorted
stream holds one or two. The entropy of the batch's predicted-class histogram, divided by its
maximum, tells them apart without labels: about 0.9 for i.i.d. batches of 64, near 0 for one class.
"""

from __future__ import annotations

import math

import torch


def class_diversity(logits: torch.Tensor) -> float:
    """Entropy of the histogram of predicted classes over its maximum, ln(min(N, C)), in [0, 1].

    1.0 when the batch's predictions are spread as evenly as N samples allow; 0.0 when one class
    takes every sample. A batch of one sample counts as fully diverse (nothing to judge).
    """
    n, num_classes = logits.shape
    if n < 2 or num_classes < 2:
        return 1.0
    counts = torch.bincount(logits.argmax(1), minlength=num_classes).float()
    p = counts[counts > 0] / n
    return max(0.0, float(-(p * p.log()).sum()) / math.log(min(n, num_classes)))
