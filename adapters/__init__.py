"""Test-time adaptation algorithms as plain PyTorch: source, norm, tent, eata, eata-c.

Usage::

    import adapters
    adapter = adapters.create("eata", model, fisher_data=clean_images)
    result = adapter.step(batch)       # logits before this batch's update, plus per-sample flags
"""

from adapters import methods as _methods  # noqa: F401  (registers every method)
from adapters.base import (
    Adapter,
    AdapterOptions,
    AdapterStats,
    BatchStatisticsOptions,
    OptimizedOptions,
    PredictionCallback,
    StepResult,
    entropy,
)
from adapters.confidence_map import fit_confidence_map, pre_adaptation_logits
from adapters.configure import NoNormalizationError, model_hash
from adapters.fisher import FisherInfo, FisherMismatchError, estimate_fisher
from adapters.guard import RESET_REASONS, CollapseGuardOptions
from adapters.metrics import CalibrationAccumulator, accuracy, expected_calibration_error, forgetting
from adapters.prob_cache import InProcessProbabilityCache, ProbabilityCache
from adapters.registry import METHODS, AdapterConfigError, create, method_options, wants_fitted_confidence_map
from adapters.state_check import IncompatibleState

__all__ = [
    "METHODS",
    "RESET_REASONS",
    "Adapter",
    "AdapterConfigError",
    "AdapterOptions",
    "AdapterStats",
    "BatchStatisticsOptions",
    "CalibrationAccumulator",
    "CollapseGuardOptions",
    "FisherInfo",
    "FisherMismatchError",
    "InProcessProbabilityCache",
    "IncompatibleState",
    "NoNormalizationError",
    "OptimizedOptions",
    "PredictionCallback",
    "ProbabilityCache",
    "StepResult",
    "accuracy",
    "create",
    "entropy",
    "estimate_fisher",
    "expected_calibration_error",
    "fit_confidence_map",
    "forgetting",
    "method_options",
    "model_hash",
    "pre_adaptation_logits",
    "wants_fitted_confidence_map",
]
