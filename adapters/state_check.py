"""Whether a saved adapter state may be loaded into an adapter: same method, model and options.

A state carries the options it was adapted under (learning rate, optimiser kind, thresholds...).
Loading it into an adapter configured otherwise would either silently replace the configuration
(the optimiser's saved hyper-parameters win in ``torch.optim.Optimizer.load_state_dict``) or crash
at the next step (Adam moments in an SGD optimiser). So a difference is refused, named, before
anything is changed. States written before options were saved (no ``format``) are still loadable
when their optimiser state fits this adapter's optimiser kind; the configured hyper-parameters are
kept then.
"""

from __future__ import annotations

from typing import Any

#: Version of the :meth:`adapters.Adapter.state_dict` layout; absent in states without options.
STATE_FORMAT = 2


class IncompatibleState(ValueError):
    """A state that cannot be loaded into this adapter; the message names each difference."""


def _flatten(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def option_differences(saved: dict[str, Any], configured: dict[str, Any]) -> list[str]:
    """``"lr: 0.01 in the state, 0.001 here"`` for each option (dotted path) that differs."""
    ours, theirs = _flatten(configured), _flatten(saved)
    return [
        f"{key}: {theirs.get(key, '(absent)')!r} in the state, {ours.get(key, '(absent)')!r} here"
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key, "(absent)") != theirs.get(key, "(absent)")
    ]


def optimizer_kind(state: dict[str, Any] | None) -> str | None:
    """'adam' or 'sgd' from an optimiser ``state_dict`` (its param groups' keys), None if unknown."""
    groups = (state or {}).get("param_groups") or []
    if not groups:
        return None
    if "betas" in groups[0]:
        return "adam"
    if "dampening" in groups[0]:
        return "sgd"
    return None


def check_compatible(state: dict[str, Any], method: str, model_hash: str, options: dict[str, Any],
                     optimizer: str | None) -> None:
    """Raise :class:`IncompatibleState` unless ``state`` fits an adapter of ``method`` on the model
    ``model_hash`` configured with ``options`` (``model_dump(mode='json')``) and ``optimizer`` kind."""
    if state.get("method") != method:
        raise IncompatibleState(f"the state is for method {state.get('method')!r}, this adapter is {method!r}")
    if state.get("model_hash") != model_hash:
        raise IncompatibleState(f"the state belongs to model {state.get('model_hash')}, this adapter's model "
                                f"is {model_hash}")
    fmt = state.get("format")
    if fmt is not None and fmt != STATE_FORMAT:
        raise IncompatibleState(f"unknown state format {fmt!r}; this version reads {STATE_FORMAT}")
    if "options" in state:
        differences = option_differences(state["options"], options)
        if differences:
            raise IncompatibleState(f"the state was adapted with other {method} options: " + "; ".join(differences))
        return
    saved_kind = optimizer_kind(state.get("optimizer"))  # a state from before options were saved
    if saved_kind is not None and optimizer is not None and saved_kind != optimizer:
        raise IncompatibleState(f"optimizer: the state holds {saved_kind!r} state, this adapter uses {optimizer!r}")
