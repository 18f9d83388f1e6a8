"""The frozen fast path: a classifier that never adapts, exported to ONNX and run by onnxruntime.

A model configured with ``method: source`` and ``runtime: onnx`` is loaded as usual (so weights,
normalisation and class names are checked the same way), exported in memory with the TorchScript-
based exporter, checked against PyTorch on random inputs, and wrapped in :class:`OnnxModule`: an
``nn.Module`` whose forward calls onnxruntime, so the engine, batching and routes serve it unchanged.
"""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service.errors import ModelLoadError
from service.model_sources import LoadedModel
from service.onnx_export import exporting
from service.probe_inputs import probe_images
from service.settings import ModelConfig

TOLERANCE = 1e-3  # max |ONNX - PyTorch| logits, relative to their scale


class OnnxExportError(ModelLoadError):
    """The model cannot be exported, or onnxruntime disagrees with PyTorch on it."""


def export_classifier(module: nn.Module, input_size: tuple[int, int], opset: int = 17) -> bytes:
    """The module (float NCHW in [0, 1] -> logits) as ONNX bytes with a dynamic batch axis."""
    buffer = io.BytesIO()
    example = probe_images(2, input_size)
    with exporting():
        torch.onnx.export(
            module.cpu().eval(), (example,), buffer, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    return buffer.getvalue()


def classifier_session(model: bytes, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    # Idle intra-op threads block instead of spinning: they share the cores with the HTTP event loop.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """Runs an onnxruntime session as a module: float tensor in, logits tensor out (on the input's device).

    It has no parameters; copies share the session (onnxruntime sessions are safe to call from
    several threads), so the engine's deep copies of the model cost nothing.
    """

    def __init__(self, session: ort.InferenceSession) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run(None, {self.input_name: pixels})
        return torch.from_numpy(logits).to(x.device)

    def __deepcopy__(self, memo: dict) -> OnnxModule:
        return OnnxModule(self.session)


def to_onnx_runtime(config: ModelConfig, loaded: LoadedModel, threads: int | None = None) -> LoadedModel:
    """The loaded model served by onnxruntime instead of PyTorch; raises if the two disagree."""
    module = loaded.module.cpu().eval()
    try:
        session = classifier_session(export_classifier(module, config.input_size), threads)
    except Exception as exc:  # the exporter and onnxruntime raise many types for unsupported operators
        message = f"model {config.name!r}: cannot serve with onnxruntime ({type(exc).__name__}: {exc})"
        raise OnnxExportError(message) from exc
    onnx_module = OnnxModule(session)
    probe = probe_images(4, config.input_size)
    with torch.no_grad():
        expected = module(probe)
    got = onnx_module(probe)
    diff = float((got - expected).abs().max())
    scale = max(float(expected.abs().max()), 1e-6)
    if not diff <= TOLERANCE * scale:
        raise OnnxExportError(f"model {config.name!r}: onnxruntime and PyTorch logits differ by {diff:.3g}")
    return LoadedModel(onnx_module, loaded.classes, None, runtime="onnx")
