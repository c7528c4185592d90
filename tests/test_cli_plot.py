"""`mfumon plot` and `mfumon.plot`: pictures of runs a real monitor wrote, and one clear line on bad input."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

import mfumon
from mfumon import metrics as K
from mfumon.cli import main
from mfumon.plotting import decimate, line_data
from tests.procs import run

pytest.importorskip("matplotlib")
import numpy as np  # noqa: E402  (matplotlib needs numpy: present when matplotlib is)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    folder: Path,
    name: str,
    *,
    steps: int = 24,
    initial_step: int = 0,
    paused: range = range(0),
    evaluate_after: int | None = None,
    step_s: float = 0.0,
) -> Path:
    """A real monitor on nn.Linear(8, 8): host clock, peak 1 TFLOP/s, warm-up 4, a window every 4 steps.

    Steps whose number (counted from 1) is in `paused` run inside a pause, so their windows have
    no timed step and are not written: a gap in the file's steps. After step `evaluate_after` an
    evaluation sleeps 50 ms under `mon.paused()`: paused time inside the next window. `step_s`: host
    work per step (a step of microseconds makes each log's own work a visible gap in its window).
    """
    model = torch.nn.Linear(8, 8)
    with mfumon.monitor(
        model,
        seq_len=4,
        loggers=("jsonl",),
        log_dir=folder,
        run_name=name,
        log_every=4,
        warmup=4,
        peak_tflops=1.0,
        initial_step=initial_step,
    ) as mon:
        for i in range(1, steps + 1):
            model(torch.randn(4, 8)).sum().backward()
            end = time.perf_counter() + step_s
            while time.perf_counter() < end:
                pass
            if i in paused:
                with mon.paused():
                    mon.step(tokens=16)
            else:
                mon.step(tokens=16)
            if i == evaluate_after:
                with mon.paused():
                    time.sleep(0.05)
    return folder / f"{name}.jsonl"


def file_series(path: Path, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`, read with json alone (not with the code under test)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in records if key in r], [r[key] for r in records if key in r]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("runs")
    # "b" resumes at step 100 and pauses through steps 109-116: its windows at 112 and 116 are missing
    return write_run(folder, "a"), write_run(folder, "b", initial_step=100, paused=range(9, 17))


def test_the_cli_writes_a_png_of_every_run(runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "both.png"
    assert main(["plot", str(runs[0]), str(runs[1]), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and captured.err == ""
    width, height = png_size(out)
    assert width == 900 and height == 1020  # 9 x (1 + 4 charts x 2.3) inches at 100 dpi
    assert out.stat().st_size > 20_000  # four charts with lines and text, not a blank canvas


def test_the_figure_holds_the_file_s_steps_and_values(runs: tuple[Path, Path]) -> None:
    a, b = runs
    figure = mfumon.plot([a, b])
    axes = figure.axes
    labels = [ax.get_ylabel() for ax in axes]
    assert labels == ["MFU (%)", "TFLOP/s per device", "tokens/s", "step time (ms)"]
    assert axes[-1].get_xlabel() == "optimizer step"
    for ax, key in zip(axes, (K.MFU, K.TFLOPS_PER_DEVICE, K.TOKENS_PER_S, K.STEP_TIME_MS), strict=True):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["a", "b"]  # one line per run, named by its file
        scale = 100 if key == K.MFU else 1  # MFU is a fraction in the file, drawn in percent
        steps, values = file_series(a, key)
        assert steps == [8, 12, 16, 20, 24]  # warm-up steps 1-4 are not logged
        assert list(lines[0].get_xdata()) == steps
        assert np.allclose(lines[0].get_ydata(), [v * scale for v in values], rtol=1e-12)
        steps, values = file_series(b, key)
        assert steps == [108, 120, 124]  # 112 and 116 had only paused steps
        x, y = lines[1].get_xdata(), lines[1].get_ydata()
        assert (
            list(x[[0, 2, 3]]) == [108, 120, 124] and math.isnan(x[1]) and math.isnan(y[1])
        )  # no line across
        assert np.allclose(y[[0, 2, 3]], [v * scale for v in values], rtol=1e-12)
    mfu_a = file_series(a, K.MFU)[1]
    assert 0 < mfu_a[0] < 0.01 and axes[0].get_lines()[0].get_ydata()[0] == pytest.approx(mfu_a[0] * 100)


def test_paused_time_inside_a_window_is_shaded_over_that_window(tmp_path: Path) -> None:
    path = write_run(tmp_path, "e", evaluate_after=10, step_s=0.02)  # 50 ms inside steps 9-12's window
    goodput = dict(zip(*file_series(path, K.GOODPUT), strict=True))
    assert goodput[12] < 0.9 and all(g > 0.95 for s, g in goodput.items() if s != 12)
    figure = mfumon.plot([path])
    for ax in figure.axes:  # every chart: a red span over steps 8-12, the window holding the pause
        spans = [p for p in ax.patches if p.get_label() == "paused or gaps in window"]
        assert len(spans) == 1
        assert (spans[0].get_x(), spans[0].get_x() + spans[0].get_width()) == (8.0, 12.0)
        assert spans[0].get_alpha() == pytest.approx(0.08 + 0.3 * (1 - goodput[12]))
    assert "paused or gaps in window" in figure.axes[0].get_legend_handles_labels()[1]


def test_the_title_names_each_run_s_peak_and_dtype(runs: tuple[Path, Path]) -> None:
    facts = json.loads(runs[0].read_text().splitlines()[0])["run"]
    assert facts["peak_tflops"] == 1.0 and facts["device"] == "cpu"
    dtype = facts["peak_dtype"]
    title = mfumon.plot(list(runs)).get_suptitle()
    assert title == f"a: cpu x1, peak 1 TFLOP/s {dtype}\nb: cpu x1, peak 1 TFLOP/s {dtype}"


@pytest.mark.parametrize(
    ("record", "title"),
    [  # a run with FP8 linears beside bf16 ones; a 0.1 file (no run facts) without a peak; a bad fact
        (
            {"run": {"device": "NVIDIA H100 80GB HBM3", "world_size": 8, "peak_tflops": 1500.0,
                     "peak_dtype": "fp8", "peak_mix": {"fp8": 0.86, "bf16": 0.14}}},
            "t: NVIDIA H100 80GB HBM3 x8, peak 1500 TFLOP/s fp8 86% / bf16 14%",
        ),
        ({"device": "cpu", "peak_dtype": "fp32"}, "t: cpu, no peak known, no MFU"),
        ({"run": {"peak_tflops": "lots", "measured_peak_tflops": 0.25, "warmup": "5", "log_every": None},
          "peak_dtype": "fp32"},
         "t: unknown device, no peak known, no MFU; measured GEMM ceiling 0.25 TFLOP/s fp32"),
    ],
)  # fmt: skip
def test_the_title_says_the_fp8_mix_or_that_no_peak_was_known(
    tmp_path: Path, record: dict, title: str
) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"step": 10, **record, K.TOKENS_PER_S: 100.0}) + "\n")
    assert mfumon.plot(path).get_suptitle() == title


def test_warm_up_and_missing_windows_are_shaded(runs: tuple[Path, Path]) -> None:
    ax = mfumon.plot(list(runs), metrics="mfu").axes[0]
    warm = [p for p in ax.patches if p.get_label() == "warm-up (not logged)"]
    # a: steps 1-4 (from step 0); b: resumed at 100, steps 101-104
    assert sorted((p.get_x(), p.get_width()) for p in warm) == [(0, 4), (100, 4)]
    gaps = [c for c in ax.collections if c.get_label() == "no window (paused or missing)"]
    assert len(gaps) == 1
    corners = gaps[0].get_paths()[0].vertices[:, 0]
    assert (corners.min(), corners.max()) == (108, 120)  # from b's last window before the pause to the next
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["a", "b"] and "warm-up (not logged)" in legend


def test_without_output_it_writes_beside_the_first_run(tmp_path: Path, capsys) -> None:
    path = write_run(tmp_path, "solo", steps=12)
    assert main(["plot", str(path), "--metric", "mfumon/tokens_per_s,step_time_ms"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "solo.png")
    assert png_size(tmp_path / "solo.png")[1] == 560  # 1 + 2 charts x 2.3 inches at 100 dpi


def test_a_cut_off_last_line_is_skipped_with_one_note(tmp_path: Path, capsys) -> None:
    path = write_run(tmp_path, "cut", steps=12)
    path.write_text(path.read_text() + '{"step": 16, "time": 1.0, "mfumon/mf')  # a crash mid-write
    out = tmp_path / "cut.svg"
    assert main(["plot", str(path), "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mfumon plot: note: {path}: skipped its last line, cut off mid-write"]
    assert out.read_text().startswith("<?xml")
    ax = mfumon.plot(path).axes[0]
    assert list(ax.get_lines()[0].get_xdata()) == [8, 12]


def test_a_real_process_plots_a_run(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "proc.png"
    proc = run([sys.executable, "-m", "mfumon", "plot", str(runs[0]), "--metric", "mfu", "-o", str(out)])
    assert proc.returncode == 0 and proc.stdout.strip() == str(out) and proc.stderr == ""
    assert png_size(out) == (900, 330)


def _two_files(tmp_path: Path) -> list[str]:
    a, b = tmp_path / "tok.jsonl", tmp_path / "mfu.jsonl"
    a.write_text(json.dumps({"step": 10, K.TOKENS_PER_S: 100.0}) + "\n")
    b.write_text(json.dumps({"step": 10, K.MFU: 0.3}) + "\n")
    return [str(a), str(b)]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("empty", "no logged window yet"),
        ("foreign", "line 1 is not JSON"),
        ("disjoint", "these runs have no metric in common"),
        ("unknown-metric", "unknown metric 'mfuu': these runs have "),
        ("unlogged-metric", "no run logged 'mfu_measured'"),
        ("bad-output", "name a picture file ending in one of"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(
    runs: tuple[Path, Path], tmp_path: Path, capsys, case: str, message: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    args = {
        "missing": [str(bad)],
        "empty": [str(bad)],
        "foreign": [str(bad)],
        "disjoint": _two_files(tmp_path),
        "unknown-metric": [str(runs[0]), "--metric", "mfuu"],
        "unlogged-metric": [str(runs[0]), "--metric", "mfu,mfu_measured"],
        "bad-output": [str(runs[0]), "-o", str(tmp_path / "chart.txt")],
    }[case]
    if case == "empty":
        bad.write_text("")
    if case == "foreign":
        bad.write_text("step,loss\n1,2.5\n")
    assert main(["plot", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("mfumon: error: ")
    assert message in captured.err
    assert not (tmp_path / "chart.txt").exists()


def test_without_matplotlib_it_says_what_to_install(runs: tuple[Path, Path]) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; import mfumon; from mfumon.cli import main; "
        f"sys.exit(main(['plot', {str(runs[0])!r}]))"
    )
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "mfumon: error: mfumon plot needs matplotlib: pip install 'mfumon[plot]'"


def test_importing_mfumon_does_not_import_matplotlib() -> None:
    code = "import sys, mfumon, mfumon.cli; print('matplotlib' in sys.modules)"
    assert run([sys.executable, "-c", code], check=True).stdout.strip() == "False"


def test_gaps_break_the_line_where_windows_are_missing() -> None:
    x, y = line_data([10, 20, 30, 60, 70, 10, 20], [1, 2, 3, 4, 5, 6, 7], spacing=10)
    # 30 -> 60 skips two windows; 70 -> 10 starts over (a second run appended to the same file)
    assert np.array_equal(x, [10, 20, 30, np.nan, 60, 70, np.nan, 10, 20], equal_nan=True)
    assert np.array_equal(y, [1, 2, 3, np.nan, 4, 5, np.nan, 6, 7], equal_nan=True)
    x, _ = line_data([5, 10, 15, 40], [1, 1, 1, 1])  # no spacing given: the median difference, 5
    assert np.isnan(x[3]) and x.size == 5


def test_decimation_keeps_extremes_and_gaps() -> None:
    n = 100_000
    x = np.arange(n, dtype=float)
    y = np.zeros(n)
    y[12_345], y[67_890] = 9.0, -9.0  # one spike up, one down
    x[50_000] = y[50_000] = np.nan  # a gap
    dx, dy = decimate(x, y, max_points=4000)
    assert dx.size <= 4000 + 3 * 1  # 1000 buckets x (first, last, low, high), plus the gap and its sides
    assert (12_345.0, 9.0) in zip(dx, dy, strict=True) and (67_890.0, -9.0) in zip(dx, dy, strict=True)
    at = int(np.flatnonzero(np.isnan(dx))[0])
    assert (dx[at - 1], dx[at + 1]) == (49_999.0, 50_001.0)
    assert dx[0] == 0 and dx[-1] == n - 1


@pytest.mark.slow
def test_the_example_ends_with_how_to_plot_its_run(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_gpt.py"
    argv = ["--steps", "9", "--log-every", "2", "--batch-size", "2", "--seq-len", "16", "--run-name", "ex"]
    env = {**os.environ, "WANDB_MODE": "disabled", "MFUMON_PEAK_TFLOPS": "1"}
    proc = run([sys.executable, str(example), *argv], cwd=tmp_path, env=env, check=True)
    path = Path("runs") / "ex.jsonl"
    assert proc.stdout.splitlines()[-1] == f"plot it: mfumon plot {path}"
    assert main(["plot", str(tmp_path / path)]) == 0  # the run it wrote draws (warm-up 5, windows at 6, 8, 9)
    assert png_size(tmp_path / "runs" / "ex.png") == (900, 1020)


def test_values_that_are_not_finite_numbers_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    lines = [{"step": 5, K.MFU: True}, {"step": 10, K.MFU: float("nan")}, {"step": 15, K.MFU: 0.5}]
    lines += [{"step": 20, K.MFU: "0.4"}, {"step": 25, K.MFU: 0.25}, {"step": 30}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    line = mfumon.plot(path).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [15, 25] and list(line.get_ydata()) == [50.0, 25.0]
