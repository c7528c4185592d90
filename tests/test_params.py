"""count_params on real tiny models: dense, MoE in every layout, hand-written, sharded."""

from __future__ import annotations

import sys

import pytest
from torch import nn

from mfumon.errors import ConfigError, ConfigTypeError
from mfumon.params import ParamCounts, count_params, register_moe
from tests.tiny_models import HIDDEN, VOCAB, Expert, HandLM, StackedMoE, hand_moe_lm, hf_model

d, V = HIDDEN, VOCAB  # 64, 128


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # distinct parameters, as the model holds them


# --- hand-written models: no config, structure only --------------------------------------------


def test_mlp_without_embeddings_is_all_matmul() -> None:
    model = nn.Sequential(nn.Linear(64, 256, bias=False), nn.GELU(), nn.Linear(256, 64, bias=False))
    counts = count_params(model)
    # 64*256 + 256*64 = 32768 weights; no tables, so no embedding and no lm_head
    assert counts == ParamCounts(
        total=32_768, active=32_768, embedding=0, lm_head=0, matmul_active=32_768, moe_layers=0
    )


def test_hand_written_moe_with_module_list_experts() -> None:
    model = hand_moe_lm(num_experts=4, top_k=2, f=32)
    embedding = V * d + 64 * d  # wte + wpe (max_len 64)
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d  # ln1, qkv, proj, ln2
    dense = (d * 4 * d + 4 * d) + (4 * d * d + d)
    router = d * 4  # gate Linear(d, E), no bias
    experts = 4 * (d * 32 + 32 * d)  # E x (up + down)
    total = embedding + 2 * block + dense + router + experts + 2 * d  # + ln_f; lm_head tied to wte
    counts = count_params(model)
    assert counts.total == total == _numel(model)
    assert counts.active == total - experts * (4 - 2) // 4  # two of four experts per token
    assert counts.embedding == embedding
    assert counts.lm_head == V * d  # tied, still the output projection
    assert counts.matmul_active == counts.active - embedding + V * d  # the tied weight multiplies as the head
    assert (counts.moe_layers, counts.num_experts, counts.top_k) == (1, 4, 2)


def test_experts_found_without_top_k_names_the_argument() -> None:
    model = hand_moe_lm(top_k_attr="k")  # top_k kept under a name nobody reads
    with pytest.raises(ConfigError, match=r"top_k="):
        count_params(model)
    assert count_params(model, top_k=2).active == count_params(hand_moe_lm()).active


def test_register_moe_instance_supplies_top_k() -> None:
    model = hand_moe_lm(top_k_attr="k")
    register_moe(model.blocks[1].mlp.experts, top_k=2)
    assert count_params(model).active == count_params(hand_moe_lm()).active


def test_stacked_experts_with_biases_and_bare_router_parameter() -> None:
    model = HandLM([StackedMoE(d, 32, num_experts=4, k=2)])
    with pytest.raises(ConfigError, match=r"top_k="):
        count_params(model)
    counts = count_params(model, top_k=2)
    experts = 4 * (d * 32 + 32 + 32 * d + d)  # E x ([d, f] + [f] + [f, d] + [d])
    assert counts.total == _numel(model)
    assert counts.active == counts.total - experts // 2  # router [E, d] counts in full
    assert (counts.moe_layers, counts.num_experts, counts.top_k) == (1, 4, 2)


def test_experts_argument_for_a_container_the_search_misses() -> None:
    class Bank(nn.Module):  # experts as plain attributes: no ModuleList, no stacked weights
        def __init__(self) -> None:
            super().__init__()
            self.e0, self.e1, self.e2, self.e3 = (Expert(d, 32) for _ in range(4))

    class BankMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(d, 4, bias=False)
            self.bank = Bank()

    model = HandLM([BankMoE()])
    assert count_params(model).moe_layers == 0  # not recognisable by structure alone
    counts = count_params(model, experts=Bank, top_k=1)
    assert counts.active == counts.total - 4 * (2 * d * 32) * 3 // 4
    register_moe(Bank, top_k=1)  # a class defined here: no other test sees it
    assert count_params(model) == counts


def test_conv_weights_and_decoder_stacks_are_not_experts() -> None:
    model = nn.Sequential(nn.Conv1d(8, 8, 3), nn.Linear(8, 8))  # a 3-D conv weight [out, in, k]
    assert count_params(model).moe_layers == 0
    dense = HandLM([nn.Linear(d, d), nn.Linear(d, d)])  # blocks: a ModuleList of identical modules
    assert count_params(dense).active == count_params(dense).total

    class Stack(nn.Module):  # identical layers beside a one-output head: a gate alone is no router
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
            self.score = nn.Linear(d, 1)

    assert count_params(Stack()).moe_layers == 0


def test_count_is_cached_per_model() -> None:
    model = hand_moe_lm()
    first = count_params(model)
    assert count_params(model) is first  # no second walk
    assert count_params(model, cache=False) == first


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="no parameters"):
        count_params(nn.ReLU())
    with pytest.raises(ConfigTypeError, match="nn.Module"):
        count_params("gpt2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="top_k"):
        count_params(hand_moe_lm(), top_k=0)
    with pytest.raises(ConfigError, match="exceeds"):
        count_params(hand_moe_lm(), top_k=5)
    with pytest.raises(ConfigTypeError):
        register_moe("experts", top_k=2)  # type: ignore[arg-type]


# --- transformers models (marked: scripts/tf4/run.sh runs them on 4.57 too) ---------------------

# model_type -> (MoE layers, experts, top_k, routed-expert parameters per MoE layer)
MOE_FAMILIES = {
    "mixtral": (2, 4, 2, 4 * 3 * d * 96),  # E x (gate + up + down), intermediate 96
    "qwen2_moe": (2, 4, 2, 4 * 3 * d * 32),  # moe_intermediate 32; shared expert counts in full
    "qwen3_moe": (2, 4, 2, 4 * 3 * d * 32),
    "deepseek_v3": (2, 4, 2, 4 * 3 * d * 32),  # 3 layers, the first dense (first_k_dense_replace=1)
    "gpt_oss": (2, 4, 2, 4 * (3 * d * 96 + 2 * 96 + d)),  # + gate_up bias [E, 2f] + down bias [E, d]
}


@pytest.mark.transformers
@pytest.mark.parametrize("model_type", sorted(MOE_FAMILIES))
def test_hf_moe_active_params(model_type: str) -> None:
    pytest.importorskip("transformers")
    layers, experts, top_k, routed = MOE_FAMILIES[model_type]
    model = hf_model(model_type)
    counts = count_params(model)
    assert counts.total == _numel(model)
    assert (counts.moe_layers, counts.num_experts, counts.top_k) == (layers, experts, top_k)
    assert counts.active == counts.total - layers * routed * (experts - top_k) // experts
    assert counts.embedding == V * d and counts.lm_head == V * d  # untied
    assert counts.matmul_active == counts.active - V * d


@pytest.mark.transformers
def test_hf_interleaved_moe_layers() -> None:
    pytest.importorskip("transformers")
    model = hf_model("qwen2_moe", num_hidden_layers=4, decoder_sparse_step=2)  # MoE in layers 1 and 3
    counts = count_params(model)
    assert counts.moe_layers == 2
    assert counts.active == counts.total - 2 * (4 * 3 * d * 32) // 2


@pytest.mark.transformers
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral"])
def test_hf_dense(model_type: str) -> None:
    pytest.importorskip("transformers")
    model = hf_model(model_type)
    counts = count_params(model)
    assert counts.total == counts.active == _numel(model)
    assert counts.moe_layers == 0 and counts.top_k is None
    if model_type == "gpt2":  # wte + wpe (64 positions); lm_head tied to wte
        assert counts.embedding == V * d + 64 * d
        assert counts.matmul_active == counts.total - counts.embedding + V * d
    else:  # untied lm_head of its own
        assert counts.embedding == counts.lm_head == V * d
        assert counts.matmul_active == counts.total - V * d


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
