"""Time the run-file commands (`mfumon plot`, ...) on a long run: a JSONL of 100,000 windows.

The file is written here the way `JsonlLogger` writes it: the run's facts on the first line, every
metric key a single-device run with a known peak logs, a window every 10 steps after a warm-up of
5, and a paused stretch (missing windows) every 10,000 windows. Each command runs in this process
through `mfumon.cli.main`, as a user's `mfumon ...` would; the first run includes importing
matplotlib, the median is of the runs after it.

    python benchmarks/bench_cli.py [--windows 100000] [--repeat 3] [--only plot]

Each command is one `bench_<name>(path, out_dir) -> None` function listed in BENCHES.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfumon import metrics as K  # noqa: E402
from mfumon.cli import main  # noqa: E402

PEAK_TFLOPS = 989.5  # H100 SXM bf16
LOG_EVERY = 10
WARMUP = 5
FLOPS_PER_TOKEN = 48_249_176_064  # Llama-3-8B at seq 2048 (BENCHMARKS.md, bench_selfcheck)


def write_run(path: Path, windows: int) -> None:
    """A run file of `windows` lines with realistic keys and slowly drifting values."""
    facts = {
        "device": "NVIDIA H100 80GB HBM3",
        "peak_dtype": "bf16",
        "peak_tflops": PEAK_TFLOPS,
        "peak_source": "datasheet",
        "world_size": 8,
        "seq_len": 2048,
        "flops_per_token": FLOPS_PER_TOKEN,
        "hw_flops_per_token": FLOPS_PER_TOKEN,
        "warmup": WARMUP,
        "log_every": LOG_EVERY,
        "initial_step": 0,
        "params_total": 8_030_261_248,
        "params_active": 8_030_261_248,
        "params_trainable": 8_030_261_248,
    }
    t0, step = 1.79e9, WARMUP
    with path.open("w", encoding="utf-8") as f:
        for i in range(windows):
            step += LOG_EVERY * (3 if i and i % 10_000 == 0 else 1)  # a pause now and then: 2 windows missing
            mfu = 0.42 + 0.03 * math.sin(i / 500) + 0.01 * math.sin(i * 7.3)
            tflops = mfu * PEAK_TFLOPS
            tokens_per_s = tflops * 1e12 * 8 / FLOPS_PER_TOKEN
            step_ms = 8 * 2048 * 8 / tokens_per_s * 1e3
            record = {
                "step": step,
                "time": t0 + step * step_ms / 1e3,
                "peak_dtype": "bf16",
                "device": facts["device"],
                K.TFLOPS_PER_DEVICE: tflops,
                K.HW_TFLOPS_PER_DEVICE: tflops,
                K.TOKENS_PER_S: tokens_per_s,
                K.TOKENS_PER_S_PER_DEVICE: tokens_per_s / 8,
                K.STEP_TIME_MS: step_ms,
                K.MFU: mfu,
                K.HFU: mfu,
                K.PEAK_TFLOPS: PEAK_TFLOPS,
                K.MFU_AVG: 0.42,
            }
            if i == 0:
                record["run"] = facts
            f.write(json.dumps(record) + "\n")


def bench_plot(path: Path, out_dir: Path) -> None:
    """`mfumon plot RUN.jsonl -o out.png`: the four default charts."""
    with contextlib.redirect_stdout(io.StringIO()):  # the path it prints
        code = main(["plot", str(path), "-o", str(out_dir / "plot.png")])
    assert code == 0, f"mfumon plot exited with {code}"


def bench_report(path: Path, out_dir: Path) -> None:
    """`mfumon report RUN.jsonl -o out.html`: the self-contained page."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["report", str(path), "-o", str(out_dir / "report.html")])
    assert code == 0, f"mfumon report exited with {code}"


def bench_compare(path: Path, out_dir: Path) -> None:
    """`mfumon compare RUN.jsonl RUN.jsonl`: the gate on the run against itself."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["compare", str(path), str(path)])
    assert code == 0, f"mfumon compare exited with {code}"


BENCHES: dict[str, Callable[[Path, Path], None]] = {
    "plot": bench_plot,
    "report": bench_report,
    "compare": bench_compare,
}
END_TO_END = {  # a fresh `python -m mfumon ...` each: interpreter start and imports included
    "plot": ["plot", "{path}", "-o", "{out}/plot.png"],
    "report": ["report", "{path}", "-o", "{out}/report.html"],
}


def timed(fn: Callable[[Path, Path], None], path: Path, out_dir: Path, repeat: int) -> list[float]:
    seconds = []
    for _ in range(1 + repeat):
        t0 = time.perf_counter()
        fn(path, out_dir)
        seconds.append(time.perf_counter() - t0)
    return seconds


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=sorted(BENCHES), default=None)
    args = parser.parse_args()
    print(f"Python {platform.python_version()}, {platform.machine()}, {platform.processor() or '?'}")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        path = out_dir / "long.jsonl"
        t0 = time.perf_counter()
        write_run(path, args.windows)
        size_mb = path.stat().st_size / 1e6
        print(f"wrote {args.windows:,} windows ({size_mb:.1f} MB) in {time.perf_counter() - t0:.1f} s")
        for name, fn in BENCHES.items():
            if args.only and name != args.only:
                continue
            first, *rest = timed(fn, path, out_dir, args.repeat)
            median = statistics.median(rest) if rest else first
            runs = ", ".join(f"{s:.2f}" for s in rest)
            print(f"mfumon {name}: first {first:.2f} s (with imports), then {runs} s: median {median:.2f} s")
        for name, argv in END_TO_END.items():
            if args.only and name != args.only:
                continue
            command = [sys.executable, "-m", "mfumon", *(a.format(path=path, out=out_dir) for a in argv)]
            t0 = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            print(f"python -m mfumon {name}, a fresh process: {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    run()
