"""Adapter state as bytes without pickle: tensors in safetensors, everything else as JSON.

Snapshots travel between replicas and live in Redis, so decoding must never execute code. Nested
dicts (including the optimiser's integer-keyed state), lists, tuples, numbers, strings and None
survive the round trip; tensors come back bit-for-bit.
"""

from __future__ import annotations

import json
from typing import Any

import torch

FORMAT = "tta-state/1"


class StateDecodeError(ValueError):
    """Bytes that are not a valid tta-serve adapter state."""


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _pack(v, tensors) for k, v in value.items()}}
        return {"__items__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_pack(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot serialise a {type(value).__name__} in adapter state")


def _unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]].clone()
    if "__dict__" in value:
        return {k: _unpack(v, tensors) for k, v in value["__dict__"].items()}
    if "__items__" in value:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value["__items__"]}
    if "__tuple__" in value:
        return tuple(_unpack(v, tensors) for v in value["__tuple__"])
    raise StateDecodeError(f"unexpected object in state: keys {sorted(value)[:5]}")


def state_to_bytes(state: dict[str, Any]) -> bytes:
    """Encode an adapter ``state_dict()`` (or any nested structure of tensors and plain values)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    structure = _pack(state, tensors)
    return save(tensors, metadata={"format": FORMAT, "structure": json.dumps(structure)})


def state_from_bytes(data: bytes) -> dict[str, Any]:
    """Decode :func:`state_to_bytes` output; anything else raises :class:`StateDecodeError`."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except Exception as exc:
        raise StateDecodeError(f"not a safetensors payload: {exc}") from None
    if meta.get("format") != FORMAT:
        raise StateDecodeError(f"unknown state format {meta.get('format')!r}; expected {FORMAT!r}")
    try:
        return _unpack(json.loads(meta["structure"]), tensors)
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise StateDecodeError(f"corrupt state structure: {exc}") from None
