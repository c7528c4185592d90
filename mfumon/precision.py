"""Which matmuls run in a lower precision than the rest of the model, and how many FLOPs they are.

A model trained with FP8 linears runs those GEMMs at the FP8 rate while attention, the lm_head
and everything else run in the model's matmul dtype (bf16, usually). The peak MFU divides by is
then weighted by the FLOPs each dtype runs (DESIGN.md): found here by module type, weighed in
:func:`mfumon.hardware.mixed_peak`.

- torchao ``Float8Linear`` (``torchao.float8.convert_to_float8_training``): fp8 from conversion
  on, read per GEMM from its config (a GEMM whose operands are left in high precision, as in the
  "rowwise_with_gw_hp" recipe, runs in the base dtype; a frozen weight runs no grad_weight GEMM);
  ``emulate=True`` runs no fp8 GEMM at all.
- Transformer Engine ``Linear``, ``LayerNormLinear``, ``LayerNormMLP``, ``GroupedLinear``: fp8
  (fp4 under an NVFP4 recipe) only inside TE's autocast, read from TE's own global state at the
  first forward; outside it they run in the base dtype.
- Any other module or parameter from torchao (MX formats, float8 grouped experts): named as
  not counted; its FLOPs stay in the base dtype.

FLOPs per module are the FLOP model's own count of that region (6 per weight per token, routed
experts at top_k / E): :func:`mfumon.params.region_layout` and :mod:`mfumon.flops`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from mfumon.dtypes import normalize_dtype
from mfumon.errors import log
from mfumon.flops import flops_per_token, forward_flops, matmul_training_flops
from mfumon.params import Layout, layout, region_layout

__all__ = ["TE_GEMM_MODULES", "Precision", "find_precision", "te_autocast_dtypes"]

TE_GEMM_MODULES = frozenset({"Linear", "LayerNormLinear", "LayerNormMLP", "GroupedLinear"})
_TE = "transformer_engine.pytorch"
_HIGH_PRECISION_BACKWARD = ("high_precision", "dequantized")  # TE recipes' backward_override values


@dataclass(frozen=True)
class Precision:
    """Training FLOPs per token by the dtype their matmuls run in, found once at setup."""

    total: int  # model FLOPs per token the shares divide (the FLOP model's total)
    fixed: Mapping[str, int]  # dtype -> FLOPs per token a module type fixes (torchao Float8Linear: fp8)
    te_flops: int = 0  # training FLOPs per token of Transformer Engine GEMM modules
    uncounted: tuple[str, ...] = ()  # modules in a low precision mfumon cannot read (counted in `base`)
    base: str = "fp32"  # dtype of every other FLOP: the detected or given matmul dtype
    follow_autocast: bool = False  # `base` becomes torch autocast's dtype at the first forward
    te: tuple[str | None, str | None, str | None] | None = None  # TE's dtype per GEMM (None: base)
    read: bool = False  # the first forward has been seen (`at_first_forward`)
    emulated: tuple[str, ...] = field(default=(), compare=False)  # torchao modules with emulate=True

    @property
    def pending(self) -> bool:
        """True while something is read at the first forward: the autocast dtype or TE's FP8 state."""
        return not self.read and (self.follow_autocast or self.te_flops > 0)

    def flops_by_dtype(self) -> dict[str, int]:
        """Model FLOPs per token per dtype (zeros left out); the base dtype takes what no module fixes."""
        out: dict[str, int] = {}
        for dtype, flops in self.fixed.items():
            out[dtype] = out.get(dtype, 0) + flops
        gemm = forward_flops(self.te_flops)  # each of the three GEMMs is one forward's worth
        for dtype in self.te or (None, None, None):
            if dtype is not None:
                out[dtype] = out.get(dtype, 0) + gemm
        out[self.base] = out.get(self.base, 0) + max(self.total - sum(out.values()), 0)
        return {dtype: flops for dtype, flops in out.items() if flops > 0}

    def at_first_forward(self, device_type: str) -> Precision:
        """This plan with what the first forward shows: autocast's dtype (when followed), TE's state."""
        base = self.base
        if self.follow_autocast and torch.is_autocast_enabled(device_type):
            base = normalize_dtype(torch.get_autocast_dtype(device_type))
        te = te_autocast_dtypes() if self.te_flops else None
        return replace(self, base=base, te=te, read=True)


def find_precision(
    model: nn.Module,
    *,
    base: str,
    total: int | None = None,
    seq_len: int | None = None,
    follow_autocast: bool = False,
) -> Precision:
    """The FLOPs of `model` whose dtype its modules fix, against `total` model FLOPs per token.

    `total` is the FLOP model's count; without one (``flops_per_token=`` given) the shares come
    from the structural count at `seq_len`, or from 6 x the matmul weights when that is unknown.
    """
    whole = layout(model)
    if total is None and seq_len:
        total = flops_per_token(model, seq_len)
    elif total is None:
        total = matmul_training_flops(whole.counts.matmul_active)
    fixed: dict[str, int] = {}
    te_flops = 0
    uncounted: list[str] = []
    emulated: list[str] = []
    stack, seen = [("", model)], set()
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue  # a module shared by two parents runs (and counts) once
        seen.add(id(module))
        kind = _kind(module)
        if kind == "torchao-float8":
            fp8 = _torchao_fp8_gemms(module)
            if getattr(module.config, "emulate", False):
                emulated.append(path)
            elif fp8:
                gemm = forward_flops(_training_flops(model, module, path, whole))  # one of the three
                fixed["fp8"] = fixed.get("fp8", 0) + fp8 * gemm
            continue  # counted whole: its children are part of it
        if kind == "te":
            te_flops += _training_flops(model, module, path, whole)
            continue
        if kind == "torchao-other" or any(
            type(p).__module__.startswith("torchao.") for p in module.parameters(recurse=False)
        ):
            uncounted.append(path or type(module).__name__)
            continue
        stack.extend((f"{path}.{name}" if path else name, child) for name, child in module.named_children())
    if emulated:
        log.info(
            "mfumon: %d torchao Float8Linear modules run with emulate=True (high-precision GEMMs, no "
            "fp8 rate); they count in %s",
            len(emulated),
            base,
        )
    return Precision(
        total=total,
        fixed=MappingProxyType(fixed),
        te_flops=te_flops,
        uncounted=tuple(sorted(uncounted)),
        base=base,
        follow_autocast=follow_autocast,
        emulated=tuple(sorted(emulated)),
    )


def te_autocast_dtypes() -> tuple[str | None, str | None, str | None] | None:
    """Transformer Engine's dtype per GEMM (output, grad_input, grad_weight) under its autocast now.

    None when TE's autocast is off or TE was never imported (mfumon never imports it). A GEMM a
    recipe keeps in high precision (``backward_override``) is None: it runs in the base dtype.
    """
    manager = None
    for name in (f"{_TE}.quantization", f"{_TE}.fp8"):  # TE >= 2.10 moved it to quantization.py
        manager = getattr(sys.modules.get(name), "FP8GlobalStateManager", None)
        if manager is not None:
            break
    if manager is None or not manager.is_fp8_enabled():
        return None
    recipe = manager.get_fp8_recipe()
    nvfp4 = getattr(recipe, "nvfp4", None)
    dtype = "fp4" if callable(nvfp4) and nvfp4() else "fp8"
    backward = None if getattr(recipe, "backward_override", None) in _HIGH_PRECISION_BACKWARD else dtype
    override = getattr(recipe, "override_linear_precision", None)  # TE 1.x: (fprop, dgrad, wgrad) in hp
    flags = tuple(bool(getattr(override, g, False)) for g in ("fprop", "dgrad", "wgrad"))
    gemms = (dtype, backward, backward)
    return tuple(None if high else d for d, high in zip(gemms, flags, strict=True))  # type: ignore[return-value]


# --- helpers ----------------------------------------------------------------------------------


def _kind(module: nn.Module) -> str | None:
    """What low-precision family `module`'s type is from, by its defining module (never imported)."""
    for cls in type(module).__mro__:
        where = cls.__module__
        if where.startswith("torchao.float8") and cls.__name__ == "Float8Linear":
            return "torchao-float8"
        if where.startswith(_TE + ".module") and cls.__name__ in TE_GEMM_MODULES:
            return "te"
    if type(module).__module__.startswith("torchao.") and next(module.parameters(), None) is not None:
        return "torchao-other"
    return None


def _torchao_fp8_gemms(module: nn.Module) -> int:
    """How many of a Float8Linear's three GEMMs run in fp8: both operands cast, per its config.

    A frozen weight runs no grad_weight GEMM, so that one is not among them.
    """
    config = module.config
    operands = [
        getattr(config, "cast_config_input", None),  # output = input @ weight
        getattr(config, "cast_config_grad_output", None),  # grad_input = grad_output @ weight
    ]
    weight = getattr(module, "weight", None)
    if weight is None or weight.requires_grad:
        operands.append(getattr(config, "cast_config_input_for_grad_weight", None))  # input^T @ grad_output
    return sum(1 for cast in operands if cast is not None and _cast(cast) != "disabled")


def _cast(cast: Any) -> str:
    scaling = getattr(cast, "scaling_type", None)
    return str(getattr(scaling, "value", scaling))


def _training_flops(model: nn.Module, module: nn.Module, path: str, whole: Layout) -> int:
    """Training matmul FLOPs per token of one module's weight matrices, as the FLOP model counts them."""
    sub, _ = region_layout(model, module, path, whole, experts=None, top_k=None)
    weights = sub.attn_weights + sub.mlp_weights + sub.router_weights + sub.lm_head_weights
    return matmul_training_flops(weights)
