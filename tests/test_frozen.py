"""Frozen weights (LoRA, frozen layers, a trained head alone): each weight costs 2 FLOPs per token per
pass over it (forward, its own gradient where it requires one, its input's gradient where that input
requires one), and attention's backward skips the gradient of a Q, K or V that needs none.

Expected numbers come from FlopCounterMode on the executed step (`measure_flops`) and from hand
arithmetic written next to them. As in tests/test_flops.py, the kernels compute every score (the "palm"
attention term) and FlopCounterMode counts no elementwise work, so the measured step is compared with
(palm.total - palm.other) x tokens. Tolerance 0.5% against FlopCounterMode (the issue's): on
transformers 4.x the rotary embedding adds a 0.002% matmul; SDPA's fused CPU backward computes dQ, dK
and dV together once one is needed (LoRA on q and v: the first layer's dK, 0.34% of this 4-layer
model), which the rule leaves out as work the model does not need; eager attention matches exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

import mfumon
from mfumon.errors import ConfigError, ConfigTypeError
from mfumon.flops import attention_training_flops, flop_breakdown, flops_per_token, forward_flops
from mfumon.measure import measure_flops
from mfumon.params import ObservedGrads, count_params, observe_grads
from mfumon.timing import StepTimer
from tests.tiny_models import HIDDEN, VOCAB, hf_model, token_batch

d, V, S, B, L = HIDDEN, VOCAB, 16, 2, 4  # hidden 64, vocabulary 128, 16 tokens, batch 2, 4 layers
TOKENS = B * S
# One tiny Llama layer: q 64x64, k and v 64x32 (2 K/V heads of 16), o 64x64; MLP gate, up, down 64x96.
QKVO = d * d + 2 * d * 32 + d * d  # 12288
MLP = 3 * d * 96  # 18432
LAYER = QKVO + MLP  # 30720 weights
HEAD = V * d  # untied lm_head, 8192
F = 2 * 4 * 16 * S  # palm forward per token of Q@K^T (and of A@V): 2 x heads x head_dim x s keys = 2048


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 256, bias=False), nn.GELU(), nn.Linear(256, 64, bias=False))


def step_of(model: nn.Module, inputs: Any) -> Any:
    def step() -> None:
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        (out.logits if hasattr(out, "logits") else out).sum().backward()

    return step


def measured_and_counted(model: nn.Module, **kwargs: Any) -> tuple[int, int, ObservedGrads]:
    """FlopCounterMode's step, the palm count from an observation of the same step, the observation."""
    batch = {"input_ids": token_batch(B, S)}
    measured = measure_flops(model, batch)
    observed = observe_grads(model, step_of(model, batch))
    model.zero_grad(set_to_none=True)
    palm = flop_breakdown(model, S, convention="palm", grads=observed, **kwargs)
    return measured, (palm.total - palm.other) * TOKENS, observed


# --- hand arithmetic on a two-layer MLP -----------------------------------------------------------


def test_frozen_first_layer_runs_forward_only() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    # first: forward only (its input is data) 2 x 16384; second: forward + weight grad, its input (the
    # frozen layer's output) needs no gradient: 4 x 16384
    assert flops_per_token(model, seq_len=1) == (2 + 4) * 16_384
    assert measure_flops(model, torch.randn(8, 64)) == (2 + 4) * 16_384 * 8


def test_frozen_last_layer_still_passes_the_gradient_back() -> None:
    model = mlp()
    model[2].requires_grad_(False)
    # first: forward + weight grad 4 x 16384; second: forward + input grad (the first is trained) 4 x 16384
    assert flops_per_token(model, seq_len=1) == (4 + 4) * 16_384
    assert measure_flops(model, torch.randn(8, 64)) == (4 + 4) * 16_384 * 8


def test_fully_trainable_keeps_6n_and_fully_frozen_counts_the_forward() -> None:
    model = mlp()
    # 6 per weight (the 6N convention) though autograd skips the first layer's input gradient (data)
    assert flops_per_token(model, seq_len=1) == 6 * 32_768
    assert measure_flops(model, torch.randn(8, 64)) == (4 + 6) * 16_384 * 8
    model.requires_grad_(False)
    assert flops_per_token(model, seq_len=1) == 2 * 32_768  # forward only
    assert flops_per_token(model, seq_len=1, grads="all") == 6 * 32_768  # 0.1's count, on request


def test_attention_backward_skips_what_needs_no_gradient() -> None:
    # one key, one head, d_qk = d_v = 16: Q@K^T and A@V are 32 FLOPs each forward
    assert attention_training_flops(1, 1, 16, 16) == 6 * 32  # all three: 3 x forward
    assert attention_training_flops(1, 1, 16, 16, (True, False, True)) == 2 * (2 * 16 + 3 * 16)  # no dK
    assert attention_training_flops(1, 1, 16, 16, (False, False, True)) == 2 * (16 + 2 * 16)  # dV only
    assert attention_training_flops(1, 1, 16, 16, (False, True, False)) == 2 * (2 * 16 + 2 * 16)  # dK, dA
    assert attention_training_flops(1, 1, 16, 16, (False, False, False)) == 2 * 32  # forward only


# --- a tiny Llama against FlopCounterMode --------------------------------------------------------


def llama(attn: str) -> nn.Module:
    return hf_model("llama", attn=attn, num_hidden_layers=L, tie_word_embeddings=False)


def lora(attn: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(llama(attn), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))


# LoRA r=8 on q (A 64x8, B 8x64) and v (A 64x8, B 8x32), per layer
LORA_A, LORA_B = 2 * d * 8, 8 * d + 8 * 32  # 1024, 768
# Passes per weight with LoRA on q and v. Layer 0: its input (frozen embedding and norm) needs no gradient,
# so q, k, v run forward only (1), the A matrices forward + weight grad (2), the B matrices all three (3);
# o_proj and the MLP get a gradient from Q and V (2). Layers 1-3: every frozen weight 2, LoRA 3. lm_head 2.
LORA_PASSES = (
    (QKVO - d * d + LORA_A * 2 + LORA_B * 3 + d * d * 2 + MLP * 2)
    + (L - 1) * (LAYER * 2 + (LORA_A + LORA_B) * 3)
    + HEAD * 2
)
# Layer 0 needs no dK (K comes from a frozen k_proj on an input without gradient): Q@K^T runs forward
# and dQ (2 F), A@V forward, dA and dV (3 F); the other layers 6 F.
LORA_SCORES = 2 * F + 3 * F + (L - 1) * 6 * F
# Lower half frozen (embedding, layers 0-1): they run forward only, attention included; layers 2-3 and
# the head are trained, their inputs need a gradient from the trained norms: 3 passes.
LOWER_PASSES = 2 * LAYER + 2 * LAYER * 3 + HEAD * 3
LOWER_SCORES = 2 * 2 * F + 2 * 6 * F
# Only the lm_head trained: everything forward only, the head forward + weight grad.
HEAD_PASSES = L * LAYER + HEAD * 2
HEAD_SCORES = L * 2 * F


def freeze_lower(model: nn.Module) -> nn.Module:
    model.model.embed_tokens.requires_grad_(False)
    for layer in model.model.layers[: L // 2]:
        layer.requires_grad_(False)
    return model


def head_only(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    return model


CASES = {
    "lora": (lora, 2 * LORA_PASSES + LORA_SCORES, (L * (LORA_A + LORA_B))),
    "lower": (lambda attn: freeze_lower(llama(attn)), 2 * LOWER_PASSES + LOWER_SCORES, None),
    "head": (lambda attn: head_only(llama(attn)), 2 * HEAD_PASSES + HEAD_SCORES, HEAD),
}


@pytest.mark.transformers
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_against_flop_counter(case: str, attn: str) -> None:
    pytest.importorskip("transformers")
    if case == "lora":
        pytest.importorskip("peft")
    build, by_hand, trainable = CASES[case]
    model = build(attn)
    measured, counted, observed = measured_and_counted(model)
    assert counted == by_hand * TOKENS  # the observed step, counted, is the hand arithmetic
    assert measured == pytest.approx(counted, rel=0.005)
    if attn == "eager":  # the score products run as separate matmuls: each skipped gradient is skipped
        assert measured == pytest.approx(counted, rel=1e-4)
    if trainable is not None:
        assert count_params(model).trainable == trainable  # LoRA: 4 x (1024 + 768) = 7168; head: 8192
    qkv = dict(observed.attention)
    first = next(path for path in qkv if path.endswith("layers.0.self_attn"))
    assert qkv[first] == {"lora": (True, False, True), "lower": (False,) * 3, "head": (False,) * 3}[case]


def freeze_lower_half(model: nn.Module) -> nn.Module:
    """Freeze the input tables and the lower half of the decoder layers of a transformers causal LM."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    for m in inner.modules():
        if isinstance(m, nn.Embedding):
            m.requires_grad_(False)
    layers = next(m for m in inner.modules() if isinstance(m, nn.ModuleList))  # the decoder layers
    for layer in layers[: len(layers) // 2]:
        layer.requires_grad_(False)
    return model


FAMILIES = {  # 4 layers each: two frozen, two trained
    "gpt2": dict(n_layer=L),  # fused QKV Conv1D, tied lm_head (frozen with the table)
    "mixtral": dict(num_hidden_layers=L),  # routed experts x top_k/E
    "qwen2_moe": dict(num_hidden_layers=L),  # shared expert and its gate
    "deepseek_v3": dict(num_hidden_layers=L),  # MLA, a dense first layer
    "gpt_oss": dict(num_hidden_layers=L, layer_types=["sliding_attention", "full_attention"] * 2),  # sinks
}


@pytest.mark.transformers
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_lower_half_frozen_across_families(model_type: str) -> None:
    pytest.importorskip("transformers")
    model = freeze_lower_half(hf_model(model_type, **FAMILIES[model_type]))
    measured, counted, observed = measured_and_counted(model)
    assert measured == pytest.approx(counted, rel=1e-4)  # eager: every skipped gradient skipped
    everything = flop_breakdown(model, S, convention="palm", grads="all")
    assert measured < 0.8 * (everything.total - everything.other) * TOKENS  # 0.1's count was far off
    assert [qkv for _, qkv in observed.attention] == [(False,) * 3] * 2 + [(True,) * 3] * 2


@pytest.mark.transformers
def test_lora_on_a_fused_qkv_projection() -> None:
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(hf_model("gpt2"), peft.LoraConfig(r=8, target_modules=["c_attn"]))
    measured, counted, observed = measured_and_counted(model)
    assert measured == pytest.approx(counted, rel=1e-4)
    assert [qkv for _, qkv in observed.attention] == [(True,) * 3] * 2  # one LoRA feeds Q, K and V


@pytest.mark.transformers
def test_before_any_step_model_order_is_exact_for_frozen_layers_and_over_for_lora() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    for build in (lambda: freeze_lower(llama("eager")), lambda: head_only(llama("eager"))):
        model = build()
        palm = flop_breakdown(model, S, convention="palm")  # no observation: by model order
        observed = flop_breakdown(
            model, S, convention="palm", grads=observe_grads(model, step_of(model, _ids()))
        )
        assert palm.total - palm.other == observed.total - observed.other  # a norm's input may differ
    model = lora("eager")
    palm = flop_breakdown(model, S, convention="palm")
    # by model order, layer 0's k and v (and v's LoRA A) get an input gradient, and its attention a dK:
    # 2 x (64x32 + 64x32 + 64x8) weights and one F more than the step runs
    assert palm.total - palm.other == 2 * LORA_PASSES + LORA_SCORES + 2 * (2 * d * 32 + d * 8) + F


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": token_batch(B, S)}


# --- the monitor watches the first step ------------------------------------------------------------


@pytest.mark.transformers
def test_monitor_counts_what_the_first_step_computed(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    model = lora("eager")
    options: dict[str, Any] = dict(seq_len=S, convention="palm", log_every=1, warmup=0, peak_tflops=1.0)
    with mfumon.Monitor(model, loggers=("stdout",), **options) as mon:
        by_order = mon.flops_per_token
        measured = measure_flops(model, _ids())  # forward + backward: the monitor's probe sees it
        mon.step(tokens=TOKENS)
        assert by_order > mon.flops_per_token  # model order counted layer 0's k and v gradients
        counted = (mon.flops_per_token - mon.breakdown.other) * TOKENS
        assert counted == pytest.approx(measured, rel=1e-4)  # eager: exact (4.x: + a rotary matmul)
        assert mon.flops_per_token - mon.breakdown.other == 2 * LORA_PASSES + LORA_SCORES
        assert mon.hw_flops_per_token == mon.breakdown.hardware
        assert mon.run_info()["params_trainable"] == L * (LORA_A + LORA_B)
        assert not probe_hooks(*model.modules())  # the probe is gone
    total = count_params(model).total
    assert f"{L * (LORA_A + LORA_B):,} of {total:,} parameters trained" in capsys.readouterr().out


def probe_hooks(*modules: nn.Module) -> list[Any]:
    """Forward pre-hooks on `modules` other than the monitor's input-wait mark (it stays till close)."""
    return [
        hook
        for module in modules
        for hook in module._forward_pre_hooks.values()
        if getattr(hook, "__func__", None) is not StepTimer.forward_pre_hook
    ]


def test_a_fully_trainable_model_is_not_watched() -> None:
    model = mlp()
    with mfumon.Monitor(model, seq_len=1, loggers=(), peak_tflops=1.0) as mon:
        assert not probe_hooks(model[0], model[2])  # no probe
        assert mon.flops_per_token == 6 * 32_768


# --- counts, conventions, recompute -----------------------------------------------------------------


@pytest.mark.transformers
def test_trainable_count_follows_freezing_without_cache_false() -> None:
    pytest.importorskip("transformers")
    model = llama("eager")
    counts = count_params(model)
    assert counts.trainable == counts.total
    freeze_lower(model)
    # layers 2-3 (weights and two RMSNorms of 64 each), the final norm and the head
    assert count_params(model).trainable == 2 * (LAYER + 2 * d) + d + HEAD


@pytest.mark.transformers
def test_chinchilla_counts_a_frozen_table_and_softmax_forward_only() -> None:
    pytest.importorskip("transformers")
    model = freeze_lower(llama("eager"))
    chinchilla = flop_breakdown(model, S, convention="chinchilla")
    assert chinchilla.embedding == 2 * V * d  # a frozen one-hot matmul runs forward only
    assert chinchilla.softmax == (3 + 3 + 9 + 9) * 4 * S  # frozen layers 3 per score, trained 9; 4 heads


@pytest.mark.transformers
def test_recompute_is_the_forward_whatever_is_frozen() -> None:
    pytest.importorskip("transformers")
    model = freeze_lower(llama("eager"))
    model.gradient_checkpointing_enable()
    trained = flop_breakdown(model, S, grads="all")
    assert flop_breakdown(model, S).recompute == trained.recompute > 0  # re-running a layer is its forward
    whole_forward = forward_flops(flop_breakdown(model, S, grads="all", recompute="none").total)
    assert flop_breakdown(model, S, recompute=1.0).recompute == whole_forward


# --- the probe and its errors -----------------------------------------------------------------------


class Boom(nn.Module):
    """An attention-like module (head attributes) whose forward fails after an activation product."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 1, 4
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x)
        torch.matmul(q, q.transpose(-1, -2))
        raise RuntimeError("boom")


def test_probe_leaves_nothing_behind_when_a_forward_fails() -> None:
    from mfumon._grads import GradProbe

    model = Boom()
    probe = GradProbe(model)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(1, 2, 3, 4))
    assert torch._C._len_torch_function_stack() == 0  # the recording mode came off with the forward
    probe.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_bad_grads_and_steps_name_what_to_pass() -> None:
    model = mlp()
    with pytest.raises(ConfigError, match="grads"):
        flop_breakdown(model, 1, grads="frozen")
    with pytest.raises(ConfigTypeError, match="grads"):
        flops_per_token(model, 1, grads=3)
    with pytest.raises(ConfigTypeError, match="step_fn"):
        observe_grads(model, "step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="training forward"):
        observe_grads(model, lambda: None)
    x = torch.randn(4, 64)
    with torch.no_grad(), pytest.raises(ConfigError, match="training forward"):
        observe_grads(model, lambda: model(x))
    other = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    other[0].requires_grad_(False)
    observed = observe_grads(other, lambda: other(x).sum().backward())
    model[0].requires_grad_(False)
    with pytest.raises(ConfigError, match="another model"):
        flop_breakdown(model, 1, grads=ObservedGrads(observed.ran | {"nowhere"}, observed.inputs))


def test_refining_logs_the_change(caplog: pytest.LogCaptureFixture) -> None:
    model = mlp()
    model[0].requires_grad_(False)
    x = torch.randn(8, 64, requires_grad=True)  # an input that needs a gradient: model order cannot know
    with caplog.at_level(logging.INFO, logger="mfumon"):
        with mfumon.Monitor(model, seq_len=1, loggers=(), peak_tflops=1.0) as mon:
            assert mon.flops_per_token == (2 + 4) * 16_384
            model(x).sum().backward()
            mon.step(tokens=8)
            assert mon.flops_per_token == (4 + 6) * 16_384  # both inputs needed a gradient
    assert measure_flops(model, x) == (4 + 6) * 16_384 * 8
    assert "frozen weights" in caplog.text
