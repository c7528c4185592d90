"""What step profiling costs: plain steps with `profile_every` on vs off, and the profiled step itself.

Each run trains the same model under a monitor, `profile_every=None` and `profile_every=N` runs
interleaved, `--repeats` times; every step is timed by this script (synchronize + wall clock, the
benchmark's own clock). Printed: the median plain step off and on (profiled steps excluded: "between
profiled steps nothing changes"), the profiled step's median slowdown, and one `profile_step` table.

    python benchmarks/bench_profile.py [--model tiny|gpt2|moe] [--steps 40] [--every 10] [--repeats 3]

On a CPU the default model is examples/train_tiny_gpt.py's TinyGPT; on a GPU `gpt2` (HF GPT-2 small,
bf16 autocast, 8 x 1024 tokens) and `moe` (a small Mixtral: 8 experts, top 2) need transformers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import mfumon  # noqa: E402


def build(kind: str, device: torch.device) -> tuple[torch.nn.Module, Any, int, int]:
    """(model, one training step, tokens per step, seq_len)."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    if kind == "tiny":
        from train_tiny_gpt import TinyGPT

        seq, vocab, batch = 256, 256, 4
        model = TinyGPT(vocab, seq, d_model=128, n_layers=2, n_heads=4)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        if kind == "gpt2":
            seq, batch, cfg = 1024, 8, AutoConfig.for_model("gpt2", vocab_size=50304, n_positions=1024)
        else:  # a small MoE: 8 layers, d 1024, 8 experts of 1024 x 2816, top 2
            seq, batch = 1024, 8
            cfg = AutoConfig.for_model(
                "mixtral", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                max_position_embeddings=seq,
            )  # fmt: skip
        if not cuda:
            seq, batch = 128, 2
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        vocab = cfg.vocab_size
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with ctx:
            if kind == "tiny":
                loss = model(ids).float().logsumexp(-1).mean()
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step, batch * seq, seq


def timed_run(
    model: torch.nn.Module,
    step: Any,
    tokens: int,
    seq: int,
    steps: int,
    every: int | None,
    device: torch.device,
) -> list[float]:
    """Seconds of each step (1-based index i at position i - 1) under a monitor.

    On the CPU, process CPU time (one thread): a shared machine's load moves wall time by tens of %.
    """
    out = []
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    dtype = "bf16" if device.type == "cuda" else "fp32"
    with mfumon.monitor(
        model,
        seq_len=seq,
        loggers=(),
        log_every=10,
        warmup=2,
        profile_every=every,
        peak_tflops=None if device.type == "cuda" else 1.0,  # the GPU's datasheet peak; the CPU has none
        dtype=dtype,
        self_check=False,
    ) as mon:
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()  # the benchmark's own clock, not the monitor's
            t0 = clock()
            step()
            mon.step(tokens=tokens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(clock() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "gpt2", "moe"), default=None)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: comparable across runs on a busy machine
    kind = args.model or ("gpt2" if device.type == "cuda" else "tiny")
    model, step, tokens, seq = build(kind, device)
    for _ in range(3):
        step()  # allocator, AdamW state, cuBLAS handles
    off: list[float] = []
    on_plain: list[float] = []
    profiled: list[float] = []
    for _ in range(args.repeats):
        off += timed_run(model, step, tokens, seq, args.steps, None, device)[3:]
        on = timed_run(model, step, tokens, seq, args.steps, args.every, device)
        for i, seconds in enumerate(on, start=1):
            if i <= 3:
                continue
            (profiled if i % args.every == 0 else on_plain).append(seconds)
    med_off, med_on, med_prof = (statistics.median(x) for x in (off, on_plain, profiled))
    n_on, n_prof = len(on_plain), len(profiled)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    print(f"{name}, model {kind}, {tokens} tokens/step, profile_every={args.every}, {args.repeats} runs")
    print(f"plain step, profiling off: {med_off * 1e3:.3f} ms (median of {len(off)})")
    print(f"plain step, profiling on:  {med_on * 1e3:.3f} ms ({med_on / med_off:.4f}x; {n_on} steps)")
    print(f"profiled step:             {med_prof * 1e3:.3f} ms ({med_prof / med_off:.3f}x; {n_prof} steps)")
    dtype = "bf16" if device.type == "cuda" else None
    profile = mfumon.profile_step(model, step, seq_len=seq, tokens=tokens, dtype=dtype)
    print(profile.table())


if __name__ == "__main__":
    main()
