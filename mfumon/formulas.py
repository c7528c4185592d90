"""Every FLOP formula mfumon counts with, one per line; `mfumon.flops` composes them per model.

Matmuls are 2mkn; training is forward + backward = 3 x forward for a trained weight (2 FLOPs per
weight per pass: forward, its gradient, its input's); attention scores per key as in PaLM App. B;
keys per query causal, bidirectional or windowed; one step's attention from its own documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mfumon._grads import ALL_QKV, QKV
from mfumon._structure import AttentionShape

__all__ = [
    "attention_dims",
    "attention_training_flops",
    "causal_keys",
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


def matmul_flops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n  # (m x k) @ (k x n): one multiply and one add per term


def matmul_training_flops(weights: int) -> int:
    return 6 * weights  # 2 forward + 4 backward per weight per token (Kaplan et al. 2020, sec. 2.1)


def matmul_pass_flops(weight_passes: int) -> int:
    return 2 * weight_passes  # 2 per weight per pass: forward, its gradient, its input's gradient


def attention_training_flops(
    keys: int, heads: int, qk_head_dim: int, v_head_dim: int, grads: QKV = ALL_QKV
) -> int:
    """Q@K^T (2*dqk per key) and A@V (2*dv): forward, and the backward products `grads` (Q, K, V) need.

    With every gradient, 3 x forward: 6 x keys x heads x (dqk + dv) (PaLM, arXiv:2204.02311, App. B).
    """
    q, k, v = grads  # Q@K^T: forward, dQ, dK; A@V: forward, dA (if Q or K needs it), dV
    return 2 * keys * heads * ((1 + q + k) * qk_head_dim + (1 + (q or k) + v) * v_head_dim)


def softmax_training_flops(keys: int, heads: int, backward: bool = True) -> int:
    return (9 if backward else 3) * keys * heads  # 3 per score forward, backward 2x (Hoffmann 2022, App. F)


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
    """Keys attended by all queries of one bidirectional sequence: s x s, or with a window the
    (query, key) pairs less than w apart: s + 2 x sum of (s - d) for d = 1..min(w, s) - 1 (int or tensor)."""
    reach = _capped(seq_len, window) - 1
    return seq_len + reach * (2 * seq_len - reach - 1)


def step_attention_flops(
    doc_lengths: torch.Tensor | Sequence[int],
    layers: Sequence[AttentionShape],
    *,
    causal: bool = True,
    grads: Sequence[QKV] | None = None,
) -> Any:
    """Training attention-score FLOPs ("mfumon" convention) of one step's documents, all of them.

    Each document of length n attends on its own: per layer, attention_training_flops of
    causal_keys(n, w), or full_keys where the layer is not causal (its ``causal`` attribute where
    not None, else `causal`). Ints in, an exact int out; a tensor in, a 0-d float64 tensor out,
    computed on its device and never read back (no host sync). Zero lengths count nothing.
    `grads` holds, per layer, whether its Q, K and V need a gradient (`Layout.attention_grads`;
    default: all of them).
    """
    per_key: dict[tuple[int | None, bool], int] = {}  # (window, causal) -> FLOPs per key, layers summed
    for a, g in zip(layers, grads if grads is not None else (ALL_QKV,) * len(layers), strict=True):
        own = getattr(a, "causal", None)
        group = (a.window, causal if own is None else bool(own))
        per_key[group] = per_key.get(group, 0) + attention_training_flops(1, *attention_dims(a), g)
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


def attention_dims(a: AttentionShape) -> tuple[int, int, int]:
    return a.heads, a.qk_head_dim, a.v_head_dim


def _capped(seq_len: Any, window: int | None) -> Any:
    """min(seq_len, window) for an int or a tensor; seq_len when there is no window."""
    if window is None:
        return seq_len
    return seq_len.clamp(max=window) if isinstance(seq_len, torch.Tensor) else min(window, seq_len)
