"""Which dtype a model's matmuls run in, by the names people and trainers use for it."""

from __future__ import annotations

import torch
from torch import nn

from mfumon._peaks import DTYPES
from mfumon.errors import ConfigError, ConfigTypeError

__all__ = ["matmul_dtype", "normalize_dtype"]

_TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "int8",
    **{
        getattr(torch, n): "fp8"
        for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    },
    **{getattr(torch, n): "fp4" for n in ("float4_e2m1fn_x2",) if hasattr(torch, n)},
}

# spellings people (and Lightning / HF precision flags) use, lower case
_ALIASES: dict[str, str] = {
    **{d: d for d in DTYPES},
    "float64": "fp64", "double": "fp64", "64": "fp64", "64-true": "fp64",
    "float32": "fp32", "float": "fp32", "32": "fp32", "32-true": "fp32", "ieee": "fp32",
    "tensorfloat32": "tf32", "tensorfloat-32": "tf32",
    "bfloat16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
    "float16": "fp16", "half": "fp16", "16": "fp16", "16-mixed": "fp16", "16-true": "fp16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "e4m3": "fp8", "e5m2": "fp8",
    "transformer-engine": "fp8", "transformer-engine-float16": "fp8",
    "float4": "fp4", "nvfp4": "fp4", "mxfp4": "fp4", "float4_e2m1fn_x2": "fp4",
    "i8": "int8",
}  # fmt: skip


def normalize_dtype(dtype: str | torch.dtype) -> str:
    """Canonical matmul dtype name ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")."""
    if isinstance(dtype, torch.dtype):
        if dtype in _TORCH_DTYPES:
            return _TORCH_DTYPES[dtype]
        raise ConfigError(f"dtype {dtype} has no matmul peak; pass one of {', '.join(DTYPES)}")
    if not isinstance(dtype, str):
        raise ConfigTypeError(
            f"dtype must be a str or torch.dtype such as 'bf16', got {type(dtype).__name__}"
        )
    key = dtype.strip().lower().removeprefix("torch.")
    if key in _ALIASES:
        return _ALIASES[key]
    raise ConfigError(f"unknown dtype {dtype!r}; pass one of {', '.join(DTYPES)} (or a torch.dtype)")


def _fp32_matmul_dtype() -> str:
    """'tf32' when fp32 matmuls may run on TF32 tensor cores, else 'fp32'."""
    try:
        new_api = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")  # torch >= 2.9
        if new_api in ("tf32", "ieee"):
            return "tf32" if new_api == "tf32" else "fp32"
        return "tf32" if torch.get_float32_matmul_precision() in ("high", "medium") else "fp32"
    except RuntimeError:  # torch raises when the legacy and new precision APIs were mixed
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def matmul_dtype(model: nn.Module | None = None, *, autocast_dtype: str | torch.dtype | None = None) -> str:
    """Canonical dtype the matmuls run in: explicit autocast dtype, active autocast, else parameters."""
    if autocast_dtype is not None:
        found = normalize_dtype(autocast_dtype)
    elif torch.is_autocast_enabled("cuda"):
        found = normalize_dtype(torch.get_autocast_dtype("cuda"))
    elif torch.is_autocast_enabled("cpu"):
        found = normalize_dtype(torch.get_autocast_dtype("cpu"))
    else:
        found = _parameter_dtype(model) if model is not None else "fp32"
    return _fp32_matmul_dtype() if found == "fp32" else found


def _parameter_dtype(model: nn.Module) -> str:
    """Floating dtype holding the most parameter elements (fp32 when there is none)."""
    elements: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            elements[p.dtype] = elements.get(p.dtype, 0) + p.numel()
    if not elements:
        return "fp32"
    return _TORCH_DTYPES.get(max(elements, key=lambda d: elements[d]), "fp32")
