"""`mfumon compare`: a real monitor's run files, and hand-edited copies for the regression cases."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import mfumon
from mfumon import metrics as K
from mfumon.cli import main
from mfumon.comparison import parse_tolerance, whole_run
from mfumon.errors import ConfigError, MfumonError
from mfumon.runlog import read_run
from tests.procs import run

PEAK_TFLOPS = 1e-3  # a Linear(8, 8) step on the CPU reaches ~5e-5 TFLOP/s: an MFU of a few percent


def real_run(directory: Path, name: str = "base", steps: int = 20) -> Path:
    """A real monitor on a tiny model, host clock, known peak: windows at steps 8, 12, 16, 20."""
    model = torch.nn.Linear(8, 8)
    with mfumon.monitor(
        model,
        seq_len=4,
        loggers=("jsonl",),
        log_dir=directory,
        run_name=name,
        log_every=4,
        warmup=4,
        peak_tflops=PEAK_TFLOPS,
    ) as mon:
        for _ in range(steps):
            model(torch.randn(4, 8)).sum().backward()
            mon.step(tokens=16)
    return directory / f"{name}.jsonl"


def pct(fraction: float) -> str:
    """A fraction as compare prints it: two decimals from 0.1%, three significant digits below."""
    return f"{fraction * 100:.2f}%" if fraction >= 0.001 else f"{fraction * 100:.3g}%"


def edited_copy(source: Path, name: str, *, summary: dict | None = None, facts: dict | None = None) -> Path:
    """A copy of a run under `name`, its summary's values and its first line's run facts replaced."""
    target = source.with_name(f"{name}.jsonl")
    lines = source.read_text().splitlines()
    if facts:
        first = json.loads(lines[0])
        first["run"].update(facts)
        lines[0] = json.dumps(first)
    target.write_text("\n".join(lines) + "\n")
    whole = json.loads(source.with_suffix(".summary.json").read_text())
    whole.update(summary or {})
    target.with_suffix(".summary.json").write_text(json.dumps(whole))
    return target


def without_peak(source: Path, name: str) -> Path:
    """A copy with every MFU/HFU/peak key removed, as a run with no known peak writes it."""
    target = source.with_name(f"{name}.jsonl")
    drop = {K.MFU, K.HFU, K.MFU_AVG, K.PEAK_TFLOPS}
    lines = [
        {k: v for k, v in json.loads(line).items() if k not in drop}
        for line in source.read_text().splitlines()
    ]
    target.write_text("".join(json.dumps(line) + "\n" for line in lines))
    whole = json.loads(source.with_suffix(".summary.json").read_text())
    target.with_suffix(".summary.json").write_text(
        json.dumps({k: v for k, v in whole.items() if k not in drop})
    )
    return target


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_run(tmp_path_factory.mktemp("runs"))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_against_itself_passes(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, base, base)
    assert code == 0 and err == ""
    whole = json.loads(base.with_suffix(".summary.json").read_text())
    assert f"base: {base}  (whole run from summary.json)" in out
    row = next(line for line in out.splitlines() if line.startswith("MFU "))
    assert row.split()[-3:] == ["+0.00%", "<-", "gate"]
    assert row.split()[1] == row.split()[2] == pct(whole[K.MFU_AVG])
    assert out.splitlines()[-1].endswith("passed: within the 3.00% tolerance")


def test_whole_run_from_windows_equals_the_summary(base: Path) -> None:
    """Without summary.json the windows are added up; on the host clock that is the monitor's summary."""
    log = read_run(base)
    from_summary = whole_run(log)
    log.summary = None
    from_windows = whole_run(log)
    assert from_summary.source == "summary.json"
    assert from_windows.source == "4 windows (no summary.json: run still going, or it crashed)"
    for key in (K.MFU_AVG, K.TFLOPS_PER_DEVICE, K.TOKENS_PER_S, K.STEP_TIME_MS):
        assert from_windows.values[key] == pytest.approx(from_summary.values[key], rel=1e-9), key
    # Goodput: the summary's is its steps' seconds over their wall time; the windows', time-weighted.
    assert from_windows.values[K.GOODPUT] == pytest.approx(from_summary.values[K.GOODPUT], rel=1e-6)


def test_windows_are_weighted_by_their_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hand-written windows (no summary.json) with goodput, as issue 11's runs will log it."""
    path = tmp_path / "hand.jsonl"
    windows = [  # no run facts: the first window counts from step 0
        {"step": 8, "time": 1.0, K.STEP_TIME_MS: 100.0, K.TOKENS_PER_S: 1000.0, "mfumon/goodput": 0.8},
        {"step": 16, "time": 6.0, K.STEP_TIME_MS: 200.0, K.TOKENS_PER_S: 500.0, "mfumon/goodput": 0.4},
    ]
    path.write_text("".join(json.dumps(w) + "\n" for w in windows))
    values = whole_run(read_run(path)).values
    # window seconds in steps: 8 x 0.1 = 0.8 s and 8 x 0.2 = 1.6 s; wall: 0.8 / 0.8 = 1 s, 1.6 / 0.4 = 4 s
    assert values[K.TOKENS_PER_S] == pytest.approx((1000 * 0.8 + 500 * 1.6) / 2.4)  # 666.7
    assert values[K.STEP_TIME_MS] == pytest.approx(2.4 / 16 * 1e3)  # 150 ms
    assert values["mfumon/goodput"] == pytest.approx(2.4 / 5.0)  # 0.48
    assert values[K.MFU_AVG] is None and values[K.TFLOPS_PER_DEVICE] is None
    worse = tmp_path / "worse.jsonl"
    worse.write_text(path.read_text().replace('"mfumon/goodput": 0.4', '"mfumon/goodput": 0.3'))
    code, out, err = cli(capsys, path, worse, "--metric", "goodput")
    # worse: wall 1 + 1.6 / 0.3 = 6.333 s, goodput 2.4 / 6.333 = 0.3789; (0.3789 - 0.48) / 0.48 = -21.05%
    assert code == 1 and err == ""
    assert "gate: goodput (higher is better) -21.05%: REGRESSED" in out


def test_a_previous_runs_summary_is_not_used(base: Path) -> None:
    """A summary.json written before the last window belongs to an earlier run of that name."""
    again = edited_copy(base, "again")
    summary = again.with_suffix(".summary.json")
    last = json.loads(again.read_text().splitlines()[-1])["time"]
    os.utime(summary, (last - 60.0, last - 60.0))  # written a minute before the last window
    whole = whole_run(read_run(again))
    assert (
        whole.source
        == "4 windows (no summary.json: summary.json older than the last window: a previous run's)"
    )
    log = read_run(base)
    log.summary = None
    assert whole.values == whole_run(log).values  # the windows, not the summary


def test_a_file_written_twice_compares_its_latest_run(tmp_path: Path) -> None:
    path = real_run(tmp_path, "twice", steps=20)
    first = read_run(path).records
    real_run(tmp_path, "twice", steps=12)  # the same run name again: the monitor appends to the file
    log = read_run(path)
    log.summary = None
    second = log.records[len(first) :]
    assert [r["step"] for r in second] == [8, 12]
    # windows of 4 steps each (warm-up 4): the step times' mean over the second run only
    expected = (second[0][K.STEP_TIME_MS] * 4 + second[1][K.STEP_TIME_MS] * 4) / 8
    values = whole_run(log).values
    assert values[K.STEP_TIME_MS] == pytest.approx(expected) and values[K.MFU_AVG] == second[-1][K.MFU_AVG]


@pytest.mark.parametrize(
    ("new_mfu", "tolerance", "code"),
    [
        (0.385, "0.03", 1),  # (0.385 - 0.40) / 0.40 = -3.75%: worse than 3%
        (0.39, "0.03", 0),  # (0.39 - 0.40) / 0.40 = -2.5%: within 3%
        (0.385, "4%", 0),  # -3.75% within 4%
        (0.44, "0", 0),  # +10%: better never fails
    ],
)
def test_the_gate_on_mfu(
    base: Path, capsys: pytest.CaptureFixture[str], new_mfu: float, tolerance: str, code: int
) -> None:
    old = edited_copy(base, "old", summary={K.MFU_AVG: 0.40})
    new = edited_copy(base, "new", summary={K.MFU_AVG: new_mfu})
    got, out, _ = cli(capsys, old, new, "--tolerance", tolerance)
    assert got == code
    row = next(line for line in out.splitlines() if line.startswith("MFU "))
    change = (new_mfu - 0.40) / 0.40
    assert row.split()[1:4] == ["40.00%", f"{new_mfu * 100:.2f}%", f"{change * 100:+.2f}%"]
    assert ("REGRESSED" in out.splitlines()[-1]) == (code == 1)
    result = mfumon.compare(old, new, tolerance=parse_tolerance(tolerance))
    assert result.regressed == (code == 1) and result.gate.change == pytest.approx(change)


def test_step_time_is_lower_is_better(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = edited_copy(base, "old", summary={K.STEP_TIME_MS: 100.0, K.TOKENS_PER_S: 1000.0})
    slower = edited_copy(base, "slower", summary={K.STEP_TIME_MS: 104.0, K.TOKENS_PER_S: 961.5})
    faster = edited_copy(base, "faster", summary={K.STEP_TIME_MS: 90.0, K.TOKENS_PER_S: 1111.1})
    code, out, _ = cli(capsys, old, slower, "--metric", "step_time_ms")
    assert code == 1  # (104 - 100) / 100 = +4% slower, past 3%
    assert "gate: step time (ms) (lower is better) +4.00%: REGRESSED" in out
    assert cli(capsys, old, faster, "--metric", "step_time_ms")[0] == 0  # -10%: faster
    code, out, _ = cli(capsys, old, slower, "--metric", "tokens_per_s")
    assert code == 1 and "-3.85%" in out  # (961.5 - 1000) / 1000 = -3.85%


def test_no_peak_gates_on_tokens_per_s_and_says_so(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = without_peak(edited_copy(base, "old", summary={K.TOKENS_PER_S: 1000.0}), "old_nopeak")
    new = edited_copy(base, "new", summary={K.TOKENS_PER_S: 950.0})  # has a peak; old has none
    code, out, err = cli(capsys, old, new)
    assert code == 1  # (950 - 1000) / 1000 = -5%
    assert err == f"mfumon compare: warning: no peak known for {old} (no MFU): the gate compares tokens/s\n"
    assert "gate: tokens/s (higher is better) -5.00%: REGRESSED" in out
    assert next(line for line in out.splitlines() if line.startswith("MFU ")).split()[1] == "-"


def test_runs_across_hardware_are_warned_about(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = edited_copy(base, "h100", facts={"device": "NVIDIA H100 80GB HBM3", "world_size": 8})
    code, _, err = cli(capsys, base, other)
    assert code == 0
    assert err == (
        "mfumon compare: warning: the runs differ in device 'cpu' vs 'NVIDIA H100 80GB HBM3'; "
        "world_size 1 vs 8: a comparison across hardware\n"
    )


def test_a_cut_off_last_line_is_skipped_with_a_note(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crashed = base.with_name("crashed.jsonl")
    crashed.write_text(base.read_text() + '{"step": 24, "time": 1.0, "mfumon/mf')
    code, out, err = cli(capsys, base, crashed)
    assert code == 0  # no summary.json: the windows give the same whole-run values
    assert err == f"mfumon compare: note: {crashed}: skipped its last line, cut off mid-write\n"
    assert "(whole run from 4 windows (no summary.json" in out


@pytest.mark.parametrize(
    ("setup", "options", "message"),
    [
        ("missing", (), "no such file"),
        ("empty", (), "no logged window yet"),
        ("foreign", (), "line 1 is not JSON: not an mfumon JSONL file"),
        ("disjoint", (), "have no metric in common"),
        (
            "base",
            ("--tolerance", "-0.1"),
            "--tolerance must be a fraction >= 0 such as 0.03 (or 3%), got '-0.1'",
        ),
        ("base", ("--tolerance", "three"), "got 'three'"),
        ("base", ("--metric", "loss"), "--metric must be one of mfu_avg, tflops_per_device"),
        ("tokens-only", ("--metric", "goodput"), "--metric goodput: not in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    base: Path, capsys: pytest.CaptureFixture[str], setup: str, options: tuple[str, ...], message: str
) -> None:
    other = base.with_name(f"{setup}.jsonl")
    if setup == "empty":
        other.write_text("")
    elif setup == "foreign":
        other.write_text("epoch,loss\n1,2.0\n")
    elif setup == "disjoint":  # a run that logged only HFU: nothing compare reads
        other.write_text(json.dumps({"step": 8, "time": 1.0, K.HFU: 0.3}) + "\n")
    elif setup == "tokens-only":  # a run from before the time ledger: no goodput
        window = {"step": 8, "time": 1.0, K.TOKENS_PER_S: 100.0, K.STEP_TIME_MS: 10.0}
        other.write_text(json.dumps(window) + "\n")
    code, out, err = cli(capsys, base, other, *options)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("mfumon: error: ") and message in err, err


def test_the_installed_command_exits_1_on_a_regression(base: Path) -> None:
    old = edited_copy(base, "old", summary={K.MFU_AVG: 0.40})
    new = edited_copy(base, "new", summary={K.MFU_AVG: 0.30})  # -25%
    done = run([sys.executable, "-m", "mfumon", "compare", str(old), str(new)])
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert (
        done.stdout.splitlines()[-1]
        == "gate: MFU (higher is better) -25.00%: REGRESSED: worse by more than the 3.00% tolerance"
    )
    done = run([sys.executable, "-m", "mfumon", "compare", str(old), str(base.with_name("nope.jsonl"))])
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_the_python_api() -> None:
    with pytest.raises(ConfigError, match="--tolerance"):
        parse_tolerance(float("nan"))
    with pytest.raises(MfumonError, match="no such file"):
        mfumon.compare("missing-base.jsonl", "missing-new.jsonl")
    assert parse_tolerance("3%") == pytest.approx(0.03) and parse_tolerance(0.05) == 0.05
