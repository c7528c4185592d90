"""`mfumon watch`: --once on a real run, the tail reader, a live watch beside a real monitor, idle cost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import mfumon
from mfumon import metrics as K
from mfumon.cli import main
from mfumon.cli.watch import Tail, sparkline
from mfumon.runlog import read_run
from tests.test_cli_compare import PEAK_TFLOPS, pct, real_run


def test_once_prints_the_current_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = real_run(tmp_path, "r")
    records = read_run(path).records
    last = records[-1]
    assert main(["watch", "--once", str(path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == "" and len(lines) == 4
    assert lines[0] == f"{path}  cpu · peak {PEAK_TFLOPS:g} TFLOP/s fp32 · 1 rank"
    assert lines[1].startswith(f"step 20  window 4  MFU {pct(last[K.MFU])}  avg {pct(last[K.MFU_AVG])}")
    series = [r[K.MFU] for r in records]  # windows at steps 8, 12, 16, 20
    spark = lines[2].split()[1]
    assert len(spark) == 4 and set(spark) <= set("▁▂▃▄▅▆▇█")
    assert spark[series.index(max(series))] == "█" and spark[series.index(min(series))] == "▁"
    assert lines[3].startswith(f"tokens/s {last[K.TOKENS_PER_S]:,.0f}  step time ")
    assert lines[3].endswith(f"goodput {pct(last[K.GOODPUT])}")  # the last window's, as logged


def test_once_without_a_peak_draws_tokens_per_s(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nopeak.jsonl"
    rows = [(8, 1000.0), (12, 1200.0), (16, 1100.0)]
    windows = [{"step": s, "time": 1.0, K.TOKENS_PER_S: t, "mfumon/goodput": 0.9} for s, t in rows]
    path.write_text("".join(json.dumps(window) + "\n" for window in windows))
    assert main(["watch", "--once", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "no peak known: no MFU" in lines[0] and "MFU -  avg -" in lines[1]
    # 1000 lowest, 1200 highest, 1100 halfway: 0.5 x 7 = 3.5, rounded to even: block 4 (▅)
    assert lines[2] == "tokens/s ▁█▅  1,000 .. 1,200, last 3 windows"
    assert lines[3] == "tokens/s 1,100  step time -  TFLOP/s per device -  goodput 90.00%"


def test_once_shows_the_latest_run_of_a_file_written_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = real_run(tmp_path, "twice", steps=20)
    real_run(tmp_path, "twice", steps=12)  # the same run name again: the monitor appends to the file
    assert [r["step"] for r in read_run(path).records] == [8, 12, 16, 20, 8, 12]
    assert main(["watch", "--once", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("step 12  window 2  MFU ")  # the second run's two windows
    assert len(lines[2].split()[1]) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("", "no logged window yet"), ("x,y\n1,2\n", "line 1 is not JSON")],
)
def test_once_on_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["watch", "--once", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err


def test_sparkline() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"  # 7 steps, one block each
    assert sparkline([0.4, 0.4, 0.4]) == "▅▅▅"  # flat: block 4 of 0-7
    assert sparkline([]) == "-"


def test_tail_reads_appended_bytes_and_waits_for_a_whole_line(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    tail = Tail(path)
    assert tail.poll() == ([], "missing")
    path.write_bytes(b'{"step": 1}\n{"step": 2, "mfu')  # the second line is still being written
    lines, event = tail.poll()
    assert (lines, event, tail.offset) == ([b'{"step": 1}'], None, 12 + 16)  # every byte read once
    assert tail.poll() == ([], None)  # nothing new: nothing read
    with path.open("ab") as f:
        f.write(b'mon/mfu": 0.5}\n')
    assert tail.poll() == ([b'{"step": 2, "mfumon/mfu": 0.5}'], None)
    path.write_bytes(b'{"step": 1}\n')  # truncated: a new run under the same name
    assert tail.poll() == ([b'{"step": 1}'], "truncated")
    replacement = tmp_path / "next.jsonl"
    replacement.write_bytes(b'{"step": 7}\n')
    os.replace(replacement, path)  # rotated: another file at the path
    assert tail.poll() == ([b'{"step": 7}'], "replaced")


class Watch:
    """`python -m mfumon watch` in a subprocess, its stdout collected by a thread."""

    def __init__(self, path: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mfumon", "watch", str(path), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.out: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)

    def wait_for(self, ok: Callable[[str], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok("".join(self.out)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"watch never showed {what}; its output:\n{''.join(self.out)}")
            time.sleep(0.05)

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        self._reader.join(timeout=10)
        return self.proc.returncode, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.stop()


def test_a_live_watch_follows_a_real_monitor(tmp_path: Path, watches: list[Watch]) -> None:
    path = tmp_path / "live.jsonl"
    watch = Watch(path, "--interval", "0.1")
    watches.append(watch)
    watch.wait_for(lambda out: "to appear" in out, "that it waits for the file")
    model = torch.nn.Linear(8, 8)
    mon = mfumon.monitor(
        model, seq_len=4, loggers=("jsonl",), log_dir=tmp_path, run_name="live", log_every=4, warmup=4,
        peak_tflops=PEAK_TFLOPS,
    )  # fmt: skip
    with mon:
        for step in range(1, 17):
            model(torch.randn(4, 8)).sum().backward()
            mon.step(tokens=16)
            if step in (8, 12):  # a window was just written: the watch shows it
                watch.wait_for(lambda out, s=step: f"step {s}  window {s // 4 - 1}" in out, f"step {step}")
    watch.wait_for(lambda out: "(run closed)" in out, "the run closing")  # step 16's window, the summary
    code, err = watch.interrupt()
    assert code == 0 and err == ""  # Ctrl-C ends it quietly
    out = "".join(watch.out)
    frames = out.split("\n\n")  # not a terminal: each frame is appended, a blank line after it
    assert f"step 16  window 3  MFU {pct(read_run(path).records[-1][K.MFU])}" in out
    assert sum("window" in frame for frame in frames) == 3  # one frame per window (the last with the close)


def test_an_idle_watch_draws_nothing_new(tmp_path: Path, watches: list[Watch]) -> None:
    # Idle, it only polls the file's size (its CPU cost, 0.11-0.14% of a core, is measured by
    # benchmarks/bench_watch_idle.py, not here: a timed test flakes on a loaded machine).
    path = real_run(tmp_path, "idle")
    watch = Watch(path)  # the default 0.5 s poll
    watches.append(watch)
    watch.wait_for(lambda out: "window 4" in out, "the run")
    shown = "".join(watch.out)
    time.sleep(2.0)  # four polls with nothing new
    assert "".join(watch.out) == shown
    assert watch.interrupt()[0] == 0
