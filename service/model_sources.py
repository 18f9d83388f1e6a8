"""Build the served nn.Module from a model configuration: built-in, TorchScript or ``module:factory``.

Weights always load with ``weights_only=True`` (or safetensors): nothing is unpickled from files.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import adapters
from adapters.datasets import load_images, to_tensor
from adapters.models import CheckpointError, Normalized, build_cifar_resnet, load_state_dict_file, load_weights
from adapters.models.digits import DIGIT_CLASSES, digits_split, load_digits_model
from service.errors import ModelLoadError
from service.probe_inputs import probe_images
from service.settings import ModelConfig

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class LoadedModel:
    """The module to serve (inputs: float NCHW in [0, 1]), its class names and Fisher information."""

    module: nn.Module
    classes: list[str]
    fisher: adapters.FisherInfo | None
    #: EATA-C's confidence map fitted at start-up (None where none is fitted, ModelConfig.fits_confidence_map).
    confidence_map: tuple[float, float] | None = None
    #: What runs ``module``: "torch", or "onnx" for the frozen fast path (service.onnx_classifier).
    runtime: str = "torch"


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available; an explicit CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available")
    return device


def _build_module(config: ModelConfig) -> nn.Module:
    if config.architecture == "digits":
        return load_digits_model()
    if config.architecture is not None:
        return build_cifar_resnet(config.architecture, config.weights)
    if config.torchscript is not None:
        if not config.torchscript.is_file():
            raise FileNotFoundError(f"TorchScript file not found: {config.torchscript}")
        return torch.jit.load(str(config.torchscript), map_location="cpu")
    module_name, _, attr = config.factory.partition(":")  # type: ignore[union-attr]
    factory = getattr(importlib.import_module(module_name), attr)
    module = factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"factory {config.factory} returned {type(module).__name__}, not an nn.Module")
    return module


def _default_classes(config: ModelConfig, num_outputs: int) -> list[str]:
    if config.classes is not None:
        return list(config.classes)
    if config.architecture == "digits":
        return list(DIGIT_CLASSES)
    if config.architecture is not None:
        return list(CIFAR10_CLASSES)
    return [str(i) for i in range(num_outputs)]


def _clean_data(config: ModelConfig, path: Path | None) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Clean labelled images for start-up estimates: ``path``, else the built-in digits model's clean split
    (it ships its data), else None; with a description for the logs."""
    if path is not None:
        x, y = load_images(path)
        return x, y, str(path)
    if config.architecture == "digits":
        (x, y), _ = digits_split()
        return x, y, "the digits model's clean split"
    return None


def _fisher(config: ModelConfig, module: nn.Module) -> adapters.FisherInfo | None:
    if not adapters.METHODS[config.method].uses_fisher:
        return None
    if config.fisher is not None:
        return adapters.FisherInfo.load(config.fisher, module)
    data = _clean_data(config, config.fisher_data)
    if data is not None:
        return adapters.estimate_fisher(module, to_tensor(data[0][: config.fisher_size]))
    log.warning("model %s: no Fisher information configured; EATA runs without its anti-forgetting term",
                config.name)
    return None


def _confidence_map(config: ModelConfig, module: nn.Module) -> tuple[float, float] | None:
    """Fit EATA-C's confidence map on labelled clean data (``confidence_data``, else ``fisher_data``, else the
    digits model's clean split), answering as EATA-C does before it adapts."""
    if not config.fits_confidence_map:
        if adapters.wants_fitted_confidence_map(config.method, config.options):  # no labelled clean data
            log.warning("model %s: eata-c has no labelled clean data to fit its confidence map (confidence_data or "
                        "fisher_data); answers carry the full network's uncalibrated confidence", config.name)
        return None
    from adapters.confidence_map import fit_confidence_map_on_images

    data = _clean_data(config, config.confidence_data or config.fisher_data)
    assert data is not None  # fits_confidence_map checked that there is some
    x, y, source = data
    x, y = x[: config.confidence_size], y[: config.confidence_size]
    batch_size = max(2, min(64, config.max_batch_size))
    confidence_map = fit_confidence_map_on_images(module, to_tensor(x), torch.as_tensor(y), batch_size)
    log.info("model %s: eata-c confidence map fitted on %d clean images of %s: a=%.4f b=%.4f", config.name, len(y),
             source, *confidence_map)
    return confidence_map


def load_model(config: ModelConfig, device: torch.device) -> LoadedModel:
    """Build, load and check a configured model; every failure becomes a :class:`ModelLoadError`."""
    try:
        module = _build_module(config)
        if config.weights is not None and config.architecture is None:
            load_weights(module, load_state_dict_file(config.weights), source=str(config.weights))
        if config.mean is not None and config.std is not None:
            module = Normalized(module, config.mean, config.std)
        module = module.eval()
        with torch.no_grad():
            probe = module(probe_images(2, config.input_size))
        if probe.dim() != 2:
            raise ValueError(f"the model must return N x classes logits, got shape {tuple(probe.shape)}")
        classes = _default_classes(config, probe.shape[1])
        if len(classes) != probe.shape[1]:
            raise ValueError(f"{len(classes)} class names configured but the model has {probe.shape[1]} outputs")
        fisher = _fisher(config, module)
        confidence_map = _confidence_map(config, module)
        module = module.to(device)
        if config.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return LoadedModel(module, classes, fisher, confidence_map)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError, AttributeError, CheckpointError) as exc:
        raise ModelLoadError(f"model {config.name!r}: {exc}") from exc
