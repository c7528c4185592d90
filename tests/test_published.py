"""Full-size models on the meta device reproduce their published parameter counts.

Configs are transcribed from each model's config.json on the Hugging Face Hub (keys that do not
change the parameter count, such as token ids, dropout and rope scaling, are left out). Each test
checks three things: `total` equals what the model instantiates, to the parameter; both counts equal
the closed-form arithmetic written next to them; and both round (or truncate, as some model cards
do) to the published figure.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from mfumon.params import ParamCounts, count_params, layout

pytestmark = pytest.mark.transformers

MIXTRAL_8X7B = {  # mistralai/Mixtral-8x7B-v0.1
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}

QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B
    "model_type": "qwen3_moe",
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

DEEPSEEK_V2_LITE = {  # deepseek-ai/DeepSeek-V2-Lite
    "model_type": "deepseek_v2",
    "first_k_dense_replace": 1,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "v_head_dim": 128,
    "vocab_size": 102400,
}

DEEPSEEK_V3 = {  # deepseek-ai/DeepSeek-V3 (HF builds no multi-token-prediction layer)
    "model_type": "deepseek_v3",
    "first_k_dense_replace": 3,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "routed_scaling_factor": 2.5,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "v_head_dim": 128,
    "vocab_size": 129280,
}

GPT2 = {  # openai-community/gpt2
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
}

BAMBA_9B = {  # ibm-fms/Bamba-9B config.json (also ibm-ai-platform/Bamba-9B)
    "model_type": "bamba",
    "attn_layer_indices": [9, 18, 27],
    "attn_rotary_emb": 64,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "mamba_chunk_size": 256,
    "mamba_conv_bias": True,
    "mamba_d_conv": 4,
    "mamba_d_head": 64,
    "mamba_d_state": 128,
    "mamba_dt_rank": 256,
    "mamba_expand": 2,
    "mamba_n_groups": 1,
    "mamba_n_heads": 128,
    "mamba_proj_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}

JAMBA_V01 = {  # ai21labs/Jamba-v0.1 config.json
    "model_type": "jamba",
    "attn_layer_offset": 4,
    "attn_layer_period": 8,
    "expert_layer_offset": 1,
    "expert_layer_period": 2,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "mamba_conv_bias": True,
    "mamba_d_conv": 4,
    "mamba_d_state": 16,
    "mamba_dt_rank": 256,
    "mamba_expand": 2,
    "mamba_proj_bias": False,
    "num_attention_heads": 32,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "vocab_size": 65536,
}


def _meta_model(config: dict[str, Any]) -> torch.nn.Module:
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    hf_config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _check(model: torch.nn.Module, total: int, active: int) -> ParamCounts:
    counts = count_params(model)
    assert counts.total == sum(p.numel() for p in model.parameters())  # what the model instantiates
    assert (counts.total, counts.active) == (total, active)
    return counts


def _published(count: int, figure: float, unit: float = 1e9) -> bool:
    """`count` shown with one decimal as model cards do (some round, some truncate)."""
    return figure in (round(count / unit, 1), math.floor(count / unit * 10) / 10)


def test_mixtral_8x7b() -> None:
    V, d, L, f, E, k = 32000, 4096, 32, 14336, 8, 2
    attn = d * 4096 + 2 * d * (8 * 128) + 4096 * d  # q, k, v (8 K/V heads x 128), o
    experts = E * 3 * d * f  # w1, w2, w3 per expert
    layer = attn + experts + E * d + 2 * d  # + router, two RMSNorms
    total = 2 * V * d + L * layer + d  # embedding, lm_head (untied), final norm
    active = total - L * experts * (E - k) // E
    counts = _check(_meta_model(MIXTRAL_8X7B), total, active)
    assert total == 46_702_792_704 and _published(total, 46.7) and _published(active, 12.9)
    assert (counts.moe_layers, counts.num_experts, counts.top_k) == (32, 8, 2)


def test_qwen3_30b_a3b() -> None:
    V, d, L, f, E, k, hd = 151936, 2048, 48, 768, 128, 8, 128
    attn = d * 32 * hd + 2 * d * 4 * hd + 32 * hd * d + 2 * hd  # q, k, v, o, q_norm, k_norm
    experts = E * 3 * d * f
    layer = attn + experts + E * d + 2 * d
    total = 2 * V * d + L * layer + d
    active = total - L * experts * (E - k) // E
    _check(_meta_model(QWEN3_30B_A3B), total, active)
    assert _published(total, 30.5) and _published(active, 3.3)


def test_deepseek_v2_lite() -> None:
    V, d, L, H, E, k, f = 102400, 2048, 27, 16, 64, 6, 1408
    attn = d * H * (128 + 64) + d * (512 + 64) + 512 + 512 * H * (128 + 128) + H * 128 * d  # MLA, no q LoRA
    dense_mlp = 3 * d * 10944  # layer 0 (first_k_dense_replace=1)
    experts = E * 3 * d * f
    moe = experts + 3 * d * 2 * f + E * d  # routed, two shared experts, router
    total = 2 * V * d + L * (attn + 2 * d) + dense_mlp + (L - 1) * moe + d
    active = total - (L - 1) * experts * (E - k) // E
    counts = _check(_meta_model(DEEPSEEK_V2_LITE), total, active)
    assert _published(total, 15.7)
    assert _published(active - counts.embedding, 2.4)  # the card counts active without the input embedding


def test_deepseek_v3() -> None:
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 builds 14,848 expert modules: 40 s on meta (see the benchmark)")
    V, d, L, H, E, k, f = 129280, 7168, 61, 128, 256, 8, 2048
    q = d * 1536 + 1536 + 1536 * H * (128 + 64)  # q_a_proj, q_a_layernorm, q_b_proj
    kv = d * (512 + 64) + 512 + 512 * H * (128 + 128)  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
    attn = q + kv + H * 128 * d
    experts = E * 3 * d * f
    moe = experts + 3 * d * f + E * d  # routed, one shared expert, router
    total = 2 * V * d + L * (attn + 2 * d) + 3 * 3 * d * 18432 + (L - 3) * moe + d
    active = total - (L - 3) * experts * (E - k) // E
    _check(_meta_model(DEEPSEEK_V3), total, active)
    assert round(total / 1e9) == 671 and math.floor(active / 1e9) == 37  # "671B total, 37B activated"


def test_gpt2() -> None:
    V, d, L, P = 50257, 768, 12, 1024
    layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    total = V * d + P * d + L * layer + 2 * d  # wte (tied lm_head), wpe, blocks, ln_f
    counts = _check(_meta_model(GPT2), total, total)
    assert total == 124_439_808 and round(total / 1e6) == 124  # "124M"
    assert counts.lm_head == V * d and counts.matmul_active == total - P * d  # tied head multiplies


def _hybrid_layers(model: torch.nn.Module, attention: int, mixers: int) -> None:
    found = layout(model)
    assert len(found.attention) == attention and {a.causal for a in found.attention} == {True}
    assert len(found.recurrent) == mixers  # no softmax term for these (docs/accounting.md)


def test_bamba_9b() -> None:
    V, d, L, f = 128256, 4096, 32, 14336
    H, P, N = 128, 64, 128  # Mamba2 heads, head width, state
    d_inner, conv = H * P, H * P + 2 * N  # conv over x, B and C (one group)
    mamba = d * (d_inner + conv + H) + conv * 4 + conv + 3 * H + d_inner + d_inner * d
    # in_proj (z, x, B, C, dt), depthwise conv + bias, dt_bias / A_log / D, gated norm, out_proj
    attn = d * 4096 + 2 * d * 1024 + 4096 * d  # q, k, v (8 K/V heads x 128), o
    total = 2 * V * d + 29 * mamba + 3 * attn + L * (3 * d * f + 2 * d) + d  # attention in layers 9, 18, 27
    model = _meta_model(BAMBA_9B)
    _check(model, total, total)
    assert round(total / 1e9, 2) == 9.78  # "Bamba 9B (9.78B)", transformers docs, model_doc/bamba
    _hybrid_layers(model, attention=3, mixers=29)


def test_jamba_v01() -> None:
    V, d, L, f, E, k = 65536, 4096, 32, 14336, 16, 2
    d_inner, N, R = 2 * d, 16, 256  # expand 2, state 16, dt rank 256
    in_proj, conv, x_proj, dt_proj = d * 2 * d_inner, d_inner * 5, d_inner * (R + 2 * N), (R + 1) * d_inner
    # in_proj (x, gate), depthwise conv (kernel 4) + bias, x_proj (dt, B, C), dt_proj + bias
    mamba = in_proj + conv + x_proj + dt_proj + d_inner * (N + 1) + d_inner * d + R + 2 * N
    # ... A_log (d_inner x N) and D, out_proj, the dt / B / C layernorms
    attn = d * 4096 + 2 * d * 1024 + 4096 * d
    experts = E * 3 * d * f
    layers = 28 * mamba + 4 * attn + 16 * 3 * d * f + 16 * (experts + d * E) + L * 2 * d  # MoE in odd layers
    total = 2 * V * d + layers + d
    active = total - 16 * experts * (E - k) // E
    model = _meta_model(JAMBA_V01)
    _check(model, total, active)
    # "12B active parameters and a total of 52B parameters across all experts" (ai21labs/Jamba-v0.1 card)
    assert round(total / 1e9) == 52 and round(active / 1e9) == 12
    _hybrid_layers(model, attention=4, mixers=28)
