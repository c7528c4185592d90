"""FLOPs per token: formulas, conventions, attention structure, and the exact cross-check against
torch.utils.flop_counter.FlopCounterMode on real tiny models.

How a measured step converts to the analytic numbers (the cross-check below):
  measure_flops counts what the dispatcher runs. The attention kernels (eager matmuls, SDPA) compute
  every score of the s x s matrix and mask afterwards, so they match the "palm" convention's attention
  term (all s keys, no causal discount, no sliding window), and their backward is 2x forward like
  ours. FlopCounterMode counts no elementwise work, so the `other` component (6 x norm scales and
  biases) is left out. Hence:  measured == (palm.total - palm.other) x tokens.
  The default ("mfumon") convention differs from that only in attn_scores: the causal mean of
  (s + 1) / 2 keys per query instead of s, capped by each layer's sliding window.
  Tolerance 1%: on transformers 4.x the rotary embedding's (d/2 x 1) @ (1 x s) matmul (B*s*d/2
  FLOPs, forward only, 0.002% here) is counted too; on 5.x it is not a matmul and the match is exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mfumon import AttentionShape
from mfumon.errors import ConfigError, ConfigTypeError
from mfumon.flops import FlopBreakdown, causal_keys, flop_breakdown, flops_per_token, full_keys
from mfumon.measure import measure_flops
from mfumon.params import count_params
from tests.tiny_models import (
    EAGER_ONLY,
    HIDDEN,
    TINY_CONFIGS,
    VOCAB,
    HandLM,
    StackedMoE,
    hand_moe_lm,
    hf_model,
    token_batch,
)

d, V, S = HIDDEN, VOCAB, 16  # hidden 64, vocabulary 128, 16 tokens per sequence


def test_two_layer_mlp_training_flops() -> None:
    model = nn.Sequential(nn.Linear(64, 256, bias=False), nn.GELU(), nn.Linear(256, 64, bias=False))
    # N = 64*256 + 256*64 = 32768 matmul weights; training = 6 FLOPs per weight per token
    assert flops_per_token(model, seq_len=1) == 6 * 32_768


def test_keys_attended() -> None:
    assert causal_keys(16, None) == 136  # 1 + 2 + ... + 16 = 16*17/2
    assert causal_keys(16, 8) == 100  # 1 + ... + 8 = 36, then 8 positions x 8 keys = 64
    assert causal_keys(16, 32) == 136  # a window wider than the sequence changes nothing
    assert full_keys(16, None) == 256  # 16 x 16
    assert full_keys(16, 8) == 184  # bidirectional window: pairs less than 8 apart, 16 + 2 x (15 + ... + 9)


# --- the attention structure read from each model --------------------------------------------------


@pytest.mark.transformers
@pytest.mark.parametrize(
    ("model_type", "shapes"),
    [
        ("gpt2", [AttentionShape(4, 16, 16, None, causal=True)] * 2),  # each module says is_causal
        (
            "llama",
            [AttentionShape(4, 16, 16, None, causal=True)] * 2,
        ),  # GQA: 2 K/V heads do not change scores
        ("mistral", [AttentionShape(4, 16, 16, 8, causal=True)] * 2),
        (
            "gpt_oss",
            [AttentionShape(4, 16, 16, 8, causal=True), AttentionShape(4, 16, 16, None, causal=True)],
        ),
        ("deepseek_v3", [AttentionShape(4, 16 + 8, 16, None, causal=True)] * 3),  # MLA: qk = nope + rope
    ],
)
def test_attention_shapes(model_type: str, shapes: list[AttentionShape]) -> None:
    pytest.importorskip("transformers")
    from mfumon.params import layout

    assert list(layout(hf_model(model_type)).attention) == shapes


@pytest.mark.transformers
def test_llama_breakdown_by_convention() -> None:
    pytest.importorskip("transformers")
    model = hf_model("llama")
    attn = d * 64 + 2 * d * 32 + 64 * d  # q, k, v (2 K/V heads x 16), o
    mlp = 3 * d * 96
    vectors = 2 * (2 * d) + d  # two RMSNorms per layer, final norm
    per_key = 6 * 4 * (16 + 16)  # 6 x heads x (qk + v) per key, per layer
    mfumon = flop_breakdown(model, S)
    assert mfumon == FlopBreakdown(
        attn_proj=6 * 2 * attn,
        attn_scores=2 * per_key * 136 // S,  # causal: 136 keys over 16 queries, 2 layers
        mlp=6 * 2 * mlp,
        router=0,
        lm_head=6 * V * d,
        other=6 * vectors,
    )
    assert mfumon.total == 6 * count_params(model).matmul_active + mfumon.attn_scores
    palm = flop_breakdown(model, S, convention="palm")
    assert palm.attn_scores == 12 * 2 * 4 * 16 * S  # PaLM's 12*L*H*Q*T
    assert flop_breakdown(model, S, causal=False) == mfumon  # LlamaAttention says is_causal: causal= is moot
    six_n = flop_breakdown(model, S, convention="6N")
    assert six_n.total == 6 * count_params(model).matmul_active and six_n.attn_scores == 0
    chinchilla = flop_breakdown(model, S, convention="chinchilla")
    assert chinchilla.embedding == 6 * V * d and chinchilla.other == 0
    assert chinchilla.softmax == 2 * 9 * 4 * S  # 3 FLOPs per score x 3 (training), 4 heads, 2 layers
    assert chinchilla.attn_scores == palm.attn_scores
    assert flops_per_token(model, S) == mfumon.total


@pytest.mark.transformers
def test_sliding_windows_per_layer() -> None:
    pytest.importorskip("transformers")
    per_key = 6 * 4 * (16 + 16)
    mistral = hf_model("mistral")  # window 8 in both layers
    assert flop_breakdown(mistral, S).attn_scores == 2 * per_key * 100 // S
    assert flop_breakdown(mistral, S, causal=False) == flop_breakdown(mistral, S)  # the model says causal
    gpt_oss = hf_model("gpt_oss")  # layer 0 sliding (8), layer 1 full
    assert flop_breakdown(gpt_oss, S).attn_scores == per_key * (100 + 136) // S


@pytest.mark.transformers
def test_packed_documents() -> None:
    pytest.importorskip("transformers")
    model = hf_model("llama")
    per_key = 6 * 4 * (16 + 16)
    packed = flop_breakdown(model, S, doc_lengths=[4, 12])
    assert packed.attn_scores == 2 * per_key * (10 + 78) // 16  # 4*5/2 + 12*13/2 keys over 16 tokens
    assert flop_breakdown(model, S, doc_lengths=torch.tensor([16])) == flop_breakdown(model, S)
    unpacked = flop_breakdown(model, S)
    assert packed.mlp == unpacked.mlp and packed.attn_scores < unpacked.attn_scores


def test_attention_override_for_modules_without_head_attributes() -> None:
    model = nn.Sequential(nn.Embedding(V, d), nn.Linear(d, d, bias=False), nn.Linear(d, V, bias=False))
    assert flop_breakdown(model, S).attn_scores == 0  # no attention module recognisable
    layers = [AttentionShape(heads=4, qk_head_dim=16, v_head_dim=16)]
    assert flop_breakdown(model, S, attention=layers).attn_scores == 6 * 4 * 32 * 136 // S


def test_breakdown_total_and_hardware() -> None:
    b = FlopBreakdown(attn_proj=1, attn_scores=2, mlp=3, router=4, lm_head=5, other=6, recompute=7)
    assert b.total == 21 and b.hardware == 28  # 1+...+6; recompute counts for HFU only


def test_bad_input() -> None:
    model = hand_moe_lm()
    with pytest.raises(ConfigError, match="seq_len"):
        flop_breakdown(model, 0)
    with pytest.raises(ConfigTypeError, match="seq_len"):
        flop_breakdown(model, "2048")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="convention"):
        flop_breakdown(model, S, convention="kaplan")
    with pytest.raises(ConfigTypeError, match="causal"):
        flop_breakdown(model, S, causal="yes")  # type: ignore[arg-type]
    for bad in ([], [0, 16], [17]):
        with pytest.raises(ConfigError, match="doc_lengths"):
            flop_breakdown(model, S, doc_lengths=bad)
    with pytest.raises(ConfigError, match="doc_lengths"):
        flop_breakdown(model, S, convention="palm", doc_lengths=[16])
    with pytest.raises(ConfigError, match="no parameters"):
        flops_per_token(nn.ReLU(), S)


# --- exact cross-check against FlopCounterMode -----------------------------------------------------


def _measured_vs_analytic(model: nn.Module, inputs: object, tokens: int, **kwargs: object) -> tuple[int, int]:
    palm = flop_breakdown(model, S, convention="palm", **kwargs)  # type: ignore[arg-type]
    return measure_flops(model, inputs), (palm.total - palm.other) * tokens


CROSS_CHECK = [
    (mt, attn)
    for mt in sorted(TINY_CONFIGS)
    for attn in ("eager", "sdpa")
    if attn == "eager" or mt not in EAGER_ONLY
]


@pytest.mark.transformers
@pytest.mark.parametrize(("model_type", "attn"), CROSS_CHECK)
def test_analytic_matches_flop_counter(model_type: str, attn: str) -> None:
    pytest.importorskip("transformers")
    model = hf_model(model_type, attn=attn)
    measured, analytic = _measured_vs_analytic(model, {"input_ids": token_batch(2, S)}, tokens=2 * S)
    assert measured == pytest.approx(analytic, rel=0.01)


@pytest.mark.transformers
def test_grouped_mm_experts_count_like_the_eager_loop() -> None:
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 has no experts_implementation switch")
    batch = {"input_ids": token_batch(2, S)}
    grouped = measure_flops(hf_model("mixtral", experts_implementation="grouped_mm"), batch)
    eager = measure_flops(hf_model("mixtral", experts_implementation="eager"), batch)
    assert grouped == eager  # _grouped_mm counted by measure_flops' own formula


def test_hand_written_moe_matches_flop_counter() -> None:
    model = hand_moe_lm()  # SDPA on CPU: the flash kernel PyTorch's table lacks, counted by ours
    measured, analytic = _measured_vs_analytic(model, token_batch(2, S), tokens=2 * S)
    assert measured == analytic


def test_stacked_moe_matches_flop_counter() -> None:
    model = HandLM([StackedMoE(d, 32, num_experts=4, k=2)])
    measured, analytic = _measured_vs_analytic(model, token_batch(2, S), tokens=2 * S, top_k=2)
    assert measured == analytic


def test_measure_flops_leaves_the_model_as_it_was() -> None:
    model = hand_moe_lm().eval()
    measure_flops(model, token_batch(1, S))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
def test_flop_counter_counts_gpu_attention_kernels_under_gqa(kernel: str) -> None:
    # The GPU kernels get K and V with fewer heads than Q under GQA (enable_gqa); torch < 2.13's own
    # formula refused those shapes, so measure_flops (and the self-check) failed on Llama-3 on a GPU.
    # The formula runs here on the counter's shapes, as FlopCounterMode calls it: no GPU needed.
    from torch.utils.flop_counter import FlopCounterMode

    from mfumon.measure import flop_counter

    registry = flop_counter().flop_registry
    op = getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}_attention")
    q, kv = torch.empty(1, 4, 8, 16, device="meta"), torch.empty(1, 2, 8, 16, device="meta")
    # Q@K^T and A@V, each 2 x b x heads x s_q x s_k x d, with the 4 query heads: 2 x 8192
    assert registry[op](q, kv, kv, out_val=None) == 2 * (2 * 1 * 4 * 8 * 8 * 16)
    same_heads = torch.empty(1, 4, 8, 16, device="meta")
    assert registry[op](q, kv, kv, out_val=None) == FlopCounterMode().flop_registry[op](
        q, same_heads, same_heads, out_val=None
    )


@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
def test_model_flops_counter_counts_gpu_attention_backward_at_twice_the_forward(kernel: str) -> None:
    # torch counts a GPU attention kernel's backward with the scores it recomputes (2.5 x forward); the
    # self-check compares against model FLOPs (dQ, dK, dV, dScores: 2 x forward), so it counts that way:
    # a plain Llama on the H200 read 2.9% "above" the count at seq 2048 before, and warned.
    from mfumon.measure import flop_counter

    op = getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}_attention_backward")
    q, kv = torch.empty(1, 4, 8, 16, device="meta"), torch.empty(1, 2, 8, 16, device="meta")
    forward = 2 * (2 * 1 * 4 * 8 * 8 * 16)  # Q@K^T and A@V with the 4 query heads
    model = flop_counter(model_flops=True).flop_registry[op](q, q, kv, kv, out_val=None)
    assert model == 2 * forward
    assert flop_counter().flop_registry[op](q, q, kv, kv, out_val=None) == 5 * forward // 2
