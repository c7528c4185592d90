"""How long `mfumon report` takes on a long run: a JSONL of 100,000 windows (target: under 5 s).

    python benchmarks/bench_report.py                   # 100,000 windows
    python benchmarks/bench_report.py --windows 20000

The file is written first (every key a monitor logs, the run's facts on the first line, a summary
beside it), then `mfumon.report` is timed in this process, with its parts: reading the file, building the
page's data (series reduced to at most `MAX_POINTS` points each), drawing the HTML; then the
command `python -m mfumon report` end to end, and `import mfumon.cli` alone (torch's import).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mfumon
from mfumon import report_html
from mfumon.reporting import MAX_POINTS, build
from mfumon.runlog import read_run

FACTS = {
    "device": "NVIDIA H200", "peak_tflops": 989.5, "peak_dtype": "bf16", "peak_source": "datasheet",
    "world_size": 8, "seq_len": 4096, "flops_per_token": 50_000_000_000, "hw_flops_per_token": 66_000_000_000,
    "flops_by_component": {"attn_proj": 1, "attn_scores": 2, "mlp": 3, "router": 0, "lm_head": 4, "other": 0,
                           "embedding": 0, "softmax": 0, "recompute": 16},
    "warmup": 10, "log_every": 10, "initial_step": 0, "params_total": 8_000_000_000,
    "params_active": 8_000_000_000, "params_trainable": 8_000_000_000, "measured_peak_tflops": 790.0,
}  # fmt: skip


def write_run(path: Path, windows: int) -> None:
    """A run file of `windows` lines, values that wander like a real run's."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(windows):
            mfu = 0.4 + 0.05 * math.sin(i / 300) + 0.01 * ((i * 7919) % 13) / 13
            record = {
                "step": 20 + 10 * i, "time": 1.8e9 + i, "peak_dtype": "bf16", "device": "NVIDIA H200",
                "mfumon/tflops_per_device": mfu * 989.5, "mfumon/hw_tflops_per_device": mfu * 989.5 * 1.32,
                "mfumon/tokens_per_s": mfu * 1.25e5, "mfumon/tokens_per_s_per_device": mfu * 1.56e4,
                "mfumon/step_time_ms": 262.144 / mfu, "mfumon/mfu": mfu, "mfumon/hfu": mfu * 1.32,
                "mfumon/peak_tflops": 989.5, "mfumon/mfu_avg": 0.4, "mfumon/mfu_measured": mfu * 989.5 / 790,
            }  # fmt: skip
            if i == 0:
                record["run"] = FACTS
            f.write(json.dumps(record) + "\n")
    path.with_suffix(".summary.json").write_text(json.dumps({"mfumon/mfu": 0.4, "steps": windows * 10}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.jsonl"
        write_run(path, args.windows)
        size = path.stat().st_size / 2**20
        print(
            f"run file: {args.windows:,} windows, {size:.1f} MiB; series reduced to <= {MAX_POINTS:,} points"
        )
        for r in range(args.rounds):
            t0 = time.perf_counter()
            out = mfumon.report(path, Path(tmp) / "report.html")
            total = time.perf_counter() - t0
            t0 = time.perf_counter()
            run = read_run(path)
            t1 = time.perf_counter()
            data = build(run)
            t2 = time.perf_counter()
            report_html.page(data)
            t3 = time.perf_counter()
            cli = _seconds([sys.executable, "-m", "mfumon", "report", str(path), "-o", str(out)])
            imports = _seconds([sys.executable, "-c", "import mfumon.cli"])
            print(
                f"round {r + 1}: mfumon.report {total:.2f} s (read {t1 - t0:.2f} s, build {t2 - t1:.2f} s, "
                f"draw {t3 - t2:.2f} s); `python -m mfumon report` {cli:.2f} s, of which importing mfumon "
                f"(and torch) {imports:.2f} s; page {out.stat().st_size / 2**10:.0f} KiB"
            )


def _seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
