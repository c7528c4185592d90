"""Host-side cost of `Monitor.step()`, against the same loop without the monitor.

Two measurements, each a baseline and a monitored run in this process, repeated, medians:
1. an empty loop: microseconds per `mon.step()`, log steps (window resolution, JSONL write)
   included;
2. a real training step of a small GPT: ratio of monitored to plain step time.
When CUDA is available, (2) runs on the GPU under `torch.cuda.set_sync_debug_mode("error")`,
so any host sync the monitor made per step would raise.

    python benchmarks/bench_overhead.py [--steps 20000] [--train-steps 200]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from train_tiny_gpt import TinyGPT  # noqa: E402

import mfumon  # noqa: E402


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def empty_loop_us(steps: int, log_dir: str) -> tuple[float, float]:
    """(baseline, monitored) microseconds per iteration of a loop doing nothing else."""
    t0 = time.perf_counter()
    for _ in range(steps):
        pass
    base = (time.perf_counter() - t0) / steps * 1e6
    mon = mfumon.Monitor(
        flops_per_token=1000,
        peak_tflops=1e6,  # an empty loop "runs" 2048 tokens a step in microseconds: keep its MFU possible
        device="cpu",
        loggers=("jsonl",),
        log_every=10,
        warmup=5,
        log_dir=log_dir,
        run_name="bench",
    )
    mon.start()
    t0 = time.perf_counter()
    for _ in range(steps):
        mon.step(tokens=2048)
    monitored = (time.perf_counter() - t0) / steps * 1e6
    mon.close()
    return base, monitored


def train_ratio(device: torch.device, steps: int, log_dir: str) -> tuple[float, float]:
    """(plain, monitored) median seconds per training step of a small GPT."""
    torch.manual_seed(0)
    seq, vocab = 256, 256
    big = device.type == "cuda"
    model = TinyGPT(
        vocab, seq, d_model=512 if big else 128, n_layers=8 if big else 2, n_heads=8 if big else 4
    )
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (16 if big else 4, seq), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if big else torch.autocast("cpu", enabled=False)

    def train_step() -> int:
        with ctx:
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return x.numel()

    def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            if big:
                torch.cuda.set_sync_debug_mode("error")  # any host sync inside the step raises
            fn()
            if big:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()  # the benchmark's own clock, not the monitor's
            out.append(time.perf_counter() - t0)
        return out

    for _ in range(10):
        train_step()
    mon = mfumon.Monitor(
        model,
        seq_len=seq,
        loggers=("jsonl",),
        log_every=10,
        warmup=5,
        peak_tflops=1e4,  # above any device: no impossible-MFU report in the output
        log_dir=log_dir,
        run_name="bench-train",
    )
    mon.start()
    plain, monitored = [], []
    for _ in range(5):  # interleave to cancel drift
        plain += timed(train_step, steps // 5)
        monitored += timed(lambda: mon.step(tokens=train_step()), steps // 5)
    mon.close()
    return statistics.median(plain), statistics.median(monitored)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--train-steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bases, mons = zip(*(empty_loop_us(args.steps, tmp) for _ in range(5)), strict=True)
        base, mon = statistics.median(bases), statistics.median(mons)
        print(
            f"{device_label(torch.device('cpu'))}: mon.step() host cost {mon - base:.2f} us/step "
            f"(empty loop {base:.3f} us, with monitor {mon:.2f} us; log_every=10, JSONL)"
        )
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        for device in devices:
            plain, monitored = train_ratio(device, args.train_steps, tmp)
            print(
                f"{device_label(device)}: train step {plain * 1e3:.3f} ms plain, {monitored * 1e3:.3f} ms "
                f"monitored, ratio {monitored / plain:.4f}x"
                + (" (under set_sync_debug_mode('error'): no host sync)" if device.type == "cuda" else "")
            )


if __name__ == "__main__":
    main()
