"""Attention where the model says: causal or bidirectional per module, encoder-decoder
cross-attention, and state-space / linear-attention layers, on tiny real models.

Every expected number is hand arithmetic written next to it, or FlopCounterMode on the executed
training step. The measured step is compared op by op (the "Global" counts of FlopCounterMode):
  - matmuls (mm, addmm, grouped mm) are the weight matrices: 6 x weights x tokens;
  - the SDPA kernel (counted with mfumon's public formula, as measure_flops does) computes every
    score, masked or not: it equals the "palm" attention term, and for an encoder the default one;
  - the rest (bmm, or elementwise products FlopCounterMode does not count, as the version's
    PyTorch fallback has it) is the mixers' state-space / delta-rule scan, which mfumon does not
    count (docs/accounting.md);
  - the mixers' depthwise causal conv runs over s + k - 1 padded positions forward; PyTorch's
    formula for a grouped conv backward counts it as if every channel saw every channel, so the conv
    is checked on its forward alone, and left out of the comparison.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mfumon import AttentionShape, MfumonWarning
from mfumon.flops import (
    flop_breakdown,
    forward_flops,
    full_keys,
    grouped_mm_flops,
    sdpa_backward_flops,
    sdpa_forward_flops,
)
from mfumon.measure import measure_flops
from mfumon.params import layout
from tests.tiny_models import VOCAB, hand_moe_lm, hf_model, token_batch

pytestmark = pytest.mark.transformers

S, B = 16, 2
PER_KEY = 6 * 4 * (16 + 16)  # training FLOPs per key of one layer: 6 x 4 heads x (qk 16 + v 16) = 768
CAUSAL_KEYS = 136  # 1 + 2 + ... + 16 keys over 16 queries

_SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
)
_HYBRID = dict(_SMALL, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=2)
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=8)
HYBRIDS: dict[str, dict[str, Any]] = {  # layer 0 the mixer, layer 1 softmax attention
    "bamba": dict(_HYBRID, attn_layer_indices=[1], **_MAMBA2),
    "granitemoehybrid": dict(
        _HYBRID,
        layer_types=["mamba", "attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=48,
        **_MAMBA2,
    ),
    "jamba": dict(
        _HYBRID,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=16,
        mamba_dt_rank=8,
        use_mamba_kernels=False,  # transformers 4.x: the PyTorch path on CPU (5.x picks it itself)
    ),
    "qwen3_next": dict(
        _HYBRID,
        layer_types=["linear_attention", "full_attention"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        head_dim=16,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    ),
}
# the mixer's depthwise conv: channels x kernel 4
CONV_WEIGHTS = {
    "bamba": (128 + 2 * 16) * 4,  # x (8 heads x 16) plus B and C (1 group x state 16)
    "granitemoehybrid": (128 + 2 * 16) * 4,
    "jamba": 128 * 4,  # x only: d_inner = 2 x 64
    "qwen3_next": (2 * 2 * 16 + 4 * 16) * 4,  # q and k (2 heads x 16), v (4 heads x 16)
}
MIXER = {"bamba": "mamba", "granitemoehybrid": "mamba", "jamba": "mamba", "qwen3_next": "linear_attn"}


def _build(model_type: str, auto_class: str, *, attn: str = "eager", **config: Any) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.for_model(model_type, **config)
    except (KeyError, ValueError):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    torch.manual_seed(0)
    return getattr(transformers, auto_class).from_config(hf_config, attn_implementation=attn)


def _op_flops(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """FLOPs of one training step by op name ("mm", "bmm", ...), SDPA and grouped mm included."""
    aten = torch.ops.aten
    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu": lambda q, k, v, *a, **kw: sdpa_forward_flops(q, k, v),
        "_scaled_dot_product_flash_attention_for_cpu_backward": lambda g, q, k, v, *a, **kw: (
            sdpa_backward_flops(q, k, v)
        ),
        "_grouped_mm": lambda a, b, *args, **kw: grouped_mm_flops(a, b),
    }
    mapping = {getattr(aten, name): f for name, f in formulas.items() if hasattr(aten, name)}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    model.train()
    with counter:
        out = model(**inputs)
        (out.loss if getattr(out, "loss", None) is not None else out[0].sum()).backward()
    counts = counter.get_flop_counts()["Global"]
    return {str(op).rpartition(".")[2]: int(n) for op, n in counts.items()}


# --- keys per layer ------------------------------------------------------------------------------


def test_bidirectional_keys() -> None:
    assert full_keys(16, None) == 256  # every query, all 16 keys
    assert full_keys(16, 5) == 124  # keys less than 5 apart: 16 + 2 x (15 + 14 + 13 + 12)
    assert full_keys(16, 16) == 256 and full_keys(16, 40) == 256  # a window as wide as the sequence
    assert full_keys(4, 1) == 4  # window 1: each token only itself


def test_attention_shape_keeps_old_calls_and_says_causal() -> None:
    assert AttentionShape(4, 16, 16, 8) == AttentionShape(heads=4, qk_head_dim=16, v_head_dim=16, window=8)
    assert AttentionShape(4, 16, 16).causal is None  # the caller's causal= decides
    model = nn.Sequential(nn.Embedding(VOCAB, 64), nn.Linear(64, VOCAB, bias=False))  # no attention found
    given = {
        c: flop_breakdown(model, S, attention=[AttentionShape(4, 16, 16, causal=c)])
        for c in (None, True, False)
    }
    assert given[None].attn_scores == given[True].attn_scores == PER_KEY * CAUSAL_KEYS // S
    assert given[False].attn_scores == PER_KEY * S  # every key
    assert (
        flop_breakdown(model, S, causal=False, attention=[AttentionShape(4, 16, 16, causal=True)])
        == given[True]
    )


def test_model_says_causal_before_the_default() -> None:
    llama = hf_model("llama")  # LlamaAttention.is_causal = True
    assert {a.causal for a in layout(llama).attention} == {True}
    assert flop_breakdown(llama, S, causal=False) == flop_breakdown(llama, S)
    hand = hand_moe_lm()  # nanoGPT-style attention that says nothing: causal= decides
    assert {a.causal for a in layout(hand).attention} == {None}
    assert flop_breakdown(hand, S).attn_scores == 2 * PER_KEY * CAUSAL_KEYS // S
    assert flop_breakdown(hand, S, causal=False).attn_scores == 2 * PER_KEY * S


# --- encoders --------------------------------------------------------------------------------------


def test_bert_encoder_counts_every_key() -> None:
    bert = _build("bert", "AutoModelForMaskedLM", **_SMALL, max_position_embeddings=64)
    # transformers 5: BertSelfAttention.is_causal = False; 4.x: is_decoder = False
    assert list(layout(bert).attention) == [AttentionShape(4, 16, 16, None, causal=False)] * 2
    breakdown = flop_breakdown(bert, S)
    assert breakdown.attn_scores == 2 * PER_KEY * S  # 2 layers x 768 x all 16 keys = 24,576
    assert flop_breakdown(bert, S, causal=True) == breakdown  # the model says; causal= does not apply
    measured = measure_flops(bert, {"input_ids": token_batch(B, S)})
    assert measured == (breakdown.total - breakdown.other) * B * S  # exact: an encoder runs every score


def test_bert_decoder_is_causal() -> None:
    bert = _build("bert", "AutoModelForCausalLM", **_SMALL, max_position_embeddings=64, is_decoder=True)
    assert list(layout(bert).attention) == [AttentionShape(4, 16, 16, None, causal=True)] * 2
    assert flop_breakdown(bert, S, causal=False).attn_scores == 2 * PER_KEY * CAUSAL_KEYS // S


def test_modernbert_global_and_local_layers() -> None:
    config = dict(_SMALL, num_hidden_layers=3, max_position_embeddings=64, pad_token_id=2)
    bert = _build(
        "modernbert", "AutoModelForMaskedLM", **config, local_attention=8, global_attn_every_n_layers=3
    )
    # layer 0 global, layers 1-2 local: |query - key| <= 8 // 2, i.e. keys less than 5 apart both ways
    # (transformers 5: sliding_window = 5; 4.x: local_attention = (4, 4))
    local = AttentionShape(4, 16, 16, 5, causal=False)
    assert list(layout(bert).attention) == [AttentionShape(4, 16, 16, None, causal=False), local, local]
    breakdown = flop_breakdown(bert, S)
    assert breakdown.attn_scores == PER_KEY * (256 + 2 * 124) // S  # 256 keys global, 124 local
    palm = flop_breakdown(bert, S, convention="palm")
    measured = measure_flops(bert, {"input_ids": token_batch(B, S) % (VOCAB - 3) + 3})  # no pad tokens
    # the kernel masks after computing all scores; on transformers 4.x each layer's rotary embedding
    # adds a (8 x 1) @ (1 x 16) matmul per sequence (3 x 2 x 2 x 8 x 16 = 768 FLOPs, 0.003%)
    assert measured == pytest.approx((palm.total - palm.other) * B * S, rel=1e-4)
    assert palm.total - breakdown.total == PER_KEY * 2 * (256 - 124) // S  # what the windows save


def test_vit_counts_every_patch() -> None:
    vit = _build("vit", "AutoModel", attn="sdpa", **_SMALL, image_size=16, patch_size=4)
    assert list(layout(vit).attention) == [AttentionShape(4, 16, 16, None, causal=False)] * 2
    tokens = (16 // 4) ** 2 + 1  # 16 patches and the class token
    breakdown = flop_breakdown(vit, tokens)
    assert breakdown.attn_scores == 2 * PER_KEY * tokens  # every query attends all 17 tokens
    ops = _op_flops(vit, {"pixel_values": torch.randn(B, 3, 16, 16)})
    sdpa = sum(n for op, n in ops.items() if "attention" in op)
    assert sdpa == breakdown.attn_scores * B * tokens  # the kernel, counted: the same scores


# --- encoder-decoder cross-attention ----------------------------------------------------------------


def test_cross_attention_named_once_and_not_counted() -> None:
    bart = _build(
        "bart",
        "AutoModelForSeq2SeqLM",
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        max_position_embeddings=64,
    )
    found = layout(bart)
    # encoder self-attention bidirectional, decoder self-attention causal (is_causal on each module)
    assert [a.causal for a in found.attention] == [False, False, True, True]
    assert found.cross_attention == (
        "model.decoder.layers.0.encoder_attn",
        "model.decoder.layers.1.encoder_attn",
    )
    with pytest.warns(MfumonWarning, match=r"2 cross-attention layers \(model.decoder.layers.0.encoder_attn"):
        breakdown = flop_breakdown(bart, S)
    assert breakdown.attn_scores == PER_KEY * (2 * 256 + 2 * CAUSAL_KEYS) // S  # no cross-attention term
    cross_proj = 2 * 4 * 64 * 64  # q, k, v, o of each cross-attention: still matmuls
    self_proj = 4 * 4 * 64 * 64  # q, k, v, o of the 4 self-attention layers
    assert breakdown.attn_proj == 6 * (cross_proj + self_proj)
    flop_breakdown(bart, S)  # said once per model: no second warning (filterwarnings makes it an error)


def test_bert_cross_attention() -> None:
    # transformers 5: flagged on the parent (BertAttention.is_cross_attention); 4.x: the second
    # attention that says only is_decoder=True in each layer of a model built with add_cross_attention
    config = dict(_SMALL, max_position_embeddings=64, is_decoder=True, add_cross_attention=True)
    bert = _build("bert", "AutoModelForCausalLM", **config)
    found = layout(bert)
    assert found.cross_attention == tuple(f"bert.encoder.layer.{i}.crossattention.self" for i in (0, 1))
    assert [a.causal for a in found.attention] == [True, True]
    with pytest.warns(MfumonWarning, match="cross-attention"):
        assert flop_breakdown(bert, S).attn_scores == 2 * PER_KEY * CAUSAL_KEYS // S


def test_t5_cross_attention() -> None:
    # transformers 5: EncDecAttention says is_decoder=True, is_causal=False; 4.x: the second of the
    # two is_decoder attentions in each decoder block
    config = dict(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    t5 = _build("t5", "AutoModelForSeq2SeqLM", **config)
    found = layout(t5)
    assert [a.causal for a in found.attention] == [False, False, True, True]  # encoder, decoder
    assert found.cross_attention == tuple(f"decoder.block.{i}.layer.1.EncDecAttention" for i in (0, 1))
    with pytest.warns(MfumonWarning, match="cross-attention"):
        assert flop_breakdown(t5, S).attn_scores == PER_KEY * (2 * S * S + 2 * CAUSAL_KEYS) // S


# --- state-space and linear-attention layers --------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_hybrid_mixers_have_no_softmax_term(model_type: str) -> None:
    model = _build(model_type, "AutoModelForCausalLM", attn="sdpa", **HYBRIDS[model_type])
    found = layout(model)
    assert list(found.attention) == [AttentionShape(4, 16, 16, None, causal=True)]  # layer 1 only
    assert found.recurrent == (f"model.layers.0.{MIXER[model_type]}",)
    breakdown = flop_breakdown(model, S)
    assert breakdown.attn_scores == PER_KEY * CAUSAL_KEYS // S  # one causal layer: 6,528
    palm = flop_breakdown(model, S, convention="palm")
    ops = _op_flops(model, {"input_ids": token_batch(B, S) % (VOCAB - 3) + 3})  # no pad tokens
    tokens = B * S
    sdpa = sum(n for op, n in ops.items() if "attention" in op)
    assert sdpa == palm.attn_scores * tokens  # the one attention layer is all the kernel ran
    matmuls = ops.get("mm", 0) + ops.get("addmm", 0) + ops.get("_grouped_mm", 0)
    conv = CONV_WEIGHTS[model_type]
    assert matmuls == (palm.total - palm.other - palm.attn_scores - 6 * conv) * tokens  # weights, exact
    assert ops["convolution"] == 2 * conv * (S + 3) * B  # depthwise conv over s + k - 1 padded positions


def test_bamba_components_by_hand(caplog: pytest.LogCaptureFixture) -> None:
    bamba = _build("bamba", "AutoModelForCausalLM", **HYBRIDS["bamba"])
    with caplog.at_level(logging.INFO, logger="mfumon"):
        flop_breakdown(bamba, S)
        flop_breakdown(bamba, S)
    said = [r.getMessage() for r in caplog.records if r.name == "mfumon"]
    assert len(said) == 1 and "state-space / linear-attention layers (1: model.layers.0.mamba" in said[0]
    in_proj = 64 * (128 + 160 + 8)  # x and gate z (8 heads x 16), conv channels (x, B, C), dt per head
    mixer = in_proj + 160 * 4 + 128 * 64  # in_proj, depthwise conv, out_proj
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64  # q, k, v (2 K/V heads), o
    assert flop_breakdown(bamba, S).attn_proj == 6 * (mixer + attention)
    # checkpointing the mixer re-runs its forward: weights and vectors, no attention term
    vectors = 160 + 3 * 8 + 128  # conv bias; dt_bias, A_log, D per head; gated norm
    rerun = flop_breakdown(bamba, S, recompute=(bamba.get_submodule("model.layers.0.mamba"),))
    assert rerun.recompute == forward_flops(6 * (mixer + vectors))


def test_jamba_mamba1_state_matrix_is_not_a_matmul() -> None:
    jamba = _build("jamba", "AutoModelForCausalLM", **HYBRIDS["jamba"])
    mixer = 64 * 256 + 128 * 4 + 128 * (8 + 2 * 16) + 8 * 128 + 128 * 64  # in, conv, x_proj, dt_proj, out
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64
    breakdown = flop_breakdown(jamba, S)
    assert breakdown.attn_proj == 6 * (mixer + attention)  # A_log (128 x 16) is elementwise: in `other`
    assert jamba.get_submodule("model.layers.0.mamba").A_log.shape == (128, 16)
