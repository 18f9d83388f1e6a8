"""Random probe images for export and agreement checks that leave the process's global RNG alone.

These checks run in background threads (the source-agreement export starts with the engine); drawing from
``torch``'s global generator there would interleave with whatever the user or another model seeds, so
two identically seeded model builds could come out different. A private generator keeps them apart.
"""

from __future__ import annotations

import torch


def probe_images(count: int, input_size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``count`` uniform [0, 1) images of ``input_size``, drawn from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, *input_size, generator=generator)
