"""Measured MFU/HFU of a real model on a GPU, with activation checkpointing off and on.

GPT-2 small (124M, built from its config with random weights, no download), bf16 autocast,
seq 1024, AdamW. For each setting the monitor's figures are printed beside an independent
wall-clock measurement (synchronize before and after N steps) of the same steps, and
beside `torch.utils.flop_counter.FlopCounterMode`'s count of one training step.

    python benchmarks/bench_mfu_gpu.py [--steps 60] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import mfumon
from mfumon import metrics as K


def build(ckpt: bool) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50304)
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).cuda()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def run(ckpt: bool, steps: int, batch: int, seq: int, tmp: str) -> dict:
    torch.manual_seed(0)
    model = build(ckpt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 50304, (batch, seq), device="cuda")

    def train_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    mon = mfumon.Monitor(
        model,
        seq_len=seq,
        loggers=("stdout", "jsonl"),
        log_every=10,
        warmup=5,
        log_dir=tmp,
        run_name=f"gpt2-ckpt{int(ckpt)}",
    )
    mon.start()
    for _ in range(5):  # warm-up, also inside the monitor's warm-up
        train_step()
        mon.step(tokens=x.numel())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
        mon.step(tokens=x.numel())
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    mon.close()
    s = mon.summary()
    peak = mon.peak.flops
    out = {
        "checkpointing": ckpt,
        "device": mon.device_name,
        "peak_dtype": mon.peak.dtype,
        "peak_tflops": None if peak is None else peak / 1e12,
        "flops_per_token": mon.flops_per_token,
        "hw_flops_per_token": mon.hw_flops_per_token,
        "monitor_step_ms": s.get(K.STEP_TIME_MS),
        "wall_step_ms": wall / steps * 1e3,
        "mfu": s.get(K.MFU),
        "hfu": s.get(K.HFU),
        "tflops_per_device": s.get(K.TFLOPS_PER_DEVICE),
        "tokens_per_s": s.get(K.TOKENS_PER_S),
        "wall_mfu": None if peak is None else mon.flops_per_token * x.numel() * steps / wall / peak,
    }
    try:
        counted = mfumon.measure_flops(model, {"input_ids": x[:1], "labels": x[:1]})
        out["flop_counter_per_token"] = counted / seq
    except Exception as exc:  # report, keep the other numbers
        out["flop_counter_error"] = repr(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in (False, True):
            print(json.dumps(run(ckpt, args.steps, args.batch_size, args.seq_len, tmp)), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
