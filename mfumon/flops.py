"""Training FLOPs per token from the live model, under a named convention, and exact counting.

Conventions (``convention=``), all per token of training (forward + backward = 3 x forward):

- ``"mfumon"`` (default): 6 x matmul_active, plus per attention layer
  6 x heads x (qk_head_dim + v_head_dim) x keys, where keys is the mean number of keys a query
  attends: (s + 1) / 2 when causal, capped by that layer's sliding window w (the mean of
  min(i, w) over positions i = 1..s); ``causal=False``: min(s, w). With ``doc_lengths`` the keys
  are summed over the documents and divided by their tokens.
- ``"6N"`` (Kaplan et al. 2020): 6 x matmul_active; no attention-score term.
- ``"palm"`` (Chowdhery et al. 2022, App. B): 6 x matmul_active + 12·L·H·Q·T, generalized per
  layer to 6 x heads x (qk_head_dim + v_head_dim) x s: every query attends all s keys (no causal
  discount, no sliding window).
- ``"chinchilla"`` (Hoffmann et al. 2022, App. F): the embedding counts as a matmul
  (6 x embedding), the weight matrices as above, attention as in "palm", the softmax at
  3 FLOPs per score (x3 for training: 9 x heads x s per layer); norms and biases are not counted.

``FlopBreakdown.recompute`` (HFU only) is the forward, under the same convention, of each module
activation checkpointing re-runs (see :mod:`mfumon.recompute`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from mfumon.errors import ConfigError, ConfigTypeError
from mfumon.params import (
    HEADS_ATTRS,
    QK_DIM_ATTRS,
    AttentionShape,
    MoELayer,
    ParamCounts,
    _attention_shape,
    _explicit_registrations,
    _find_moe,
    _Layout,
    _layout,
    _module_int,
    _named_modules,
    _numel,
    _shape,
)

__all__ = ["CONVENTIONS", "FlopBreakdown", "flop_breakdown", "flops_per_token", "measure_flops"]

CONVENTIONS = ("mfumon", "6N", "palm", "chinchilla")
_EMPTY = _Layout(ParamCounts(0, 0, 0, 0, 0), 0, 0, 0, 0, 0, 0, (), ())  # a region without parameters


@dataclass(frozen=True)
class FlopBreakdown:
    """Training (forward + backward) FLOPs per token, by component; `total` is model FLOPs (MFU)."""

    attn_proj: int  # Q/K/V/O and MLA low-rank projections: 6 x their weight matrices
    attn_scores: int  # Q@K^T and A@V over the keys each query attends
    mlp: int  # dense MLPs, shared experts, routed experts x top_k/E: 6 x weight matrices
    router: int  # routers and shared-expert gates: 6 x weight matrices
    lm_head: int  # output projection: 6 x its weight matrix
    other: int = 0  # 6 x norm scales, biases, sinks: the rest of matmul_active (not chinchilla)
    embedding: int = 0  # chinchilla only: the input tables as one-hot matmuls, 6 x embedding
    softmax: int = 0  # chinchilla only: 9 x heads x keys per layer
    recompute: int = 0  # extra FLOPs re-run by activation checkpointing (HFU); not part of total

    @property
    def total(self) -> int:
        """Training model FLOPs per token: the sum of every component except recompute."""
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "recompute")

    @property
    def hardware(self) -> int:
        """FLOPs per token the hardware runs: total plus recompute (for HFU)."""
        return self.total + self.recompute


# --- formulas: one per line, everything else composes them -----------------------------------


def matmul_training_flops(weights: int) -> int:
    return 6 * weights  # 2 forward + 4 backward per weight per token (Kaplan et al. 2020, sec. 2.1)


def attention_training_flops(keys: int, heads: int, qk_head_dim: int, v_head_dim: int) -> int:
    return 6 * keys * heads * (qk_head_dim + v_head_dim)  # 3 x (Q@K^T 2*dqk + A@V 2*dv) per key (PaLM App. B)


def softmax_training_flops(keys: int, heads: int) -> int:
    return 9 * keys * heads  # 3 per score forward, backward 2x forward (Hoffmann et al. 2022, App. F)


def causal_keys(seq_len: int, window: int | None) -> int:
    """Keys attended by all queries of one causal sequence: sum of min(i, w) for i = 1..s."""
    w = seq_len if window is None else min(window, seq_len)
    return w * (w + 1) // 2 + (seq_len - w) * w


def full_keys(seq_len: int, window: int | None) -> int:
    """Keys attended by all queries of one non-causal sequence: s x min(s, w)."""
    return seq_len * (seq_len if window is None else min(window, seq_len))


# --- public API -------------------------------------------------------------------------------


def flop_breakdown(
    model: nn.Module,
    seq_len: int,
    *,
    causal: bool = True,
    convention: str = "mfumon",
    doc_lengths: Iterable[int] | None = None,
    experts: Any = None,
    top_k: int | None = None,
    attention: Sequence[AttentionShape] | None = None,
    recompute: Any = "auto",
) -> FlopBreakdown:
    """Training FLOPs per token of `model` at `seq_len`, by component (see the module docstring).

    Args:
        causal: count only the keys a causal mask lets each query see ("mfumon" only; "palm" and
            "chinchilla" are non-causal by definition and "6N" has no attention term).
        doc_lengths: lengths of the documents packed into the batch (each <= seq_len): the
            attention term becomes the keys summed over documents divided by their total tokens,
            i.e. per token averaged over the batch's tokens ("mfumon" only).
        experts, top_k: passed to :func:`mfumon.count_params` for custom MoE layouts.
        attention: one AttentionShape per attention layer, replacing the ones read from the model
            (for custom modules whose attention carries no head attributes).
        recompute: what activation checkpointing re-runs, in the `recompute` field (HFU): "auto"
            (found on the model, see :mod:`mfumon.recompute`), "none", a fraction in [0, 1] of the
            model's forward FLOPs, or the checkpointed modules (each re-runs its forward once).
    """
    from mfumon.recompute import check_recompute, recompute_flops  # recompute imports this module

    _check_seq_len(seq_len)
    if not isinstance(causal, bool):
        raise ConfigTypeError(f"causal must be True or False, got {causal!r}")
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"convention must be one of {', '.join(map(repr, CONVENTIONS))}; got {convention!r}"
        )
    if doc_lengths is not None and convention != "mfumon":
        raise ConfigError(f"doc_lengths applies to convention='mfumon' only, not {convention!r}")
    docs = _check_docs(doc_lengths, seq_len)
    spec = check_recompute(recompute)
    layout = _layout(model, experts=experts, top_k=top_k)
    layers = tuple(attention) if attention is not None else layout.attention
    if attention is not None and not all(isinstance(a, AttentionShape) for a in layers):
        raise ConfigTypeError("attention= takes a sequence of mfumon.AttentionShape, one per attention layer")
    base = _components(layout, layers, seq_len, causal=causal, convention=convention, docs=docs)
    if spec == "none":
        return base

    def subtree(module: nn.Module, path: str) -> FlopBreakdown:
        """The same count restricted to one module and its submodules (a checkpointed region)."""
        sub, sub_layers = _subtree_layout(model, module, path, layout, experts=experts, top_k=top_k)
        if attention is not None:
            sub_layers = ()  # user-given shapes belong to no module: the region's attention is not known
        return _components(sub, sub_layers, seq_len, causal=causal, convention=convention, docs=docs)

    return replace(base, recompute=recompute_flops(model, spec, total=base.total, subtree_flops=subtree))


def _components(
    layout: _Layout,
    layers: Sequence[AttentionShape],
    seq_len: int,
    *,
    causal: bool,
    convention: str,
    docs: list[int],
) -> FlopBreakdown:
    """The breakdown of one parameter layout and its attention layers under `convention`."""
    weights = {
        "attn_proj": matmul_training_flops(layout.attn_weights),
        "mlp": matmul_training_flops(layout.mlp_weights),
        "router": matmul_training_flops(layout.router_weights),
        "lm_head": matmul_training_flops(layout.lm_head_weights),
    }
    if convention == "chinchilla":
        return FlopBreakdown(
            **weights,
            attn_scores=_per_token(
                sum(attention_training_flops(full_keys(seq_len, None), *_dims(a)) for a in layers), seq_len
            ),
            embedding=matmul_training_flops(layout.embedding),
            softmax=_per_token(
                sum(softmax_training_flops(full_keys(seq_len, None), a.heads) for a in layers), seq_len
            ),
        )
    other = matmul_training_flops(layout.vector_params)
    if convention == "6N":
        return FlopBreakdown(**weights, attn_scores=0, other=other)
    if convention == "palm":
        scores = sum(attention_training_flops(full_keys(seq_len, None), *_dims(a)) for a in layers)
        return FlopBreakdown(**weights, attn_scores=_per_token(scores, seq_len), other=other)
    keys_of = causal_keys if causal else full_keys
    scores = sum(attention_training_flops(sum(keys_of(n, a.window) for n in docs), *_dims(a)) for a in layers)
    return FlopBreakdown(**weights, attn_scores=_per_token(scores, sum(docs)), other=other)


def flops_per_token(
    model: nn.Module,
    seq_len: int,
    *,
    causal: bool = True,
    convention: str = "mfumon",
    doc_lengths: Iterable[int] | None = None,
    experts: Any = None,
    top_k: int | None = None,
    attention: Sequence[AttentionShape] | None = None,
) -> int:
    """Training model FLOPs (forward + backward) per token; `flop_breakdown(...).total`."""
    return flop_breakdown(
        model,
        seq_len,
        causal=causal,
        convention=convention,
        doc_lengths=doc_lengths,
        experts=experts,
        top_k=top_k,
        attention=attention,
        recompute="none",  # model FLOPs only: what checkpointing re-runs is not part of the total
    ).total


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
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    grads = [(p, p.grad) for p in model.parameters()]
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
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


# --- helpers ----------------------------------------------------------------------------------


def _subtree_layout(
    model: nn.Module, module: nn.Module, path: str, root: _Layout, *, experts: Any, top_k: int | None
) -> tuple[_Layout, tuple[AttentionShape, ...]]:
    """The layout of one region of the model (a checkpointed module), MoE layers as in the whole model.

    MoE blocks inside the region are read with the top_k found for them in the whole model; a region
    inside an MoE block (an expert, the expert container) counts its routed parameters at top_k / E.
    """
    inside = {m.top_k for m in root.moe if _within(m.path, path)}
    k = top_k or (inside.pop() if len(inside) == 1 else None)
    own_shape = _attention_shape(module) if _module_int(module, HEADS_ATTRS + QK_DIM_ATTRS) else None
    if next(iter(module.parameters()), None) is None:  # e.g. a parameter-free "core attention" module
        return _EMPTY, (own_shape,) if own_shape else ()
    sub = _layout(module, experts=experts, top_k=k)
    layers = sub.attention or ((own_shape,) if own_shape else ())  # the walk skips its root module
    for block in root.moe:
        if path.startswith(block.path + "."):
            sub = _scale_routed(sub, module, model.get_submodule(block.path), block, experts)
    return sub, layers


def _within(inner: str, outer: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _scale_routed(
    sub: _Layout, module: nn.Module, owner: nn.Module, block: MoELayer, experts: Any
) -> _Layout:
    """`sub` (the layout of `module`, inside MoE block `owner`) with its routed experts at top_k / E."""
    explicit = _explicit_registrations(experts, block.top_k)
    _, routed, _ = _find_moe(owner, _named_modules(owner), explicit, block.top_k)
    k, e = block.top_k, block.num_experts
    drop = {"mlp": 0, "vector": 0}
    for p in {id(p): p for p in module.parameters()}.values():
        if id(p) in routed:
            n = _numel(p)
            drop["vector" if len(_shape(p)) < 2 else "mlp"] += n - n * k // e  # where the walk put it
    return replace(
        sub, mlp_weights=sub.mlp_weights - drop["mlp"], vector_params=sub.vector_params - drop["vector"]
    )


def _dims(a: AttentionShape) -> tuple[int, int, int]:
    return a.heads, a.qk_head_dim, a.v_head_dim


def _per_token(flops: int, tokens: int) -> int:
    return (2 * flops + tokens) // (2 * tokens)  # round half up, in integers


def _check_seq_len(seq_len: object) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise ConfigTypeError(f"seq_len must be an int (tokens per sequence), got {seq_len!r}")
    if seq_len < 1:
        raise ConfigError(f"seq_len must be a positive int (tokens per sequence), got {seq_len!r}")


def _check_docs(doc_lengths: Iterable[int] | None, seq_len: int) -> list[int]:
    if doc_lengths is None:
        return [seq_len]
    if isinstance(doc_lengths, torch.Tensor):
        doc_lengths = doc_lengths.tolist()  # host sync: once per call, outside the training loop
    docs = list(doc_lengths)
    bad = [n for n in docs if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= seq_len]
    if not docs or bad:
        raise ConfigError(
            f"doc_lengths must be positive ints of at most seq_len={seq_len} (one per packed document), "
            f"got {bad[:3] if bad else docs!r}"
        )
    return docs


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


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


def _sdpa_fwd_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    b, heads, s_q, d_qk = q_shape  # (B, hq, sq, dqk); K (B, hkv, sk, dqk); V (B, hkv, sk, dv)
    return 2 * b * heads * s_q * k_shape[2] * (d_qk + v_shape[3])  # Q@K^T + A@V, every score counted


def _grouped_mm_flops(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    m, k, n = a_shape[-2] if len(a_shape) > 1 else 1, a_shape[-1], b_shape[-1]
    groups = a_shape[0] if len(a_shape) == 3 and len(b_shape) == 3 else 1  # 3-D x 3-D is a batched mm
    return 2 * groups * m * k * n  # 2-D x 3-D / 3-D x 2-D / 2-D x 2-D: the groups split M, N or K


def _extra_formulas() -> dict[Any, Any]:
    """Formulas for kernels FlopCounterMode leaves uncounted: CPU flash attention, grouped mm."""
    aten = torch.ops.aten
    found: dict[Any, Any] = {}

    def attention(q: Any, k: Any, v: Any, *_args: Any, **_kwargs: Any) -> int:
        return _sdpa_fwd_flops(q, k, v)

    def attention_backward(grad_out: Any, q: Any, k: Any, v: Any, *_args: Any, **_kwargs: Any) -> int:
        return 2 * _sdpa_fwd_flops(q, k, v)  # dQ, dK from dScores; dV, dScores from dOut: 2x forward

    def grouped_mm(a: Any, b: Any, *_args: Any, **_kwargs: Any) -> int:
        return _grouped_mm_flops(a, b)  # its backward runs _grouped_mm again, counted the same way

    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", attention),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", attention_backward),
        ("_grouped_mm", grouped_mm),
    ):
        op = getattr(aten, name, None)
        if op is not None:
            found[op] = formula
    return found
