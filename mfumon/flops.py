"""Training FLOPs per token from the live model, under a named convention: every FLOP formula.

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
activation checkpointing re-runs: :mod:`mfumon.recompute` says which modules re-run, this module
counts them. Exact counting of an executed step is :func:`mfumon.measure.measure_flops`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from mfumon._structure import AttentionShape
from mfumon.errors import ConfigError, ConfigTypeError, check_int
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


def matmul_flops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n  # (m x k) @ (k x n): one multiply and one add per term


def matmul_training_flops(weights: int) -> int:
    return 6 * weights  # 2 forward + 4 backward per weight per token (Kaplan et al. 2020, sec. 2.1)


def attention_training_flops(keys: int, heads: int, qk_head_dim: int, v_head_dim: int) -> int:
    return 6 * keys * heads * (qk_head_dim + v_head_dim)  # 3 x (Q@K^T 2*dqk + A@V 2*dv) per key (PaLM App. B)


def softmax_training_flops(keys: int, heads: int) -> int:
    return 9 * keys * heads  # 3 per score forward, backward 2x forward (Hoffmann et al. 2022, App. F)


def forward_flops(training_flops: int) -> int:
    return (2 * training_flops + 3) // 6  # training = 3 x forward (backward 2x forward), rounded half up


def sdpa_forward_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """Forward FLOPs of one attention kernel call, every score counted (masked ones too)."""
    b, heads, s_q, d_qk = q_shape  # (B, hq, sq, dqk); K (B, hkv, sk, dqk); V (B, hkv, sk, dv)
    return 2 * b * heads * s_q * k_shape[2] * (d_qk + v_shape[3])  # Q@K^T + A@V


def sdpa_backward_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """Backward FLOPs of one attention kernel call: dQ, dK from dScores; dV, dScores from dOut."""
    return 2 * sdpa_forward_flops(q_shape, k_shape, v_shape)  # 2x forward


def grouped_mm_flops(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """FLOPs of one ``_grouped_mm`` call: 2-D x 3-D / 3-D x 2-D / 2-D x 2-D split M, N or K into groups."""
    m, k, n = a_shape[-2] if len(a_shape) > 1 else 1, a_shape[-1], b_shape[-1]
    groups = a_shape[0] if len(a_shape) == 3 and len(b_shape) == 3 else 1  # 3-D x 3-D is a batched mm
    return groups * matmul_flops(m, k, n)


def causal_keys(seq_len: Any, window: int | None) -> Any:
    """Keys attended by all queries of one causal sequence: sum of min(i, w) for i = 1..s.

    `seq_len` is an int, or a tensor of whole-number lengths (keys per element, on its device).
    """
    if window is None:
        return seq_len * (seq_len + 1) // 2  # the same sum with w = s, in fewer operations
    w = _capped(seq_len, window)
    return w * (w + 1) // 2 + (seq_len - w) * w


def full_keys(seq_len: Any, window: int | None) -> Any:
    """Keys attended by all queries of one non-causal sequence: s x min(s, w) (int or tensor, as above)."""
    return seq_len * _capped(seq_len, window)


def step_attention_flops(
    doc_lengths: torch.Tensor | Sequence[int], layers: Sequence[AttentionShape], *, causal: bool = True
) -> Any:
    """Training attention-score FLOPs ("mfumon" convention) of one step's documents, all of them.

    Each document of length n attends on its own: per layer, attention_training_flops of
    causal_keys(n, w), or full_keys where the layer is not causal (its ``causal`` attribute where
    not None, else `causal`). Ints in, an exact int out; a tensor in, a 0-d float64 tensor out,
    computed on its device and never read back (no host sync). Zero lengths count nothing.
    """
    per_key: dict[tuple[int | None, bool], int] = {}  # (window, causal) -> FLOPs per key, layers summed
    for a in layers:
        own = getattr(a, "causal", None)
        group = (a.window, causal if own is None else bool(own))
        per_key[group] = per_key.get(group, 0) + attention_training_flops(1, *_dims(a))
    if not isinstance(doc_lengths, torch.Tensor):
        return sum(
            flops * sum((causal_keys if is_causal else full_keys)(n, window) for n in doc_lengths)
            for (window, is_causal), flops in per_key.items()
        )
    n = doc_lengths.reshape(-1).to(torch.float64)  # (docs,); whole numbers, exact to 2**53
    total = torch.zeros((), dtype=torch.float64, device=n.device)
    for (window, is_causal), flops in per_key.items():
        total = total + (causal_keys if is_causal else full_keys)(n, window).sum() * flops
    return total


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
    whole = layout(model, experts=experts, top_k=top_k)
    layers = tuple(attention) if attention is not None else whole.attention
    if attention is not None and not all(isinstance(a, AttentionShape) for a in layers):
        raise ConfigTypeError("attention= takes a sequence of mfumon.AttentionShape, one per attention layer")
    base = _components(whole, layers, seq_len, causal=causal, convention=convention, docs=docs)
    if spec == "none":
        return base
    if isinstance(spec, float):  # a fraction of the model's forward
        return replace(base, recompute=round(spec * forward_flops(base.total)))

    def region(module: nn.Module, path: str, saves: frozenset[str]) -> int:
        """Training FLOPs per token of one module's subtree that re-run, less what `saves` keeps."""
        sub, sub_layers = region_layout(model, module, path, whole, experts=experts, top_k=top_k)
        if attention is not None:
            sub_layers = ()  # user-given shapes belong to no module: the region's attention is not known
        flops = _components(sub, sub_layers, seq_len, causal=causal, convention=convention, docs=docs)
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


# --- helpers ----------------------------------------------------------------------------------


def _dims(a: AttentionShape) -> tuple[int, int, int]:
    return a.heads, a.qk_head_dim, a.v_head_dim


def _capped(seq_len: Any, window: int | None) -> Any:
    """min(seq_len, window) for an int or a tensor; seq_len when there is no window."""
    if window is None:
        return seq_len
    return seq_len.clamp(max=window) if isinstance(seq_len, torch.Tensor) else min(window, seq_len)


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
