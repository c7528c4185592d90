"""Training FLOPs per token from the live model, under a named convention (formulas: `mfumon.formulas`).

Conventions (``convention=``), all per token of training (forward + backward = 3 x forward):

- ``"mfumon"`` (default): 6 x matmul_active (frozen weights: below), plus per attention layer
  6 x heads x (qk_head_dim + v_head_dim) x keys, where keys is the mean number of keys a query
  attends. Each layer is causal or bidirectional as its module says (``is_causal``); ``causal=``
  decides only for modules that do not say. Causal: (s + 1) / 2, capped by the layer's sliding
  window w (the mean of min(i, w) over positions i = 1..s); bidirectional: s, or with a window
  the keys less than w positions away on either side. With ``doc_lengths`` the keys are summed
  over the documents and divided by their tokens. Cross-attention and state-space /
  linear-attention mixers have no term (see docs/accounting.md).
- ``"6N"`` (Kaplan et al. 2020): 6 x matmul_active; no attention-score term.
- ``"palm"`` (Chowdhery et al. 2022, App. B): 6 x matmul_active + 12·L·H·Q·T, generalized per
  layer to 6 x heads x (qk_head_dim + v_head_dim) x s: every query attends all s keys (no causal
  discount, no sliding window).
- ``"chinchilla"`` (Hoffmann et al. 2022, App. F): the embedding counts as a matmul
  (6 x embedding), the weight matrices as above, attention as in "palm", the softmax at
  3 FLOPs per score (x3 for training: 9 x heads x s per layer); norms and biases are not counted.

Frozen weights (``grads=``): a weight costs 2 FLOPs per token per pass over it, the forward, its own
gradient where it requires one, its input's gradient where that input requires one (6 when all three
run; 2 or 4 when frozen). Attention's Q@K^T backward computes dQ and dK only where needed, A@V's dA
where Q or K needs a gradient and dV where V does. :mod:`mfumon._grads` says which need one.

``FlopBreakdown.recompute`` (HFU only) is the forward, under the same convention, of each module
activation checkpointing re-runs: :mod:`mfumon.recompute` says which modules re-run, this module
counts them. Exact counting of an executed step is :func:`mfumon.measure.measure_flops`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from mfumon._grads import ALL_QKV, QKV
from mfumon._structure import AttentionShape
from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning, check_int, log
from mfumon.formulas import (
    attention_dims,
    attention_training_flops,
    causal_keys,
    forward_flops,
    full_keys,
    grouped_mm_flops,
    matmul_flops,
    matmul_pass_flops,
    matmul_training_flops,
    sdpa_backward_flops,
    sdpa_forward_flops,
    softmax_training_flops,
    step_attention_flops,
)
from mfumon.params import Layout, layout, region_layout
from mfumon.recompute import ATTENTION, MATMUL, check_recompute, reruns

__all__ = [
    "CONVENTIONS",
    "FlopBreakdown",
    "attention_training_flops",
    "causal_keys",
    "flop_breakdown",
    "flops_per_token",
    "forward_flops",
    "full_keys",
    "grouped_mm_flops",
    "matmul_flops",
    "matmul_pass_flops",
    "matmul_training_flops",
    "sdpa_backward_flops",
    "sdpa_forward_flops",
    "softmax_training_flops",
    "step_attention_flops",
]

CONVENTIONS = ("mfumon", "6N", "palm", "chinchilla")

# FlopBreakdown fields a checkpointed region re-runs unless its selective policy keeps the category;
# `other` (norms, biases) is always re-run.
_RERUN_FIELDS = {
    MATMUL: ("attn_proj", "mlp", "router", "lm_head", "embedding"),
    ATTENTION: ("attn_scores", "softmax"),
}
_ALWAYS_RERUN = ("other",)


@dataclass(frozen=True)
class FlopBreakdown:
    """Training (forward + backward) FLOPs per token, by component; `total` is model FLOPs (MFU)."""

    attn_proj: int  # Q/K/V/O and MLA low-rank projections: 6 x their weight matrices (frozen: 2 or 4)
    attn_scores: int  # Q@K^T and A@V over the keys each query attends
    mlp: int  # dense MLPs, shared experts, routed experts x top_k/E: 6 x weight matrices
    router: int  # routers and shared-expert gates: 6 x weight matrices
    lm_head: int  # output projection: 6 x its weight matrix
    other: int = 0  # 6 x norm scales, biases, sinks: the rest of matmul_active (not chinchilla)
    embedding: int = 0  # chinchilla only: the input tables as one-hot matmuls, 6 x embedding (frozen: 2)
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
    grads: Any = "auto",
) -> FlopBreakdown:
    """Training FLOPs per token of `model` at `seq_len`, by component (see the module docstring).

    Args:
        causal: for attention modules that do not say whether they are causal (``is_causal``),
            count only the keys a causal mask lets each query see ("mfumon" only; "palm" and
            "chinchilla" are non-causal by definition and "6N" has no attention term).
        doc_lengths: lengths of the documents packed into the batch (each <= seq_len): the
            attention term becomes the keys summed over documents divided by their total tokens,
            i.e. per token averaged over the batch's tokens ("mfumon" only).
        experts, top_k: passed to :func:`mfumon.count_params` for custom MoE layouts.
        attention: one AttentionShape per attention layer, replacing the ones read from the model
            (for custom modules whose attention carries no head attributes); a shape's `causal`
            (None: `causal=`) says whether that layer is causal.
        recompute: what activation checkpointing re-runs, in the `recompute` field (HFU): "auto"
            (found on the model, see :mod:`mfumon.recompute`), "none", a fraction in [0, 1] of the
            model's forward FLOPs, or the checkpointed modules (each re-runs its forward once).
        grads: which weights' inputs and attention Q/K/V need a gradient where some parameters are
            frozen: "auto" (the parameters' requires_grad, inputs by model order), "all" (every weight
            trained, 6 per weight), or an observed step (:func:`mfumon.params.observe_grads`).
            User-given ``attention=`` layers count a full backward.
    """
    seq_len = check_int("seq_len", seq_len, "tokens per sequence")
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
    whole = layout(model, experts=experts, top_k=top_k, grads=grads)
    layers = tuple(attention) if attention is not None else whole.attention
    if attention is not None and not all(isinstance(a, AttentionShape) for a in layers):
        raise ConfigTypeError("attention= takes a sequence of mfumon.AttentionShape, one per attention layer")
    if attention is None and convention != "6N":  # "6N" counts no attention scores anywhere
        _say_uncounted(model, whole)
    qkv = whole.attention_grads if attention is None else (ALL_QKV,) * len(layers)
    options: dict[str, Any] = {"causal": causal, "convention": convention, "docs": docs}
    base = _components(whole, layers, qkv, seq_len, **options)
    if spec == "none":
        return base
    if isinstance(spec, float):  # a fraction of the model's forward: a third of the all-trained count
        every = layout(model, experts=experts, top_k=top_k, grads="all")
        trained = _components(every, layers, (ALL_QKV,) * len(layers), seq_len, **options).total
        return replace(base, recompute=round(spec * forward_flops(trained)))

    def region(module: nn.Module, path: str, saves: frozenset[str]) -> int:
        """Training FLOPs per token of one module's subtree that re-run, less what `saves` keeps."""
        sub, sub_layers = region_layout(model, module, path, whole, experts=experts, top_k=top_k)
        if attention is not None:
            sub_layers = ()  # user-given shapes belong to no module: the region's attention is not known
        flops = _components(sub, sub_layers, (ALL_QKV,) * len(sub_layers), seq_len, **options)
        kept = {name for category in saves for name in _RERUN_FIELDS[category]}
        rerun_fields = [n for names in _RERUN_FIELDS.values() for n in names if n not in kept]
        return sum(getattr(flops, n) for n in (*rerun_fields, *_ALWAYS_RERUN))

    extra = Fraction(0)
    for rerun in reruns(model, spec):  # what re-runs, per training forward (see mfumon.recompute)
        module = model.get_submodule(rerun.path)
        training = region(module, rerun.path, rerun.saves)
        if rerun.own:  # less its submodules: what runs in its own forward (attention, own weights)
            for name, child in module._modules.items():
                if child is not None:
                    path = f"{rerun.path}.{name}" if rerun.path else name
                    training -= region(child, path, rerun.saves)
        extra += rerun.times * forward_flops(max(training, 0))
    return replace(base, recompute=round(extra))


def _components(
    layout: Layout,
    layers: Sequence[AttentionShape],
    qkv: Sequence[QKV],
    seq_len: int,
    *,
    causal: bool,
    convention: str,
    docs: list[int],
) -> FlopBreakdown:
    """The breakdown of one parameter layout and its attention layers (their Q/K/V gradients `qkv`)."""
    passes = layout.passes  # each weight's passes per token: 3 when trained, 1 or 2 when frozen
    weights = {
        "attn_proj": matmul_pass_flops(passes.attn),
        "mlp": matmul_pass_flops(passes.mlp),
        "router": matmul_pass_flops(passes.router),
        "lm_head": matmul_pass_flops(passes.lm_head),
    }
    pairs = list(zip(layers, qkv, strict=True))  # each attention layer, whether its Q, K, V need a gradient
    if convention == "chinchilla":
        full = full_keys(seq_len, None)
        return FlopBreakdown(
            **weights,
            attn_scores=_per_token(
                sum(attention_training_flops(full, *attention_dims(a), g) for a, g in pairs), seq_len
            ),
            embedding=matmul_pass_flops(passes.embedding),
            softmax=_per_token(
                sum(softmax_training_flops(full, a.heads, g[0] or g[1]) for a, g in pairs), seq_len
            ),
        )
    other = matmul_pass_flops(passes.vector)
    if convention == "6N":
        return FlopBreakdown(**weights, attn_scores=0, other=other)
    if convention == "palm":
        scores = sum(
            attention_training_flops(full_keys(seq_len, None), *attention_dims(a), g) for a, g in pairs
        )
        return FlopBreakdown(**weights, attn_scores=_per_token(scores, seq_len), other=other)
    scores = sum(attention_training_flops(_keys(a, docs, causal), *attention_dims(a), g) for a, g in pairs)
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
    grads: Any = "auto",
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
        recompute="none",
        grads=grads,  # model FLOPs only: what checkpointing re-runs is not part of the total
    ).total


# --- helpers ----------------------------------------------------------------------------------


def _keys(a: AttentionShape, docs: list[int], default_causal: bool) -> int:
    """Keys one layer attends over the documents: causal as the module says, else `default_causal`."""
    keys_of = causal_keys if (default_causal if a.causal is None else a.causal) else full_keys
    return sum(keys_of(n, a.window) for n in docs)


_TOLD: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose uncounted layers were named


def _say_uncounted(model: nn.Module, found: Layout) -> None:
    """Once per model: warn that cross-attention scores are not counted; note recurrent mixers."""
    if model in _TOLD or not (found.cross_attention or found.recurrent):
        return
    _TOLD.add(model)
    if found.recurrent:
        log.info(
            "mfumon: state-space / linear-attention layers (%d: %s, ...) count their projections "
            "(attn_proj) but no attention scores, and their scan is not counted",
            len(found.recurrent),
            found.recurrent[0],
        )
    if found.cross_attention:
        warnings.warn(
            f"mfumon does not count the attention scores of {len(found.cross_attention)} cross-attention "
            f"layers ({found.cross_attention[0]}, ...): they attend over the encoder's length, which it does "
            "not know (their projections are counted). To count them, pass attention=[mfumon.AttentionShape"
            "(...)] for every layer, or flops_per_token=.",
            MfumonWarning,
            stacklevel=3,  # _say_uncounted <- flop_breakdown <- its caller
        )


def _per_token(flops: int, tokens: int) -> int:
    return (2 * flops + tokens) // (2 * tokens)  # round half up, in integers


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
