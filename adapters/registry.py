"""Method registry and the one public constructor, :func:`create`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from adapters.base import Adapter
from adapters.fisher import FisherInfo, estimate_fisher
from adapters.prob_cache import ProbabilityCache

METHODS: dict[str, type[Adapter]] = {}


class AdapterConfigError(ValueError):
    """An unknown method or an invalid option, named in the message."""


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make a method available to :func:`create` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def method_options(method: str, **options: Any) -> Any:
    """Validate ``options`` for ``method`` and return the effective options (defaults filled in)."""
    cls = _method_class(method)
    try:
        return cls.Options(**options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in exc.errors()
        )
        valid = ", ".join(sorted(cls.Options.model_fields))
        raise AdapterConfigError(f"invalid options for method {method!r}: {problems} (valid: {valid})") from None


def wants_fitted_confidence_map(method: str, options: dict[str, Any]) -> bool:
    """Whether ``method`` with ``options`` answers with a fitted confidence map that nobody gave: its
    ``confidence`` option is 'fitted' or 'auto' (EATA-C's default) and no ``confidence_map`` is set. The server
    and the bench then fit one from clean labelled data they hold (adapters.confidence_map)."""
    field = METHODS[method].Options.model_fields.get("confidence") if method in METHODS else None
    if field is None:
        return False
    return options.get("confidence", field.default) in ("auto", "fitted") and options.get("confidence_map") is None


def _method_class(method: str) -> type[Adapter]:
    if method not in METHODS:
        raise AdapterConfigError(f"unknown adaptation method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def create(
    method: str,
    model: nn.Module,
    *,
    num_classes: int | None = None,
    prob_cache: ProbabilityCache | None = None,
    fisher: FisherInfo | str | Path | None = None,
    fisher_data: torch.Tensor | None = None,
    **options: Any,
) -> Adapter:
    """Build an adapter for ``model`` (which is copied, never modified).

    ``fisher`` (a :class:`FisherInfo` or the path of a saved one) or ``fisher_data`` (clean images to
    estimate it from) enable EATA's anti-forgetting penalty. Every other keyword is a method option.
    """
    cls = _method_class(method)
    opts = method_options(method, **options)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "prob_cache": prob_cache}
    if fisher is not None or fisher_data is not None:
        if not cls.uses_fisher:
            raise AdapterConfigError(f"method {method!r} takes no Fisher information")
        if isinstance(fisher, str | Path):
            fisher = FisherInfo.load(fisher)
        elif fisher is None:
            fisher = estimate_fisher(model, fisher_data)  # type: ignore[arg-type]
        kwargs["fisher"] = fisher
    return cls(model, opts, **kwargs)
