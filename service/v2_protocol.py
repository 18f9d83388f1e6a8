"""The Open Inference Protocol v2 as this server speaks it, for every transport (HTTP and gRPC).

The names a client sees (platform, version, input and output names, extensions) and the checks of a
request's shape that do not depend on how it arrived. Both transports call these, so a bad request
gets the same message over HTTP (a 400) and gRPC (INVALID_ARGUMENT).
"""

from __future__ import annotations

from typing import Any

from service.errors import InvalidInput
from service.preprocess import check_count

PLATFORM = "tta-serve-pytorch"
VERSION = "1"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
#: Optional FP32 [N] output of models whose method reports a model divergence (EATA-C), on request only.
DIVERGENCE_OUTPUT = "divergence"
EXTENSIONS = ["binary_tensor_data", "classification"]


def check_one_input(names: list[str]) -> None:
    """Every model here takes exactly one input tensor."""
    if len(names) != 1:
        raise InvalidInput(f"expected exactly one input tensor ({INPUT_NAME!r}), got {len(names)}: {names}")


def check_encoded_images(name: str, shape: list[int], count: int, limit: int) -> None:
    """A BYTES input of ``count`` encoded images: shape [N] or [N, 1] with N == count, within ``limit``."""
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"BYTES input {name!r} must have shape [N] or [N, 1] (one encoded image each), got {shape}")
    if count != shape[0]:
        raise InvalidInput(f"BYTES input {name!r} declares shape {shape} but holds {count} elements")
    check_count(count, limit)


def output_names(reports_divergence: bool) -> list[str]:
    """The outputs a model has: the probabilities, and the divergence where its method reports one."""
    return [OUTPUT_NAME, DIVERGENCE_OUTPUT] if reports_divergence else [OUTPUT_NAME]


def check_output(name: str, classification: Any, method: str, reports_divergence: bool) -> int | None:
    """A requested output: it must be ours; ``classification`` None or a positive count (returned), and
    only on the probabilities. ``divergence`` exists only for methods that report one (EATA-C)."""
    if name == DIVERGENCE_OUTPUT and not reports_divergence:
        raise InvalidInput(f"output {name!r} is reported by method 'eata-c' only; this model adapts with "
                           f"{method!r} (outputs: [{OUTPUT_NAME!r}])")
    if name not in output_names(reports_divergence):
        raise InvalidInput(f"unknown output {name!r}; this model has {output_names(reports_divergence)}")
    if name == DIVERGENCE_OUTPUT and classification is not None:
        raise InvalidInput(f"output {name!r} takes no parameters.classification (it is one number per image)")
    if classification is not None and (
        isinstance(classification, bool) or not isinstance(classification, int) or classification < 1
    ):
        raise InvalidInput(f"output {name!r}: parameters.classification must be a positive integer "
                           f"(the number of classes to return), got {classification!r}")
    return classification
