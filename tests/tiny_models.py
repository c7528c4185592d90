"""Tiny real models for tests: Hugging Face families built from configs, and hand-written modules.

Importing this module has no side effects and does not import transformers; the HF builders
import it when called. Every HF model here has 2-4 layers, hidden size 64 and a 128-token vocabulary,
builds in well under a second on CPU and has the same structure on transformers 4.57 and 5.x.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 128
HIDDEN = 64

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)

# model_type -> config overrides. Each family exercises one structure the counter must handle.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(  # dense, fused QKV Conv1D with biases, learned positions, tied lm_head
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1
    ),
    "llama": dict(_COMMON),  # GQA: 4 query heads, 2 K/V heads
    "mistral": dict(_COMMON, sliding_window=8),  # every layer a sliding window of 8
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(  # shared expert + its sigmoid gate
        _COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
    "qwen3_moe": dict(_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "deepseek_v3": dict(  # MLA, first layer dense, one shared expert
        _COMMON,
        num_hidden_layers=3,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
    ),
    "gpt_oss": dict(  # alternating sliding/full layers, attention sinks, expert biases
        _COMMON,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
}

EAGER_ONLY = {"gpt_oss"}  # transformers has no SDPA path for these


def hf_config(model_type: str, **overrides: Any) -> Any:
    """A tiny transformers config of `model_type` (TINY_CONFIGS defaults, then `overrides`)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def hf_model(model_type: str, *, attn: str = "eager", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny randomly initialised transformers causal LM on CPU, in float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(model_type, **overrides), attn_implementation=attn)


def token_batch(batch: int, seq_len: int, *, seed: int = 0) -> torch.Tensor:
    """Random token ids of shape (batch, seq_len)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq_len), generator=gen)


# --- hand-written modules: no config, no transformers ---------------------------------------------


class CausalSelfAttention(nn.Module):
    """nanoGPT-style attention: fused QKV, `n_head` attribute, SDPA with a causal mask."""

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.n_embd = d
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (
            t.view(b, s, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Expert(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class ListMoE(nn.Module):
    """Top-k routed MoE with a ModuleList of experts; `top_k_attr` names where top_k is kept."""

    def __init__(self, d: int, f: int, num_experts: int, top_k: int, top_k_attr: str = "top_k") -> None:
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, f) for _ in range(num_experts))
        self._k = top_k
        setattr(self, top_k_attr, top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (T, d)
        weights, chosen = torch.topk(self.gate(flat).softmax(dim=-1), self._k, dim=-1)  # (T, k)
        return dispatch(self.experts, flat, weights, chosen).view_as(x)


def dispatch(
    experts: nn.ModuleList, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
) -> torch.Tensor:
    """Each token (a row of `flat`) through its chosen experts ([T, k] indices), summed by `weights`."""
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        token, slot = torch.where(chosen == e)
        if token.numel():
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
    return out


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, mlp: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class HandLM(nn.Module):
    """A hand-written GPT: learned positions, tied lm_head, one block per entry of `mlps`."""

    def __init__(self, mlps: list[nn.Module], *, d: int = HIDDEN, n_head: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, d)
        self.wpe = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head, mlp) for mlp in mlps)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, nanoGPT-style

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def hand_moe_lm(
    *, num_experts: int = 4, top_k: int = 2, f: int = 32, top_k_attr: str = "top_k", seed: int = 0
) -> HandLM:
    """Two blocks: a dense GELU MLP, then a ListMoE (an interleaved, dense-first layout)."""
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))
    return HandLM([dense, ListMoE(HIDDEN, f, num_experts, top_k, top_k_attr)])


class StackedExperts(nn.Module):
    """Experts as stacked 3-D parameters, [E, d, f] then [E, f, d], with per-expert biases."""

    def __init__(self, d: int, f: int, num_experts: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(num_experts, d, f) * 0.02)
        self.b_in = nn.Parameter(torch.zeros(num_experts, f))
        self.w_out = nn.Parameter(torch.randn(num_experts, f, d) * 0.02)
        self.b_out = nn.Parameter(torch.zeros(num_experts, d))

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.gelu(x @ self.w_in[expert] + self.b_in[expert]) @ self.w_out[expert] + self.b_out[expert]


class StackedMoE(nn.Module):
    """Top-k MoE over StackedExperts; the router is a bare [E, d] parameter, top_k in `k`."""

    def __init__(self, d: int, f: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.router_weight = nn.Parameter(torch.randn(num_experts, d) * 0.02)
        self.experts = StackedExperts(d, f, num_experts)
        self.k = k  # not a name mfumon looks for: the caller must pass top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk((flat @ self.router_weight.T).softmax(dim=-1), self.k, dim=-1)
        out = torch.zeros_like(flat)
        for e in range(self.router_weight.shape[0]):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, self.experts(flat[token], e) * weights[token, slot, None])
        return out.view_as(x)
