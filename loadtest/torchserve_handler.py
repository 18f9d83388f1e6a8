"""TorchServe handler for the side-by-side benchmark: the project's ResNet-20, fed raw uint8 pixels.

Runs inside a TorchServe worker (loadtest/torchserve.py archives it), not in tta-serve. Each request
body is one CIFAR image as raw uint8 HxWx3 bytes (3072 bytes, the pixels of tta-serve's binary v2 UINT8
request without its JSON header); TorchServe batches up to ``batchSize`` of them. The model is built by
the project's own ``build_cifar_resnet`` with the same weights, and the pixels go through the same
uint8 -> [0, 1] conversion as tta-serve's, so both servers run the same forward pass. The answer per
image is JSON: the class index and its 10 logits.

``model-config.yaml``'s ``handler`` section names the repository to import from, the weights file,
the architecture and the torch threads of this worker.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch


class CifarUint8Handler:
    """TorchServe's custom-handler protocol: ``initialize(context)`` once, ``handle(data, context)`` per batch."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.shape = (32, 32, 3)
        self.to_tensor: Any = None

    def initialize(self, context: Any) -> None:
        config = context.model_yaml_config["handler"]
        torch.set_num_threads(int(config.get("threads", 1)))
        if config["repo"] not in sys.path:
            sys.path.insert(0, config["repo"])
        from adapters.models import build_cifar_resnet
        from service.preprocess import uint8_nhwc_to_tensor

        self.to_tensor = uint8_nhwc_to_tensor
        self.model = build_cifar_resnet(config.get("architecture", "resnet20"), config["weights"]).eval()
        size = int(config.get("image_size", 32))
        self.shape = (size, size, 3)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        assert self.model is not None, "initialize() was not called"
        rows = []
        for request in data:
            body = request.get("body", request.get("data"))
            pixels = np.frombuffer(bytes(body), dtype=np.uint8)
            if pixels.size != np.prod(self.shape):
                raise ValueError(f"expected {np.prod(self.shape)} raw uint8 bytes (HxWx3), got {pixels.size}")
            rows.append(pixels.reshape(self.shape))
        with torch.inference_mode():
            logits = self.model(self.to_tensor(np.stack(rows)))
        classes = logits.argmax(dim=1).tolist()
        return [{"class": c, "logits": row} for c, row in zip(classes, logits.tolist(), strict=True)]


_service = CifarUint8Handler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    """Module-level entry point TorchServe calls (``None`` data: the worker's initial load)."""
    if _service.model is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
