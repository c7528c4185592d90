"""Recompute FLOPs (HFU): checkpointing found on real tiny models, checked against FlopCounterMode.

How a measured step converts to the analytic numbers:
  FlopCounterMode counts what the dispatcher runs, recompute included. As in test_flops.py, the
  attention kernels compute all s x s scores ("palm" convention) and no elementwise work is counted,
  so `other` (6 x norm scales and biases) and its share of the recompute (2 x the re-run modules'
  vectors) are left out:
      measured == (palm.hardware - palm.other - 2 x rerun_vectors) x tokens.
  The static count (flop_breakdown, recompute="auto") re-runs each checkpointed module's whole
  forward. PyTorch's non-reentrant checkpoint (the default of checkpoint_wrapper and of
  transformers 5) stops the recompute early, after the last tensor the backward needs: ops at the
  end of a region whose output nothing saves are not re-run. In a pre-norm layer ending in
  `x + down_proj(h)` that is the down projection, so there the static count is high by 2 x its
  weights per token per layer; tests of the static count use use_reentrant=True or early_stop=False.
  The Monitor watches the first training step (RecomputeProbe) and counts what actually re-ran:
  those tests use the defaults, early stop on.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import mfumon
from mfumon import metrics as K
from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning
from mfumon.flops import FlopBreakdown, flop_breakdown, flops_per_token
from mfumon.measure import measure_flops
from mfumon.params import count_params
from mfumon.recompute import (
    Checkpointed,
    CheckpointPlan,
    ObservedRecompute,
    find_checkpointing,
    observe_recompute,
)
from tests.conftest import mfumon_records
from tests.tiny_models import HIDDEN, VOCAB, Block, Expert, HandLM, hand_moe_lm, hf_model, token_batch

d, V, S, B = HIDDEN, VOCAB, 16, 2  # hidden 64, vocabulary 128, 16 tokens per sequence, batch 2
aten = torch.ops.aten

# Hand-written dense block (tests/tiny_models.Block with a GELU MLP), per token:
HAND_WEIGHTS = d * 3 * d + d * d + 2 * d * 4 * d  # qkv 12288 + proj 4096 + MLP 32768 = 49152
HAND_VECTORS = 3 * d + d + 4 * d + d + 2 * 2 * d  # qkv, proj, fc1, fc2 biases; ln1, ln2: 832
HAND_ATTN_PALM = 2 * 4 * (16 + 16) * S  # forward, 4 heads x (qk 16 + v 16) x 16 keys = 4096
HAND_ATTN_CAUSAL = 2 * 4 * (16 + 16) * 136 // S  # 136 causal keys over 16 queries: 2176
HAND_FC2 = 4 * d * d  # the block's last matmul (256 -> 64): 16384 weights, and d = 64 bias entries
HAND_QKV = 3 * d * d  # 12288 weights, and 3 * d = 192 bias entries

# Tiny Llama decoder layer (tests/tiny_models "llama"), per token:
LLAMA_WEIGHTS = d * 64 + 2 * d * 32 + 64 * d + 3 * d * 96  # q, k, v (2 K/V heads x 16), o; MLP: 30720
LLAMA_VECTORS = 2 * d  # two RMSNorms: 128
LLAMA_ATTN_PALM = 2 * 4 * (16 + 16) * S  # 4096
LLAMA_DOWN = 96 * d  # the down projection, the layer's last matmul: 6144


def dense_lm(seed: int = 0) -> HandLM:
    torch.manual_seed(seed)
    return HandLM([nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(2)])


def counted(model: nn.Module, inputs: Any, region_vectors: int, **kwargs: Any) -> tuple[int, int]:
    """(FlopCounterMode's count of one training step, the analytic hardware FLOPs converted to it)."""
    palm = flop_breakdown(model, S, convention="palm", **kwargs)
    return measure_flops(model, inputs), (palm.hardware - palm.other - 2 * region_vectors) * B * S


def enable_hf(model: nn.Module, **kwargs: Any) -> None:
    """gradient_checkpointing_enable on transformers 4.57, its new name on 5.x."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs)


def hf_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.transformer.h


# --- the 8N rule --------------------------------------------------------------------------------


def test_full_checkpointing_gives_8_flops_per_weight() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256, bias=False), nn.GELU(), nn.Linear(256, 64, bias=False))
    model = nn.Sequential(checkpoint_wrapper(mlp), nn.Linear(64, 64, bias=False))
    b = flop_breakdown(model, seq_len=1)
    # N = 64*256 + 256*64 = 32768 checkpointed weights, 64*64 = 4096 plain ones
    assert b.total == 6 * (32_768 + 4_096)
    assert b.recompute == 2 * 32_768
    assert b.hardware == 8 * 32_768 + 6 * 4_096


@pytest.mark.transformers
def test_checkpointed_llama_layer_counts_8n_and_its_attention_once_more() -> None:
    pytest.importorskip("transformers")
    model = hf_model("llama")
    enable_hf(model)
    hf_layers(model)[1].gradient_checkpointing = False  # only layer 0 re-runs its forward
    six_n = flop_breakdown(model, S, convention="6N")
    layer = LLAMA_WEIGHTS + LLAMA_VECTORS  # 30848 parameters multiplied per token
    assert six_n.hardware == 6 * (count_params(model).matmul_active - layer) + 8 * layer
    causal = flop_breakdown(model, S)
    assert causal.recompute == 2 * layer + 2 * 4 * (16 + 16) * 136 // S  # + causal attention forward
    assert flop_breakdown(model, S, recompute="none").recompute == 0
    assert causal.total == flops_per_token(model, S)  # model FLOPs do not change


# --- detection ----------------------------------------------------------------------------------


@pytest.mark.transformers
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mixtral", "deepseek_v3"])
def test_hf_gradient_checkpointing_is_found(model_type: str) -> None:
    pytest.importorskip("transformers")
    model = hf_model(model_type)
    assert find_checkpointing(model).modules == ()
    enable_hf(model)
    layers = hf_layers(model)
    prefix = "model.layers" if hasattr(model, "model") else "transformer.h"
    expected = tuple(Checkpointed(f"{prefix}.{i}", "transformers") for i in range(len(layers)))
    assert find_checkpointing(model) == CheckpointPlan(expected, ())


def test_plain_models_raise_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in (dense_lm(), hand_moe_lm()):
            assert flop_breakdown(model, S).recompute == 0


def test_apply_activation_checkpointing_wrappers_are_found() -> None:
    model = dense_lm()
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    plan = find_checkpointing(model)
    assert [c.path for c in plan.modules] == ["blocks.0", "blocks.1"]
    assert {c.source for c in plan.modules} == {"checkpoint_wrapper"} and plan.hidden == ()
    # each block: 2 x (weights + vectors) + causal attention forward
    assert flop_breakdown(model, S).recompute == 2 * (2 * (HAND_WEIGHTS + HAND_VECTORS) + HAND_ATTN_CAUSAL)


def test_lightning_fsdp_activation_checkpointing_policy_is_found() -> None:
    fsdp = pytest.importorskip("lightning.fabric.strategies.fsdp")
    model = dense_lm()
    # what FSDPStrategy(activation_checkpointing_policy={Block}) applies to the module at setup
    fsdp._setup_activation_checkpointing(model, fsdp._activation_checkpointing_kwargs(None, {Block}))
    assert [(c.path, c.source) for c in find_checkpointing(model).modules] == [
        ("blocks.0", "checkpoint_wrapper"),
        ("blocks.1", "checkpoint_wrapper"),
    ]


@pytest.mark.transformers
def test_hf_selective_kwargs_and_every_n_layers() -> None:
    pytest.importorskip("transformers")
    model = hf_model("llama", num_hidden_layers=4)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; not in 4.57 or 5.17
        model.activation_checkpointing_enable(every_n_layers=2)
        assert [c.path for c in find_checkpointing(model).modules] == ["model.layers.0", "model.layers.2"]
    enable_hf(model, use_reentrant=False, context_fn=sac([aten.mm.default]))  # Llama has no biases
    plan = find_checkpointing(model)
    assert len(plan.modules) == 4 and {c.saves for c in plan.modules} == {frozenset({"matmul"})}
    # the matmuls are kept: each layer re-runs its causal attention forward and its norms
    assert flop_breakdown(model, S).recompute == 4 * (2 * 4 * (16 + 16) * 136 // S + 2 * LLAMA_VECTORS)


# --- against execution --------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["reentrant", "no_early_stop"])
@pytest.mark.parametrize("blocks", [[0], [0, 1]])
def test_hand_model_matches_flop_counter(wrap: str, blocks: list[int]) -> None:
    model = dense_lm()
    kwargs = {"checkpoint_impl": CheckpointImpl.REENTRANT} if wrap == "reentrant" else {"early_stop": False}
    for i in blocks:
        model.blocks[i] = checkpoint_wrapper(model.blocks[i], **kwargs)
    measured, analytic = counted(model, token_batch(B, S), region_vectors=len(blocks) * HAND_VECTORS)
    assert measured == analytic
    recompute = flop_breakdown(model, S, convention="palm").recompute
    assert recompute == len(blocks) * (2 * (HAND_WEIGHTS + HAND_VECTORS) + HAND_ATTN_PALM)


def test_early_stop_skips_the_regions_last_matmul() -> None:
    model = dense_lm()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])  # non-reentrant, early stop on: the default
    measured, analytic = counted(model, token_batch(B, S), region_vectors=HAND_VECTORS)
    assert measured == analytic - 2 * 4 * d * d * B * S  # fc2 (256 -> 64) is not re-run


def test_experts_checkpointed_inside_an_moe_block_count_top_k_of_e() -> None:
    model = hand_moe_lm(num_experts=4, top_k=2, f=32)  # every token goes to exactly 2 of 4 experts
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, early_stop=False),
        check_fn=lambda m: isinstance(m, Expert),
    )
    assert len(find_checkpointing(model).modules) == 4
    assert flop_breakdown(model, S).recompute == 2 * (4 * 2 * d * 32) * 2 // 4  # 2 x experts' weights x k/E
    measured, analytic = counted(model, token_batch(B, S), region_vectors=0)
    assert measured == analytic


@pytest.mark.transformers
@pytest.mark.parametrize("layers", [[0], [0, 1]])
def test_llama_matches_flop_counter(layers: list[int]) -> None:
    pytest.importorskip("transformers")
    batch = {"input_ids": token_batch(B, S)}
    model = hf_model("llama")
    enable_hf(model, use_reentrant=True)
    for i, layer in enumerate(hf_layers(model)):
        layer.gradient_checkpointing = i in layers
    measured, analytic = counted(model, batch, region_vectors=len(layers) * LLAMA_VECTORS)
    # transformers 4.57 also counts a rotary matmul outside the layers (0.002%, see test_flops.py)
    assert measured == pytest.approx(analytic, rel=1e-4)
    assert flop_breakdown(model, S, convention="palm").recompute == len(layers) * (
        2 * (LLAMA_WEIGHTS + LLAMA_VECTORS) + LLAMA_ATTN_PALM
    )
    enable_hf(model, use_reentrant=False)  # transformers 5's default: early stop skips down_proj
    for i, layer in enumerate(hf_layers(model)):
        layer.gradient_checkpointing = i in layers
    early = measure_flops(model, batch)
    assert early == pytest.approx(analytic - len(layers) * 2 * LLAMA_DOWN * B * S, rel=1e-4)


@pytest.mark.transformers
@pytest.mark.parametrize("model_type", ["gpt2", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_hf_families_match_flop_counter(model_type: str) -> None:
    pytest.importorskip("transformers")
    model = hf_model(model_type)
    enable_hf(model, use_reentrant=True)
    palm = flop_breakdown(model, S, convention="palm")
    assert palm.recompute > 0
    measured = measure_flops(model, {"input_ids": token_batch(B, S)})
    # 1%: the layers' norm scales and biases (2 x vectors per token) are in the analytic count only
    assert measured == pytest.approx((palm.hardware - palm.other) * B * S, rel=0.01)


# --- selective and composable checkpointing -----------------------------------------------------


def sac(ops: list[Any]) -> Any:
    return functools.partial(create_selective_checkpoint_contexts, ops)


@pytest.mark.parametrize(
    ("ops", "saves", "rerun"),
    [
        ([aten.addmm.default], {"matmul"}, HAND_ATTN_PALM),  # every Linear has a bias: addmm
        ([aten._scaled_dot_product_flash_attention_for_cpu.default], {"attention"}, 2 * HAND_WEIGHTS),
        ([aten.gelu.default], set(), 2 * HAND_WEIGHTS + HAND_ATTN_PALM),  # no FLOP op kept
    ],
)
def test_selective_op_lists_match_flop_counter(ops: list[Any], saves: set[str], rerun: int) -> None:
    model = dense_lm()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0], context_fn=sac(ops), early_stop=False)
    assert find_checkpointing(model).modules == (
        Checkpointed("blocks.0", "checkpoint_wrapper", frozenset(saves)),
    )
    assert flop_breakdown(model, S, convention="palm").recompute == rerun + 2 * HAND_VECTORS
    measured, analytic = counted(model, token_batch(B, S), region_vectors=HAND_VECTORS)
    assert measured == analytic


def test_selective_policy_function_is_opaque_and_said_once() -> None:
    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op == aten.addmm.default else CheckpointPolicy.PREFER_RECOMPUTE

    model = dense_lm()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0], context_fn=sac(policy))  # type: ignore[arg-type]
    with pytest.warns(MfumonWarning, match=r"'blocks.0'.*policy that is a function.*recompute=") as caught:
        b = flop_breakdown(model, S)
    assert len(caught) == 1 and b.recompute == 0 and b.hardware == b.total


def test_op_list_keeping_only_some_matmuls_is_opaque() -> None:
    model = dense_lm()
    model.blocks[0].mlp[2] = nn.Linear(4 * d, d, bias=False)  # this block now runs both mm and addmm
    model.blocks[0] = checkpoint_wrapper(model.blocks[0], context_fn=sac([aten.mm.default]))
    with pytest.warns(MfumonWarning, match="keeps only some matmuls"):
        assert flop_breakdown(model, S).recompute == 0


def test_composable_checkpoint_matches_flop_counter() -> None:
    composable = pytest.importorskip("torch.distributed._composable")
    model = dense_lm()
    composable.checkpoint(model.blocks[1], context_fn=sac([aten.addmm.default]))
    assert find_checkpointing(model).modules == (
        Checkpointed("blocks.1", "composable", frozenset({"matmul"})),
    )
    # only the attention forward and the vectors re-run; no trailing matmul to skip
    assert flop_breakdown(model, S, convention="palm").recompute == HAND_ATTN_PALM + 2 * HAND_VECTORS
    measured, analytic = counted(model, token_batch(B, S), region_vectors=HAND_VECTORS)
    assert measured == analytic


# --- what cannot be seen ------------------------------------------------------------------------


class CheckpointsInside(nn.Module):
    """A model that calls torch.utils.checkpoint in its own forward: the regions are not visible."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = dense_lm()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.lm.wte(idx) + self.lm.wpe(torch.arange(idx.shape[1]))
        for block in self.lm.blocks:
            x = checkpoint(block, x, use_reentrant=True)
        return F.linear(self.lm.ln_f(x), self.lm.wte.weight)


class OldStyleFlag(nn.Module):
    """transformers' older convention: a `gradient_checkpointing` flag on the parent, no layer class."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = dense_lm()
        self.gradient_checkpointing = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(idx)


def test_checkpoint_inside_a_forward_is_said_once_and_given_by_modules() -> None:
    model = CheckpointsInside()
    with pytest.warns(
        MfumonWarning, match=r"CheckpointsInside.forward.*torch.utils.checkpoint.checkpoint"
    ) as w:
        hidden = flop_breakdown(model, S, convention="palm")
    assert len(w) == 1 and hidden.recompute == 0 and hidden.hardware == hidden.total  # HFU = MFU
    given = flop_breakdown(model, S, convention="palm", recompute=list(model.lm.blocks))
    assert given.recompute == 2 * (2 * (HAND_WEIGHTS + HAND_VECTORS) + HAND_ATTN_PALM)
    measured, analytic = counted(
        model, token_batch(B, S), region_vectors=2 * HAND_VECTORS, recompute=set(model.lm.blocks)
    )
    assert measured == analytic
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flop_breakdown(model, S, recompute="none").recompute == 0


def test_old_style_flag_is_said() -> None:
    with pytest.warns(MfumonWarning, match="gradient_checkpointing=True, applied inside its own forward"):
        flop_breakdown(OldStyleFlag(), S)


def test_fraction_of_the_forward() -> None:
    model = dense_lm()
    total = flop_breakdown(model, S).total
    assert flop_breakdown(model, S, recompute=1.0).hardware == total + round(total / 3)  # 8N for 6N
    assert flop_breakdown(model, S, recompute=0.25).recompute == round(0.25 * total / 3)
    assert flop_breakdown(model, S, recompute=0).recompute == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "full", "AUTO"])
def test_bad_recompute_values_name_the_choices(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"recompute must be 'auto', 'none', a fraction in \[0, 1\]"):
        flop_breakdown(dense_lm(), S, recompute=bad)


@pytest.mark.parametrize("bad", [True, object(), [1, 2]])
def test_bad_recompute_kinds_name_the_choices(bad: object) -> None:
    with pytest.raises(ConfigTypeError, match="recompute"):
        flop_breakdown(dense_lm(), S, recompute=bad)


def test_recompute_modules_must_belong_to_the_model() -> None:
    with pytest.raises(ConfigError, match="submodules of the model"):
        flop_breakdown(dense_lm(), S, recompute=[nn.Linear(2, 2)])
    with pytest.raises(ConfigError, match="recompute"):
        mfumon.Monitor(dense_lm(), seq_len=S, loggers=(), peak_tflops=1.0, recompute=2)


# --- what re-runs, observed on the first step (defaults: non-reentrant, early stop on) -----------


def monitored(model: nn.Module, inputs: Any) -> tuple[int, FlopBreakdown]:
    """FlopCounterMode's count of one training step, and the breakdown of a Monitor that watched it."""
    with mfumon.Monitor(model, seq_len=S, convention="palm", loggers=(), peak_tflops=1.0) as mon:
        measured = measure_flops(model, inputs)  # forward + backward: the monitor's probe sees it
        mon.step(tokens=B * S)
    assert mon.hw_flops_per_token == mon.breakdown.hardware
    return measured, mon.breakdown


# A hand block checkpointed whole re-runs ln1, attention (qkv, scores, proj), ln2 and fc1, not fc2:
# fc2's matmul saves its input, the last tensor the backward needs, so the recompute stops there.
HAND_BLOCK_RERUN = 2 * (HAND_WEIGHTS - HAND_FC2) + 2 * (HAND_VECTORS - d) + HAND_ATTN_PALM  # 71168


def hand_case(case: str) -> tuple[nn.Module, int, int]:
    """A hand-written model checkpointed with defaults, its re-run FLOPs per token, the vectors in them."""
    if case == "experts":  # each expert re-runs `up`; its `down` ends the region (the routing-weight
        model = hand_moe_lm(num_experts=4, top_k=2, f=32)  # multiply that saves it is outside)
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Expert))
        return model, 2 * 4 * (d * 32) * 2 // 4, 0  # 2 x four up projections x top_k/E = 2/4: 8192
    model = dense_lm()
    block = model.blocks[0]
    if case == "block 0":
        model.blocks[0] = checkpoint_wrapper(block)
        return model, HAND_BLOCK_RERUN, HAND_VECTORS - d
    if case == "both blocks":
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
        return model, 2 * HAND_BLOCK_RERUN, 2 * (HAND_VECTORS - d)
    if case == "attention only":  # qkv and the scores re-run; proj's input is the last saved tensor
        block.attn = checkpoint_wrapper(block.attn)
        return model, 2 * (HAND_QKV + 3 * d) + HAND_ATTN_PALM, 3 * d  # 2 x 12480 + 4096 = 29056
    if case == "nested, early_stop=False":  # the block once, its MLP twice (outer recompute, then its own)
        block.mlp = checkpoint_wrapper(block.mlp, early_stop=False)
        model.blocks[0] = checkpoint_wrapper(block, early_stop=False)
        mlp = 2 * HAND_FC2 + 4 * d + d  # fc1 and fc2 weights, their biases: 33088
        return model, 2 * (HAND_WEIGHTS + HAND_VECTORS) + HAND_ATTN_PALM + 2 * mlp, HAND_VECTORS + 5 * d
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["block 0", "both blocks", "attention only", "experts", "nested, early_stop=False"]
)
def test_monitor_counts_what_the_first_step_re_ran(case: str) -> None:
    model, rerun, vectors = hand_case(case)
    measured, b = monitored(model, token_batch(B, S))
    assert b.recompute == rerun
    assert measured == (b.hardware - b.other - 2 * vectors) * B * S


def default_checkpointing(model: nn.Module) -> bool:
    """Checkpointing turned on with no arguments (the new name on 5.x); True where that means early stop."""
    import transformers

    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    return int(transformers.__version__.split(".")[0]) >= 5  # 4.57 defaults to use_reentrant=True


@pytest.mark.transformers
@pytest.mark.parametrize("layers", [[0], [0, 1]])
def test_monitor_counts_llama_with_default_checkpointing(layers: list[int]) -> None:
    pytest.importorskip("transformers")
    model = hf_model("llama")
    early = default_checkpointing(model)
    for i, layer in enumerate(hf_layers(model)):
        layer.gradient_checkpointing = i in layers
    static = flop_breakdown(model, S, convention="palm")  # each layer's whole forward
    measured, b = monitored(model, {"input_ids": token_batch(B, S)})
    # with early stop each layer re-runs its norms, attention, gate and up projections, not down_proj
    skipped = 2 * LLAMA_DOWN if early else 0
    assert b.recompute == len(layers) * (2 * (LLAMA_WEIGHTS + LLAMA_VECTORS) + LLAMA_ATTN_PALM - skipped)
    assert static.recompute - b.recompute == len(layers) * skipped
    # transformers 4.57 also counts a rotary matmul outside the layers (0.002%, see test_flops.py)
    assert measured == pytest.approx(
        (b.hardware - b.other - 2 * len(layers) * LLAMA_VECTORS) * B * S, rel=1e-4
    )


@pytest.mark.transformers
@pytest.mark.parametrize(
    ("model_type", "skipped"),
    [
        ("gpt2", 0),  # each layer ends in dropout, whose mask is saved after the last matmul
        ("mixtral", 0),  # the experts' outputs are scaled by the routing weights, which saves them
        ("qwen3_moe", 0),
        # dense layer 0 skips its down_proj (96 x 64), the two MoE layers their shared expert's (32 x 64)
        ("deepseek_v3", 2 * (96 * d + 2 * 32 * d)),
    ],
)
def test_monitor_counts_hf_families_with_default_checkpointing(model_type: str, skipped: int) -> None:
    pytest.importorskip("transformers")
    model = hf_model(model_type)
    early = default_checkpointing(model)
    static = flop_breakdown(model, S, convention="palm")
    measured, b = monitored(model, {"input_ids": token_batch(B, S)})
    assert static.recompute - b.recompute == (skipped if early else 0)
    # 1%: the layers' norm scales and biases (2 x vectors per token) are in the analytic count only
    assert measured == pytest.approx((b.hardware - b.other) * B * S, rel=0.01)


def test_reentrant_checkpoint_is_seen_re_running_the_whole_forward() -> None:
    model = dense_lm()
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT),
        check_fn=lambda m: isinstance(m, Block),
    )
    idx = token_batch(B, S)
    observed = observe_recompute(model, lambda: model(idx).sum().backward())
    # each block: 2 x (weights + vectors) + causal attention forward, as the static count says
    full = 2 * (2 * (HAND_WEIGHTS + HAND_VECTORS) + HAND_ATTN_CAUSAL)
    assert (
        flop_breakdown(model, S, recompute=observed).recompute == flop_breakdown(model, S).recompute == full
    )


@pytest.mark.transformers
def test_reentrant_llama_is_seen_re_running_the_whole_forward() -> None:
    pytest.importorskip("transformers")
    model = hf_model("llama")
    enable_hf(model, use_reentrant=True)
    batch = {"input_ids": token_batch(B, S)}
    observed = observe_recompute(model, lambda: model(**batch).logits.sum().backward())
    full = 2 * (2 * (LLAMA_WEIGHTS + LLAMA_VECTORS) + 2 * 4 * (16 + 16) * 136 // S)  # causal attention
    assert (
        flop_breakdown(model, S, recompute=observed).recompute == flop_breakdown(model, S).recompute == full
    )


def test_probe_counts_per_training_forward() -> None:
    model = dense_lm()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])
    idx = token_batch(B, S)

    def step() -> None:
        model.eval()
        with torch.no_grad():
            model(idx)  # evaluation: no checkpoint, nothing re-runs
        model.train()
        with torch.no_grad():
            model(idx)  # no grad: no backward
        for _ in range(3):  # gradient accumulation: three forwards, three backwards
            model(idx).sum().backward()

    observed = observe_recompute(model, step)
    assert flop_breakdown(model, S, convention="palm", recompute=observed).recompute == HAND_BLOCK_RERUN


def test_observe_recompute_needs_a_training_step() -> None:
    model = dense_lm()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])
    idx = token_batch(B, S)
    with pytest.raises(ConfigTypeError, match="step_fn"):
        observe_recompute(model, "step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no backward pass"):
        observe_recompute(model, lambda: model(idx))
    plain = dense_lm()
    assert observe_recompute(plain, lambda: plain(idx).sum().backward()) == ObservedRecompute(())
    observed = observe_recompute(model, lambda: model(idx).sum().backward())
    with pytest.raises(ConfigError, match="another model"):
        flop_breakdown(plain, S, recompute=observed)


# --- the monitor ----------------------------------------------------------------------------------


def train(model: nn.Module, mon: mfumon.Monitor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        idx = token_batch(B, S + 1, seed=step)
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        mon.step(tokens=B * S)


def test_monitor_reports_hfu_above_mfu_by_hardware_over_total() -> None:
    model = dense_lm()
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))  # early stop on
    static = flop_breakdown(model, S)
    with mfumon.monitor(model, seq_len=S, log_every=2, warmup=1, loggers=(), peak_tflops=1.0) as mon:
        train(model, mon, steps=5)
    b: FlopBreakdown = mon.breakdown
    # each block re-runs all but fc2: 2 x (weights + vectors, less fc2's) + causal attention per token
    assert b.recompute == 2 * (2 * (HAND_WEIGHTS - HAND_FC2 + HAND_VECTORS - d) + HAND_ATTN_CAUSAL)
    assert static.recompute - b.recompute == 2 * 2 * (HAND_FC2 + d)  # the setup count, refined
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # probe gone
    m = mon.metrics
    assert m[K.HFU] > m[K.MFU]
    assert m[K.HFU] / m[K.MFU] == pytest.approx(b.hardware / b.total, rel=1e-9)
    assert m[K.HW_TFLOPS_PER_DEVICE] / m[K.TFLOPS_PER_DEVICE] == pytest.approx(b.hardware / b.total, rel=1e-9)
    summary = mon.summary()
    assert summary["hw_flops_per_token"] == b.hardware and summary["flops_per_token"] == b.total
    assert summary[K.HFU] / summary[K.MFU] == pytest.approx(b.hardware / b.total, rel=1e-9)


def test_monitor_keeps_the_setup_count_when_the_observation_fails(
    mfumon_log: pytest.LogCaptureFixture,
) -> None:
    model = dense_lm()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])
    with mfumon.monitor(model, seq_len=S, log_every=2, warmup=1, loggers=(), peak_tflops=1.0) as mon:
        static = mon.breakdown
        model.blocks[0] = nn.Sequential(model.blocks[0])  # moved after setup: the probe's paths are gone
        train(model, mon, steps=3)
    records = mfumon_records(mfumon_log)
    assert len(records) == 1 and "recompute fault" in records[0].getMessage()
    assert mon.breakdown == static and mon.hw_flops_per_token == static.hardware
    assert mon.metrics[K.HFU] / mon.metrics[K.MFU] == pytest.approx(static.hardware / static.total, rel=1e-9)


def test_checkpointing_enabled_after_the_monitor_is_said_once(mfumon_log) -> None:  # type: ignore[no-untyped-def]
    model = dense_lm()
    with mfumon.monitor(model, seq_len=S, log_every=2, warmup=1, loggers=(), peak_tflops=1.0) as mon:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))  # too late
        train(model, mon, steps=3)
    assert mon.breakdown.recompute == 0 and mon.metrics[K.HFU] == mon.metrics[K.MFU]
    records = mfumon_records(mfumon_log)
    assert len(records) == 1 and "enabled after the monitor was built" in records[0].getMessage()


def test_monitor_passes_doc_lengths_to_the_attention_term() -> None:
    model = dense_lm()
    docs = [S // 2, S // 4, S // 4]  # three documents packed into one sequence
    mon = mfumon.Monitor(model, seq_len=S, doc_lengths=docs, loggers=(), peak_tflops=1.0)
    assert mon.flops_per_token == flops_per_token(model, S, doc_lengths=docs)
    assert mon.flops_per_token < flops_per_token(model, S)  # shorter documents attend fewer keys


def test_hidden_checkpointing_warning_points_at_the_caller() -> None:
    with pytest.warns(MfumonWarning, match="cannot see what activation checkpointing") as caught:
        flop_breakdown(CheckpointsInside(), S)
    assert caught[0].filename == __file__  # stacklevel reaches past flop_breakdown to its caller


def test_a_monitor_that_fails_setup_leaves_no_hooks_on_the_model() -> None:
    model = dense_lm()
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])
    for bad in ({"dtype": "fp12"}, {"peak_tflops": -1.0}, {"loggers": ("nope",)}):
        with pytest.raises(ConfigError):
            mfumon.Monitor(model, seq_len=S, **bad)
    assert [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks] == []
    mon = mfumon.Monitor(model, seq_len=S, loggers=(), peak_tflops=1.0)  # a good one hooks the regions
    assert any(m._forward_pre_hooks for m in model.modules())
    mon.close()
    assert [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks] == []
