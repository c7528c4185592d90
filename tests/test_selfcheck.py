"""The self-check: one training step traced on fake tensors at setup, against the structure's count.

Expected numbers come from outside the self-check: `measure_flops` (FlopCounterMode on a real CPU
step of the same model, batch 1) and hand arithmetic. The trace counts what that real step counts
(matmuls and attention kernels, every score), so `traced` equals the real step's FLOPs per token
exactly; the structure's count it is set against is "palm" less `other` (see tests/test_flops.py).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mfumon
from mfumon.errors import MfumonWarning
from mfumon.flops import flop_breakdown
from mfumon.measure import measure_flops
from mfumon.selfcheck import TOLERANCE, self_check
from tests.tiny_models import HIDDEN, VOCAB, hand_moe_lm, hf_model, token_batch

S = 32
L, D, H = 2, HIDDEN, 4


class BareAttention(nn.Module):
    """Causal self-attention whose head count is kept under a name mfumon does not read."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self._h = H

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self._h, d // self._h).transpose(1, 2) for t in self.qkv(x).split(d, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, S, d/h)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(D), BareAttention(), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class BareDecoder(nn.Module):
    """Two layers; the output head is F.linear(x, wte.weight): no module holds it as a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(64, D)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.ln_f = nn.LayerNorm(D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, S, V)


class Untraceable(nn.Module):
    """A model whose forward reads a value: fake tensors have none, so the trace raises."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if int(idx.max()) >= VOCAB:  # data-dependent Python control flow
            raise ValueError("token id out of range")
        return self.head(self.emb(idx))


def _real_step_per_token(model: nn.Module, inputs: object) -> int:
    return measure_flops(model, inputs) // S  # batch 1: S tokens


# --- the hand-written decoder: what the structure misses is named -------------------------------


def test_hand_written_decoder_is_traced_exactly() -> None:
    model = BareDecoder()
    result = self_check(model, S, warn=False)
    assert result.traced == _real_step_per_token(model, token_batch(1, S))
    # Matmul weights: per layer qkv 3D^2 + proj D^2 + MLP 8D^2 = 12D^2; head V x D (tied, via F.linear).
    # Attention, every score: per layer 6 x S keys x D (heads x head_dim) x 2 (Q@K^T and A@V).
    weights, head, scores = L * 12 * D * D, VOCAB * D, L * 6 * S * D * 2
    assert result.traced == 6 * weights + 6 * head + scores
    assert result.counted == 6 * weights  # the structure sees neither the head nor the attention
    assert not result.agrees


def test_hand_written_decoder_warns_naming_what_is_missing() -> None:
    model = BareDecoder()
    with pytest.warns(MfumonWarning, match="self-check|structure") as caught:
        mon = mfumon.Monitor(model, seq_len=S, loggers=(), peak_tflops=1.0)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "blocks.0.attn, blocks.1.attn (BareAttention)" in message  # the attention layers it missed
    assert "num_heads and head_dim" in message and "attention=" in message  # and the fix
    assert f"own forward (BareDecoder) {6 * VOCAB * D:,}." in message  # the head: 6 x V x D per token
    assert "F.linear(x, wte.weight)" in message and "flops_per_token=" in message
    assert "self_check=False" in message
    assert caught[0].filename == __file__  # points at the line that built the monitor
    assert mon.flops_per_token == mfumon.flops_per_token(model, S)  # the count itself is unchanged


def test_fixing_the_model_silences_the_warning() -> None:
    model = BareDecoder()
    for block in model.blocks:
        block.attn.num_heads, block.attn.head_dim = H, D // H  # the head attributes the structure reads
    missing_head = 6 * VOCAB * D
    result = self_check(model, S, warn=False)
    assert result.traced - result.counted == missing_head  # only the F.linear head is left
    assert "Attention not counted" not in result.message and "own forward (BareDecoder)" in result.message


class TwicePerLayer(BareAttention):
    """Head attributes the structure reads, but the scores are computed twice (e.g. a second pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = H, D // H

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(super().forward(x))


def test_attention_that_differs_from_its_heads_is_named() -> None:
    model = BareDecoder()
    for block in model.blocks:
        block.attn = TwicePerLayer()
    result = self_check(model, S, warn=False)
    scores = L * 6 * S * D * 2  # every score of each layer, once: what the structure counts
    assert result.traced - result.counted == 6 * VOCAB * D + 6 * L * 4 * D * D + scores  # head, 2nd pass
    assert (
        f"Attention differs: attention kernels and batched matmuls come to {2 * scores:,}" in result.message
    )
    assert (
        f"against {scores:,} counted" in result.message and "blocks.0.attn, blocks.1.attn" in result.message
    )
    qkv = f"(Linear) {6 * 3 * D * D:,}"  # the second pass's projections, largest first, then the head
    assert f"blocks.0.attn.qkv {qkv}; blocks.1.attn.qkv {qkv}; own forward (BareDecoder)" in result.message


def test_weights_the_step_never_multiplies_are_named() -> None:
    model = BareDecoder()
    for block in model.blocks:
        block.attn.num_heads, block.attn.head_dim = H, D // H
    model.spare = nn.Linear(D, 8 * D, bias=False)  # held, counted, never called
    result = self_check(model, S, warn=False)
    assert "did not multiply" in result.message and f"spare (Linear) {6 * 8 * D * D:,}." in result.message


def test_turned_off_there_is_no_trace_and_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mfumon.Monitor(BareDecoder(), seq_len=S, loggers=(), peak_tflops=1.0, self_check=False)


def test_the_callbacks_pass_self_check_through() -> None:
    pytest.importorskip("lightning")
    from mfumon.integrations._common import CallbackCore, CallbackOptions
    from mfumon.loggers import Logger

    batch = {"input_ids": token_batch(1, S)}
    off = CallbackCore(CallbackOptions(peak_tflops=1.0, self_check=False), "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor, _ = off.build(BareDecoder(), batch, log_every=1, dtype=None, sink=Logger())
    assert monitor is not None
    off.close()
    on = CallbackCore(CallbackOptions(peak_tflops=1.0), "test")
    with pytest.warns(MfumonWarning, match="blocks.0.attn"):
        monitor, _ = on.build(BareDecoder(), batch, log_every=1, dtype=None, sink=Logger())
    assert monitor is not None
    on.close()


# --- models the structure counts right stay silent ----------------------------------------------


@pytest.mark.transformers
@pytest.mark.parametrize(("model_type", "attn"), [("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")])
def test_tiny_hf_models_agree_and_stay_silent(model_type: str, attn: str) -> None:
    pytest.importorskip("transformers")
    model = hf_model(model_type, attn=attn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mfumon.Monitor(model, seq_len=S, loggers=(), peak_tflops=1.0)
    result = self_check(model, S, warn=False)
    assert result.traced == _real_step_per_token(model, {"input_ids": token_batch(1, S)})
    palm = flop_breakdown(model, S, convention="palm")
    assert result.counted == palm.total - palm.other and result.agrees


@pytest.mark.transformers
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_agrees_with_the_count_plus_recompute(reentrant: bool) -> None:
    pytest.importorskip("transformers")
    model = hf_model("llama", attn="sdpa").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})  # its name on transformers 5.2x, the old one on 4.57
    result = self_check(model, S, recompute="auto", warn=False)
    palm = flop_breakdown(model, S, convention="palm", recompute="auto")
    # The backward re-runs each decoder layer's forward: the trace exceeds the model FLOPs by at
    # most palm.recompute (non-reentrant checkpointing stops early, before a layer's last matmuls).
    assert result.counted < result.traced <= result.counted + palm.recompute
    assert result.agrees
    told_none = self_check(model, S, recompute="none", warn=False)
    assert not told_none.agrees and "HFU only" in told_none.message


def test_nothing_is_written_to_the_model() -> None:
    model = BareDecoder()
    model.blocks[0].requires_grad_(False)  # frozen copies stay frozen; real ones are left alone
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    self_check(model, S, warn=False)
    for name, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[name] and torch.equal(p, before[name])


def test_the_models_hooks_do_not_see_the_trace() -> None:
    model = BareDecoder()
    seen: list[str] = []
    model.register_forward_pre_hook(lambda m, args: seen.append("model"))  # e.g. a callback's hook
    model.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.append("attn"))
    self_check(model, S, warn=False)
    assert seen == []
    model(token_batch(1, S))
    assert seen == ["model", "attn"]  # still registered


def test_a_monitor_built_under_no_grad_still_traces_the_backward() -> None:
    model = BareDecoder()
    with torch.no_grad():
        result = self_check(model, S, warn=False)
    assert result.traced == self_check(model, S, warn=False).traced


@pytest.mark.transformers
def test_a_meta_model_is_traced() -> None:
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.57's Llama on meta fails under fake tensors (an info line, tested below)")
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config("llama"), attn_implementation="sdpa")
    assert self_check(model, S, warn=False).agrees


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's imports (torch.jit), not ours
def test_a_compiled_model_is_traced_through_its_eager_code() -> None:
    result = self_check(torch.compile(BareDecoder()), S, warn=False)
    assert result.traced == self_check(BareDecoder(), S, warn=False).traced


# --- models that cannot be traced get one info line, never a failure ------------------------------


def _info(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mfumon" and "self-check" in r.getMessage()]


@pytest.mark.transformers
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_hf_moe_gets_an_info_line_and_no_warning(model_type: str, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("transformers")
    caplog.set_level(logging.INFO, logger="mfumon")
    model = hf_model(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon = mfumon.Monitor(model, seq_len=S, loggers=(), peak_tflops=1.0)
    (line,) = _info(caplog)
    assert line.startswith("mfumon: self-check skipped") and "structure alone" in line
    assert mon.flops_per_token == mfumon.flops_per_token(model, S)


def test_data_dependent_routing_gets_an_info_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mfumon")
    result = self_check(hand_moe_lm(), S)  # torch.where over the routing: no shape on fake tensors
    assert result.traced is None and len(_info(caplog)) == 1


def test_a_forward_that_raises_under_fake_tensors_never_fails_setup(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mfumon")
    model = Untraceable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon = mfumon.Monitor(model, seq_len=S, loggers=(), peak_tflops=1.0)
    (line,) = _info(caplog)
    assert "trace failed" in line
    assert mon.flops_per_token == 6 * VOCAB * D  # the head, from the structure
    assert model(token_batch(1, S)).shape == (1, S, VOCAB)  # the model still runs for real


def test_a_model_without_token_input_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mfumon")
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU())  # takes a float tensor: no ids to give it
    result = self_check(model, S)
    # nn.Sequential's forward(input) takes one tensor: the trace tries ids and fails on the dtype
    assert result.traced is None and len(_info(caplog)) == 1


def test_tolerance_is_two_percent() -> None:
    assert TOLERANCE == 0.02
