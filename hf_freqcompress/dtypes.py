"""The dtype names this library reads and writes, in one table.

Checkpoints name dtypes as strings ("float16", "uint8"); reading one back
must accept exactly the names the writer can produce and nothing else.
"""

from __future__ import annotations

import torch

__all__ = ["TENSOR_DTYPES", "FLOAT_DTYPES", "SAFETENSORS_DTYPES", "dtype_name", "float_dtype", "resolve_storage_dtype"]

TENSOR_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
"""Every dtype a checkpoint tensor may have."""

FLOAT_DTYPES: dict[str, torch.dtype] = {name: d for name, d in TENSOR_DTYPES.items() if d.is_floating_point}
"""The dtypes stored values and models may have."""

SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
"""safetensors header dtype -> our name."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def float_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """The floating dtype called ``name`` ("float16" or "torch.float16"); ValueError naming ``what`` otherwise."""
    if not isinstance(name, str) or name.removeprefix("torch.") not in FLOAT_DTYPES:
        raise ValueError(f"unknown {what} {name!r}; use one of {sorted(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name.removeprefix("torch.")]


def resolve_storage_dtype(storage_dtype: torch.dtype | str | None, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype stored values take in a checkpoint: ``storage_dtype`` if given, else ``weight_dtype``."""
    if storage_dtype is None:
        return weight_dtype
    if isinstance(storage_dtype, torch.dtype):
        if storage_dtype not in FLOAT_DTYPES.values():
            raise ValueError(f"storage_dtype {storage_dtype} is not a float dtype; use one of {sorted(FLOAT_DTYPES)}")
        return storage_dtype
    if isinstance(storage_dtype, str):
        return float_dtype(storage_dtype, "storage_dtype")
    raise TypeError(f"storage_dtype must be a torch.dtype, a dtype name or None, got {type(storage_dtype).__name__}")
