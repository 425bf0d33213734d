"""Quantized weights as plain tensors plus a JSON description, and back: what a resumable run checkpoints.

No pickle: a checkpoint is a safetensors file (the tensors) and JSON (everything else), and only classes that
registered themselves here (`@record`) can be rebuilt from it. A record is a dataclass whose fields are
tensors, None, numbers, strings, torch dtypes, tuples of these, registered enums or other records.

    tensors, description = flatten(quantized_tensor, "model.layers.0.mlp.up_proj")
    same = unflatten(description, tensors)
"""

from __future__ import annotations

import dataclasses
import enum

import torch

_RECORDS: dict[str, type] = {}


def record(cls: type) -> type:
    """Class decorator: this dataclass (or enum) may be written to and rebuilt from a checkpoint."""
    if cls.__name__ in _RECORDS and _RECORDS[cls.__name__] is not cls:
        raise TypeError(f"two checkpointable classes are called {cls.__name__}")
    _RECORDS[cls.__name__] = cls
    return cls


def flatten(value, prefix: str, tensors: dict[str, torch.Tensor]):
    """The JSON description of `value`; its tensors go into `tensors` under names starting with `prefix`."""
    if torch.is_tensor(value):
        value = value.detach().to("cpu")
        stored = _narrowest(value)
        tensors[prefix] = stored.contiguous().clone()  # safetensors refuses shared storage
        if stored.dtype == value.dtype:
            return {"tensor": prefix}
        return {"tensor": prefix, "as": str(value.dtype).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, enum.Enum):
        return {"value": value}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        return {"tuple": [flatten(item, f"{prefix}.{i}", tensors) for i, item in enumerate(value)]}
    kind = type(value).__name__
    if _RECORDS.get(kind) is not type(value):
        raise TypeError(f"{kind} is not a checkpointable record (llmq/core/records.py)")
    if isinstance(value, enum.Enum):
        return {"enum": kind, "name": value.name}
    fields = {f.name: flatten(getattr(value, f.name), f"{prefix}.{f.name}", tensors)
              for f in dataclasses.fields(value)}
    return {"record": kind, "fields": fields}


def unflatten(description: dict, tensors: dict[str, torch.Tensor]):
    """What `flatten` described, rebuilt from its tensors."""
    if "tensor" in description:
        tensor = tensors[description["tensor"]]
        return tensor.to(_dtype(description["as"])) if "as" in description else tensor
    if "value" in description:
        return description["value"]
    if "dtype" in description:
        return _dtype(description["dtype"])
    if "tuple" in description:
        return tuple(unflatten(item, tensors) for item in description["tuple"])
    kind = description.get("enum") or description.get("record")
    if kind not in _RECORDS:
        raise ValueError(f"checkpoint names {kind!r}, which is not a checkpointable record")
    cls = _RECORDS[kind]
    if "enum" in description:
        return cls[description["name"]]
    return cls(**{name: unflatten(field, tensors) for name, field in description["fields"].items()})


def _narrowest(tensor: torch.Tensor) -> torch.Tensor:
    """Integer tensors in the narrowest of int8/uint8 that holds them (k-quant codes are int32 in memory, 0..63
    on disk), so that checkpoints take about a byte per weight; floats are kept exactly as they are."""
    if tensor.dtype in (torch.bool, torch.int8, torch.uint8) or tensor.is_floating_point() or not tensor.numel():
        return tensor
    low, high = int(tensor.min()), int(tensor.max())
    for narrow in (torch.uint8, torch.int8):
        info = torch.iinfo(narrow)
        if info.min <= low and high <= info.max:
            return tensor.to(narrow)
    return tensor


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"checkpoint names an unknown dtype {name!r}")
    return dtype
