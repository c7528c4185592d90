"""Where the monitor's cost on a real GPU step comes from: device_stats on/off, interleaved, and each
ledger source's collect() timed alone. Prints medians; a GPU check (bench_overhead.py gives the total).

    python benchmarks/gpu_overhead_split.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_tiny_gpt import TinyGPT  # noqa: E402

import mfumon  # noqa: E402
from mfumon.errors import FaultLog  # noqa: E402
from mfumon.health import device_sources  # noqa: E402

dev = torch.device("cuda")
torch.manual_seed(0)
model = TinyGPT(256, 256, d_model=512, n_layers=8, n_heads=8).to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randint(0, 256, (16, 256), device=dev)


def step() -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(kind: str, steps: int = 100) -> float:
    times = []
    if kind == "plain":
        mon = None
    else:
        stats = kind == "stats"
        mon = mfumon.Monitor(model, seq_len=256, loggers=(), log_every=10, warmup=2, device_stats=stats)
        mon.start()
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if mon is not None:
            mon.step(tokens=x.numel())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if mon is not None:
        mon.close()
    return statistics.median(times[10:]) * 1e3


for _ in range(3):
    print({k: round(run(k), 3) for k in ("plain", "nostats", "stats")}, flush=True)
for src in device_sources(dev, FaultLog(), lambda: None):
    src.collect()
    t0 = time.perf_counter()
    for _ in range(50):
        src.collect()
    print(f"{src.name}: collect() {(time.perf_counter() - t0) / 50 * 1e6:.1f} us", flush=True)
    src.close()
