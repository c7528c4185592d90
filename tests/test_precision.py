"""FP8 beside bf16: which FLOPs run in which dtype, and the FLOP-weighted peak MFU divides by.

Real torchao conversion (`convert_to_float8_training`) on real tiny models; the one stand-in is
NVML, naming the device. Transformer Engine is not installable on this CPU machine: its path is
checked by benchmarks/fp8_gpu_check.py on a GPU (docs/devices.md).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import mfumon
from mfumon import metrics as K
from mfumon.distributed import Reducer
from mfumon.errors import FaultLog, MfumonWarning
from mfumon.flop_model import FlopModel
from mfumon.hardware import PeakInfo, autocast_peak, mixed_peak, resolve_peak
from mfumon.loggers import LoggerSet
from mfumon.loggers.jsonl import JsonlLogger
from mfumon.loggers.stdout import StdoutLogger
from mfumon.precision import find_precision, te_autocast_dtypes
from mfumon.timing import StepTimer
from mfumon.windows import Windows
from tests.test_hardware import gpus
from tests.tiny_models import StackedMoE, hand_moe_lm, hf_model, token_batch

float8 = pytest.importorskip("torchao.float8")
pytestmark = [pytest.mark.usefixtures("fresh_device_state"), pytest.mark.transformers]

T = 1e12
SEQ = 8
CUDA0 = torch.device("cuda", 0)  # named through the NVML stand-in; no CUDA needed

# Tiny Llama (tests/tiny_models.py): d=64, 2 layers, 4 query heads and 2 K/V heads of 16, MLP 96,
# vocab 128, untied head. Per layer: q, o 64*64 = 4096 each; k, v 64*32 = 2048 each; gate, up,
# down 64*96 = 6144 each -> 12,288 + 18,432 = 30,720 linear weights; 2 layers: 61,440.
FP8_LLAMA = 6 * 61_440  # every linear but lm_head is a Float8Linear: 368,640 FLOPs per token
# The rest, in bf16: lm_head 6 * 64*128 = 49,152; norms 6 * (4*64 + 64) = 1,920; attention scores
# 2 layers * 6 * 4 heads * (16 + 16) * (SEQ + 1)/2 keys = 6,912 at SEQ = 8.
TOTAL_LLAMA = FP8_LLAMA + 49_152 + 1_920 + 6_912  # 426,624
# H100 SXM dense datasheet peaks (mfumon/_peaks.py): bf16 1979/2 = 989.5, fp8 3958/2 = 1979 TFLOP/s.
H100_BF16, H100_FP8 = 989.5 * T, 1979 * T


def llama_fp8(**config: object) -> nn.Module:
    """The tiny Llama with every linear but lm_head swapped for Float8Linear, as torchao recommends."""
    model = hf_model("llama", attn="sdpa")
    cfg = float8.Float8LinearConfig(**config) if config else None
    keep_head = lambda m, fqn: fqn != "lm_head"  # noqa: E731
    return float8.convert_to_float8_training(model, module_filter_fn=keep_head, config=cfg)


def flop_model(model: nn.Module, seq_len: int = SEQ) -> FlopModel:
    return FlopModel(
        model,
        seq_len=seq_len,
        flops_per_token=None,
        causal=True,
        convention="mfumon",
        doc_lengths=None,
        recompute="none",
        faults=FaultLog(),
    )


def h100_peak(model: nn.Module, nvml: object = None, **kw: object) -> PeakInfo:
    nvml = nvml or gpus("NVIDIA H100 80GB HBM3")
    base = resolve_peak(peak_tflops=kw.pop("peak_tflops", None), dtype="bf16", device=0, nvml=nvml)
    return mixed_peak(base, flop_model(model), device=CUDA0, follow_autocast=False, nvml=nvml)


# --------------------------------------------------------------------------------------------
# which FLOPs run in fp8
# --------------------------------------------------------------------------------------------


def test_float8_linears_give_the_fp8_share_of_hand_arithmetic() -> None:
    plan = find_precision(llama_fp8(), base="bf16", total=TOTAL_LLAMA)
    assert plan.flops_by_dtype() == {"fp8": FP8_LLAMA, "bf16": TOTAL_LLAMA - FP8_LLAMA}
    assert plan.uncounted == () and not plan.pending


def test_fp8_flops_match_flop_counter_on_the_executed_step() -> None:
    """FlopCounterMode attributes each matmul of a real step to its module: every matmul inside
    `model` (the body) ran in a Float8Linear, lm_head's did not. CPU attention is not counted by
    FlopCounterMode, so only the linears are compared: per token, exactly."""
    model = llama_fp8()
    batch, seq = 2, 16
    ids = token_batch(batch, seq)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    # transformers 4.x computes the rotary table with a matmul inside the body: not a linear, left out
    body = counts["LlamaForCausalLM.model"] - counts.get("LlamaForCausalLM.model.rotary_emb", 0)
    assert body / (batch * seq) == FP8_LLAMA
    assert counts["LlamaForCausalLM.lm_head"] / (batch * seq) == 6 * 64 * 128
    plan = find_precision(model, base="bf16", seq_len=seq)  # no FLOP model total: the structural one
    assert plan.flops_by_dtype()["fp8"] == body // (batch * seq)


def test_a_recipe_keeping_grad_weight_in_high_precision_runs_two_gemms_of_three_in_fp8() -> None:
    recipe = float8.Float8LinearConfig.from_recipe_name("rowwise_with_gw_hp")
    model = float8.convert_to_float8_training(
        hf_model("llama"), module_filter_fn=lambda m, fqn: fqn != "lm_head", config=recipe
    )
    plan = find_precision(model, base="bf16", total=TOTAL_LLAMA)
    # output and grad_input in fp8 (2 + 2 per weight), grad_weight in bf16 (2 per weight)
    assert plan.flops_by_dtype() == {"fp8": 4 * 61_440, "bf16": TOTAL_LLAMA - 4 * 61_440}


def test_a_frozen_float8_weight_runs_no_grad_weight_gemm() -> None:
    model = llama_fp8()
    model.model.layers[0].requires_grad_(False)
    plan = find_precision(model, base="bf16", total=TOTAL_LLAMA)
    # layer 0: output and grad_input GEMMs only, 4 per weight; layer 1: all three, 6 per weight
    assert plan.flops_by_dtype()["fp8"] == 4 * 30_720 + 6 * 30_720


def test_emulated_float8_runs_no_fp8_gemm(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mfumon")
    plan = find_precision(llama_fp8(emulate=True), base="bf16", total=TOTAL_LLAMA)
    assert plan.flops_by_dtype() == {"bf16": TOTAL_LLAMA}
    assert len(plan.emulated) == 14  # 7 linears x 2 layers
    assert any("emulate=True" in r.getMessage() for r in caplog.records)


def test_routed_float8_experts_count_at_top_k_over_experts() -> None:
    model = hand_moe_lm(num_experts=4, top_k=2, f=32)
    float8.convert_to_float8_training(
        model, module_filter_fn=lambda m, fqn: fqn != "lm_head" and not fqn.endswith("gate")
    )
    # per block: qkv 64*192 + proj 64*64 = 16,384; block 0's dense MLP 64*256 * 2 = 32,768;
    # block 1's experts 4 * (64*32 + 32*64) = 16,384 at top_k / E = 2/4: 8,192. The router stays.
    fp8 = 6 * (2 * 16_384 + 32_768 + 8_192)
    plan = find_precision(model, base="bf16", total=10**6)
    assert plan.flops_by_dtype() == {"fp8": fp8, "bf16": 10**6 - fp8}


def test_torchao_float8_grouped_experts_are_named_as_not_counted() -> None:
    from torchao.prototype.moe_training.config import Float8TrainingOpConfig
    from torchao.quantization import quantize_

    model = nn.Sequential(nn.Linear(64, 64), StackedMoE(64, 32, num_experts=4, k=2))
    model[1].top_k = 2  # where mfumon reads it
    quantize_(model, Float8TrainingOpConfig(), filter_fn=lambda m, fqn: fqn == "1.experts")
    with pytest.warns(MfumonWarning, match=r"1 module\(s\) \(1.experts\) hold torchao low-precision"):
        peak = h100_peak(model)
    assert peak.plan is not None and peak.plan.uncounted == ("1.experts",)
    assert peak.flops == H100_BF16 and peak.mix == ()  # their FLOPs stay at the bf16 peak


def test_a_model_without_low_precision_modules_has_one_dtype() -> None:
    plan = find_precision(hf_model("llama"), base="bf16", total=TOTAL_LLAMA)
    assert plan.flops_by_dtype() == {"bf16": TOTAL_LLAMA}
    assert te_autocast_dtypes() is None  # Transformer Engine is not imported here


# --------------------------------------------------------------------------------------------
# the weighted peak
# --------------------------------------------------------------------------------------------


def test_h100_peak_is_weighted_by_flops_per_dtype() -> None:
    peak = h100_peak(llama_fp8())
    bf16 = TOTAL_LLAMA - FP8_LLAMA  # 57,984
    expected = TOTAL_LLAMA / (FP8_LLAMA / H100_FP8 + bf16 / H100_BF16)  # about 1,742 TFLOP/s
    assert peak.flops == pytest.approx(expected, rel=1e-12)
    assert 1742 < peak.tflops < 1743  # type: ignore[operator]
    assert peak.weighted and peak.dtype == "fp8" and peak.fallback == ""
    assert dict(peak.mix) == pytest.approx({"fp8": FP8_LLAMA / TOTAL_LLAMA, "bf16": bf16 / TOTAL_LLAMA})
    assert peak.label == "fp8 86% / bf16 14%"
    assert peak.mix_facts() == {"peak_mix": dict(peak.mix), "peak_weighted": True}


def test_mig_slice_scales_the_weighted_peak() -> None:
    from tests.test_hardware import a100_with_mig

    nvml = a100_with_mig(sms=66, parent="NVIDIA H100 80GB HBM3")  # half of the 132 SMs
    nvml.gpus = nvml.migs  # the monitor's device 0 is the MIG slice
    full = h100_peak(llama_fp8())
    half = h100_peak(llama_fp8(), nvml=nvml)
    assert half.flops == pytest.approx(full.flops / 2, rel=1e-12)  # type: ignore[operator]


def test_a100_has_no_fp8_peak_so_those_flops_count_at_bf16_and_say_so() -> None:
    with pytest.warns(MfumonWarning, match=r"fp8 at the bf16 peak \(NVIDIA A100 has no published fp8 peak\)"):
        peak = h100_peak(llama_fp8(), nvml=gpus("NVIDIA A100-SXM4-80GB"))
    assert peak.flops == 312 * T  # every FLOP at the bf16 peak: nothing invented
    assert peak.fallback == "fp8 at the bf16 peak (NVIDIA A100 has no published fp8 peak)"
    assert peak.mix_facts()["peak_fallback"] == peak.fallback


def test_a_given_peak_wins_and_is_not_weighted() -> None:
    peak = h100_peak(llama_fp8(), peak_tflops=1000.0)
    assert peak.flops == 1000 * T and not peak.weighted
    assert peak.label == "fp8 86% / bf16 14%"  # the mix is still reported
    assert peak.mix_facts()["peak_weighted"] is False


def test_autocast_at_the_first_forward_reweighs_against_its_dtype() -> None:
    nvml = gpus("NVIDIA H100 80GB HBM3")
    model = llama_fp8()
    base = resolve_peak(peak_tflops=None, dtype="fp32", device=0, nvml=nvml)
    peak = mixed_peak(base, flop_model(model), device=CUDA0, follow_autocast=True, nvml=nvml)
    assert peak.pending and peak.label == "fp8 86% / fp32 14%"
    # The first forward runs under bf16 autocast. This torch has no CUDA autocast, so the CPU's is
    # read: the CPU has no peak, the mix is re-weighed all the same.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = autocast_peak(peak, peak_tflops=None, device=torch.device("cpu"), nvml=nvml)
    assert seen.label == "fp8 86% / bf16 14%" and not seen.pending and seen.flops is None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        same = autocast_peak(peak, peak_tflops=None, device=CUDA0, nvml=nvml)
    assert same.flops == peak.flops and same.label == peak.label  # no autocast: fp32 it stays


# --------------------------------------------------------------------------------------------
# the monitor and its loggers
# --------------------------------------------------------------------------------------------


def test_monitor_reports_the_mix_once_in_run_info_and_jsonl(tmp_path: Path) -> None:
    """On the CPU there is no device peak (no MFU), but the mix is found and carried."""
    model = llama_fp8()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = io.StringIO()
    with pytest.warns(MfumonWarning, match="not a GPU"):
        mon = mfumon.Monitor(
            model,
            seq_len=SEQ,
            log_every=2,
            warmup=0,
            loggers=(StdoutLogger(out), "jsonl"),
            log_dir=tmp_path,
            run_name="fp8",
        )
    with mon, torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            ids = token_batch(2, SEQ)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(tokens=ids.numel())
    info = mon.run_info()
    share = FP8_LLAMA / TOTAL_LLAMA
    assert info["peak_mix"] == pytest.approx({"fp8": share, "bf16": 1 - share})
    assert info["peak_weighted"] is False  # no peak to weigh on a CPU
    header = out.getvalue().splitlines()[0]
    assert "FLOPs fp8 86% / bf16 14%" in header
    assert out.getvalue().count("fp8 86%") == 1  # the mix once; the window lines say "mixed"
    line = json.loads((tmp_path / "fp8.jsonl").read_text().splitlines()[0])
    assert line["peak_mix"] == pytest.approx(info["peak_mix"])
    assert json.loads((tmp_path / "fp8.summary.json").read_text())["peak_mix"] == line["peak_mix"]


def test_loggers_get_the_weighted_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log-time half of the monitor with the H100's weighted peak: real steps, real loggers."""
    pytest.importorskip("wandb")
    import wandb

    from mfumon.loggers.tensorboard_logger import TensorBoardLogger
    from mfumon.loggers.wandb_logger import WandbLogger
    from tests.readback import tb_scalars, tb_texts, wandb_run

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")

    model = llama_fp8()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    peak = h100_peak(model)
    faults = FaultLog()
    timer = StepTimer(torch.device("cpu"))
    windows = Windows(
        timer=timer,
        reducer=Reducer(faults),
        flops=flop_model(model),
        peak=peak,
        warmup=0,
        log_every=2,
        device_type="cpu",
        faults=faults,
    )
    out = io.StringIO()
    try:
        wb = WandbLogger(run_name="fp8", log_dir=tmp_path / "wb")
    except Exception:
        wandb.teardown()
        raise
    windows.loggers = LoggerSet(
        [StdoutLogger(out), JsonlLogger(tmp_path / "w.jsonl"), TensorBoardLogger(tmp_path / "tb"), wb]
    )
    timer.start()
    for step in (1, 2, 3, 4):
        ids = token_batch(2, SEQ, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        timer.mark_step(step, ids.numel())
        if step % 2 == 0:
            windows.log(step)
    windows.loggers.call("close")
    weighted = peak.flops / T  # type: ignore[operator]
    assert windows.metrics[K.PEAK_TFLOPS] == pytest.approx(weighted)
    assert out.getvalue().splitlines()[0].count("weighted by FLOPs: fp8 86% / bf16 14%") == 1
    assert "(peak 1742 mixed)" in out.getvalue()
    rows = [json.loads(r) for r in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert [r[K.PEAK_TFLOPS] for r in rows] == pytest.approx([weighted, weighted])
    assert rows[0]["peak_mix"] == pytest.approx(dict(peak.mix))
    assert [v for _, v in tb_scalars(tmp_path / "tb")[K.PEAK_TFLOPS]] == pytest.approx([weighted] * 2)
    assert "peak_mix" in tb_texts(tmp_path / "tb")["mfumon/run_info"]
    run = wandb_run(tmp_path / "wb")  # tears wandb down
    assert [r[K.PEAK_TFLOPS] for r in run["history"] if K.PEAK_TFLOPS in r] == pytest.approx([weighted] * 2)
    assert run["config"]["mfumon/peak_tflops"] == pytest.approx(weighted)
    assert run["config"]["mfumon/peak_mix"] == pytest.approx(dict(peak.mix))
