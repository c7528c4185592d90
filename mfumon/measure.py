"""Exact FLOPs of one training step, counted by PyTorch's FlopCounterMode on the executed ops.

The analytic model (`mfumon.flops`) is what the monitor uses live; this is the check against what
the dispatcher really runs, used once outside the training loop (tests, `mfumon estimate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.flop_counter as flop_counter_module
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfumon.errors import ConfigTypeError
from mfumon.flops import grouped_mm_flops, sdpa_backward_flops, sdpa_forward_flops

__all__ = ["flop_counter", "measure_flops"]


def measure_flops(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
) -> int:
    """FLOPs of one training step (forward + backward, no optimizer) counted by FlopCounterMode.

    Run it once, outside the training loop, on CPU (or meta for models without data-dependent
    routing). `example_inputs` is a dict of keyword arguments, a tuple of positional ones or one
    tensor. The loss is ``output.loss`` when the model returns one, else ``loss_fn(output)``, else
    the sum of the output (or of its ``logits``). What is counted is what the dispatcher runs:
    matmuls and attention kernels, every score of a causal or masked kernel included. Two kernels
    PyTorch's table lacks are counted here the same way: the CPU flash-attention kernel (what SDPA
    runs on CPU) and ``_grouped_mm`` (transformers 5 MoE experts). Elementwise
    work (norms, bias adds, softmax, activations) counts 0. The model is put in train mode for the
    step and its previous mode and gradients are restored.
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    grads = [(p, p.grad) for p in model.parameters()]
    counter = flop_counter()
    try:
        model.train()
        with counter:
            output = _call(model, example_inputs)
            _loss(output, loss_fn).backward()
    finally:
        model.train(was_training)
        for p, grad in grads:
            p.grad = grad
    return int(counter.get_total_flops())


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def flop_counter(*, model_flops: bool = False) -> FlopCounterMode:
    """A FlopCounterMode (no display) that also counts CPU flash attention, `_grouped_mm`, GQA kernels.

    `model_flops`: count every attention backward kernel at 2 x its forward (dQ, dK, dV, dScores), the
    model-FLOPs convention mfumon counts with, instead of torch's count for the GPU kernels, which adds
    the scores they recompute (2.5 x forward).
    """
    formulas = _extra_formulas()
    if model_flops:
        aten = torch.ops.aten
        for kernel in ("efficient", "flash", "cudnn"):
            op = getattr(aten, f"_scaled_dot_product_{kernel}_attention_backward", None)
            if op is not None:
                formulas[op] = _model_attention_backward
    return FlopCounterMode(display=False, custom_mapping=formulas)


def _model_attention_backward(grad_out: Any, q: Any, k: Any, v: Any, *_args: Any, **_kwargs: Any) -> int:
    return sdpa_backward_flops(q, k, v)  # 2 x forward, per query head (GQA's K/V heads do not matter)


def _loss(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if loss_fn is not None:
        return loss_fn(output)
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits.sum()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0].sum()
    if isinstance(output, torch.Tensor):
        return output.sum()
    raise ConfigTypeError(
        f"cannot find a loss in {type(output).__name__}; pass measure_flops(..., loss_fn=...)"
    )


def _extra_formulas() -> dict[Any, Any]:
    """Formulas for kernels FlopCounterMode leaves uncounted: CPU flash attention, grouped mm."""
    aten = torch.ops.aten
    found: dict[Any, Any] = {}

    def attention(q: Any, k: Any, v: Any, *_args: Any, **_kwargs: Any) -> int:
        return sdpa_forward_flops(q, k, v)

    def attention_backward(grad_out: Any, q: Any, k: Any, v: Any, *_args: Any, **_kwargs: Any) -> int:
        return sdpa_backward_flops(q, k, v)

    def grouped_mm(a: Any, b: Any, *_args: Any, **_kwargs: Any) -> int:
        return grouped_mm_flops(a, b)  # its backward runs _grouped_mm again, counted the same way

    formulas: list[tuple[str, Any]] = [
        ("_scaled_dot_product_flash_attention_for_cpu", attention),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", attention_backward),
        ("_grouped_mm", grouped_mm),
    ]
    forward = getattr(flop_counter_module, "sdpa_flop_count", None)
    backward = getattr(flop_counter_module, "sdpa_backward_flop_count", None)
    if forward is not None and backward is not None:  # GQA on GPU kernels: torch < 2.13 wants equal heads

        def gpu_attention(q: Any, k: Any, v: Any, *_args: Any, **_kwargs: Any) -> int:
            return forward(q, _as_query_heads(q, k), _as_query_heads(q, v))

        def gpu_attention_backward(grad_out: Any, q: Any, k: Any, v: Any, *_args: Any, **_kwargs: Any) -> int:
            return backward(grad_out, q, _as_query_heads(q, k), _as_query_heads(q, v))

        for kernel in ("efficient", "flash", "cudnn"):
            formulas.append((f"_scaled_dot_product_{kernel}_attention", gpu_attention))
            formulas.append((f"_scaled_dot_product_{kernel}_attention_backward", gpu_attention_backward))
    for name, formula in formulas:
        op = getattr(aten, name, None)
        if op is not None:
            found[op] = formula
    return found


def _as_query_heads(q_shape: Any, kv_shape: Any) -> tuple[int, ...]:
    """K or V's shape with as many heads as Q: a GQA kernel broadcasts them, the FLOPs are per query head."""
    return (kv_shape[0], q_shape[1], *kv_shape[2:])
