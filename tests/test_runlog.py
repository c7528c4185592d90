"""Reading a run back from the JSONL a real monitor wrote (mfumon.runlog)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mfumon
from mfumon import metrics as K
from mfumon.runlog import RunLogError, read_run


def write_run(tmp_path: Path, steps: int = 12) -> Path:
    """A real monitor on a tiny model, host clock, known peak: windows at every 4th step."""
    model = __import__("torch").nn.Linear(8, 8)
    with mfumon.monitor(
        model,
        seq_len=4,
        loggers=("jsonl",),
        log_dir=tmp_path,
        run_name="r",
        log_every=4,
        warmup=4,
        peak_tflops=1.0,
    ) as mon:
        for _ in range(steps):
            model(__import__("torch").randn(4, 8)).sum().backward()
            mon.step(tokens=16)
    return tmp_path / "r.jsonl"


def test_a_real_run_reads_back_with_its_facts(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path))
    steps, mfu = run.series("mfu")
    assert steps == [8, 12]  # warm-up (steps 1-4) is not logged; windows at 8 and 12
    assert len(mfu) == 2 and all(0 < v < 1 for v in mfu)
    assert run.run["warmup"] == 4 and run.run["flops_per_token"] == 6 * (64 + 8)  # Linear(8, 8): 6 x 72
    assert run.run["flops_by_component"]["mlp"] == 6 * 64
    assert K.MFU in run.keys() and run.label == "r"
    assert run.summary is not None and run.summary["steps"] == 8
    assert run.latest(K.MFU) == mfu[-1] and run.notes == []


def test_a_line_cut_off_mid_write_is_skipped_with_a_note(tmp_path: Path) -> None:
    path = write_run(tmp_path)
    whole = path.read_text()
    path.write_text(whole + '{"step": 16, "time": 1.0, "mfumon/mf')  # a crash mid-write
    run = read_run(path)
    assert [r["step"] for r in run.records] == [8, 12]
    assert run.notes == [f"{path}: skipped its last line, cut off mid-write"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("", "no logged window yet"),
        ("not json at all\n", "line 1 is not JSON"),
        ('{"a": 1}\n', "no integer 'step'"),
        ('{"step": 1, "loss": 2.0}\n', "no 'mfumon/...' metric"),
        ('{"step": 1, "mfumon/mfu": 0.1}\nbroken\n{"step": 2, "mfumon/mfu": 0.1}\n', "line 2 is not JSON"),
    ],
)
def test_bad_files_give_one_clear_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RunLogError, match=message) as info:
        read_run(path)
    assert "\n" not in str(info.value)


def test_files_from_0_1_without_run_facts_still_read(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"step": 10, "time": 1.0, "peak_dtype": "bf16", K.MFU: 0.4}) + "\n")
    run = read_run(path)
    assert run.run == {} and run.series(K.MFU) == ([10], [0.4]) and run.summary is None
