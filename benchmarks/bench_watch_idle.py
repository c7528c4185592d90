"""CPU cost of an idle `mfumon watch`: a run file that gets no new window, polled at the default 0.5 s.

Starts `python -m mfumon watch` on a file of `--windows` windows, waits for its first frame (so
start-up and the first parse are not counted), then reads the process's user + system CPU time
from /proc over `--seconds` of idling, and prints it as a share of one core (Linux only).

    python benchmarks/bench_watch_idle.py [--seconds 10] [--windows 1000] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """CPU time of a process in s: /proc/<pid>/schedstat (ns), else user + system from /proc/<pid>/stat."""
    schedstat = Path(f"/proc/{pid}/schedstat")
    if schedstat.exists():
        return int(schedstat.read_text().split()[0]) / 1e9  # time on a CPU, all threads
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in clock ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--windows", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.jsonl"
        with path.open("w") as f:
            for i in range(args.windows):
                window = {"step": 10 * (i + 1), "time": 1.0, "mfumon/mfu": 0.4 + 0.01 * (i % 7)}
                window.update(
                    {"mfumon/mfu_avg": 0.42, "mfumon/tokens_per_s": 1e5, "mfumon/step_time_ms": 300.0}
                )
                f.write(json.dumps(window) + "\n")
        cmd = [sys.executable, "-m", "mfumon", "watch", str(path), "--interval", str(args.interval)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            while f"window {args.windows}" not in proc.stdout.readline():  # the first frame is drawn
                pass
            start_cpu, start = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            used, elapsed = cpu_seconds(proc.pid) - start_cpu, time.monotonic() - start
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    print(
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}: idle watch "
        f"({args.windows} windows, poll {args.interval:g} s) used {used * 1e3:.0f} ms of CPU "
        f"in {elapsed:.1f} s "
        f"= {used / elapsed * 100:.2f}% of a core; exit {proc.returncode}"
    )


if __name__ == "__main__":
    main()
