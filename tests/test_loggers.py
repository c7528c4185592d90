from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import mfumon
from mfumon import metrics as K
from mfumon.errors import ConfigError, ConfigTypeError
from mfumon.loggers import Logger, LoggerSet, make_loggers
from mfumon.loggers.jsonl import JsonlLogger
from mfumon.loggers.stdout import StdoutLogger, format_line
from tests.conftest import TinyLM, mfumon_records

METRICS = {
    K.MFU: 0.4123,
    K.HFU: 0.5497,
    K.TFLOPS_PER_DEVICE: 407.9,
    K.PEAK_TFLOPS: 989.4,
    K.TOKENS_PER_S: 452_890.4,
    K.STEP_TIME_MS: 72.44,
    K.MFU_AVG: 0.40,
}


def test_stdout_line_is_compact_and_human() -> None:
    line = format_line(METRICS, 40, dtype="bf16")
    assert line == (
        "[mfumon] step 40 | MFU 41.2% HFU 55.0% | 408 TFLOP/s/dev (peak 989.4 bf16) | 452,890 tok/s"
        " | 72.4 ms/step | avg MFU 40.0%"
    )


def test_the_ledger_adds_a_tail_only_when_notable() -> None:
    quiet = {**METRICS, K.GOODPUT: 0.99, K.INPUT_WAIT_FRAC: 0.01, K.STEP_TIME_MAX_MS: 72.44}
    quiet |= {K.STEP_TIME_MIN_MS: 70.0, K.SLOWEST_RANK: 3.0, K.EXPERT_LOAD_MAX: 1.2, K.MEM_ALLOC_RETRIES: 0.0}
    assert format_line(quiet, 40, dtype="bf16") == format_line(METRICS, 40, dtype="bf16")
    loud = {**quiet, K.GOODPUT: 0.91, K.INPUT_WAIT_FRAC: 0.07, K.STEP_TIME_MIN_MS: 67.0, K.SLOWEST_RANK: 5.0}
    line = format_line(loud, 40, dtype="bf16")
    # 72.44 / 67.0 - 1 = 8.1%: the slowest rank's mean step against the fastest's
    assert line.endswith("| avg MFU 40.0% | goodput 91% | input wait 7% | rank 5 slowest +8%")
    assert "\n" not in line
    moe = format_line({**METRICS, K.EXPERT_LOAD_MAX: 2.31, K.MEM_ALLOC_RETRIES: 2.0, K.MEM_OOMS: 0.0}, 40)
    assert moe.endswith("| expert load 2.3x | alloc retries 2, OOMs 0")


def test_stdout_without_peak_shows_no_mfu() -> None:
    line = format_line({K.TFLOPS_PER_DEVICE: 0.0123, K.TOKENS_PER_S: 12.5, K.STEP_TIME_MS: 3.0}, 5)
    assert "MFU" not in line and "0.0123 TFLOP/s/dev" in line and "12.5 tok/s" in line


def test_stdout_logger_writes_run_info_and_warmup() -> None:
    buf = io.StringIO()
    log = StdoutLogger(buf)
    log.log_run_info(
        {
            "device": "NVIDIA H100 80GB HBM3",
            "world_size": 8,
            "peak_tflops": 989.4,
            "peak_dtype": "bf16",
            "flops_per_token": 8.6e8,
            "warmup": 5,
        }
    )
    log.log_warmup({K.TOKENS_PER_S: 1000.0}, 2, 5)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[mfumon] NVIDIA H100 80GB HBM3 x8, peak 989.4 TFLOP/s bf16; 0.86 GFLOP/token")
    assert lines[1].startswith("[mfumon] step 2 (warm-up 2/5, not in averages)")


def test_jsonl_flushes_each_line_and_writes_the_summary(tmp_path: Path) -> None:
    log = JsonlLogger(tmp_path / "sub" / "run.jsonl")
    log.log_run_info({"peak_dtype": "bf16", "device": "NVIDIA H200"})
    log.log(METRICS, 10)
    # readable before close: flushed on write
    rec = json.loads((tmp_path / "sub" / "run.jsonl").read_text())
    assert rec["step"] == 10 and rec["peak_dtype"] == "bf16" and rec[K.MFU] == 0.4123 and rec["time"] > 0
    log.log_summary({"steps": 10, K.MFU_AVG: 0.4})
    log.close()
    log.close()
    assert json.loads((tmp_path / "sub" / "run.summary.json").read_text())["steps"] == 10


def test_make_loggers_rejects_unknown_names_and_objects(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown logger 'csv'.*'stdout', 'jsonl', 'wandb', 'tensorboard'"):
        make_loggers(("csv",), run_name="r", log_dir=tmp_path)
    with pytest.raises(ConfigTypeError):
        make_loggers((42,), run_name="r", log_dir=tmp_path)  # type: ignore[arg-type]
    built = make_loggers("jsonl", run_name="r", log_dir=tmp_path)
    assert isinstance(built[0], JsonlLogger) and (tmp_path / "r.jsonl").exists()


def test_logger_set_switches_off_a_raising_logger_once(mfumon_log) -> None:  # type: ignore[no-untyped-def]
    class Flaky(Logger):
        def __init__(self) -> None:
            self.closed = False

        def log(self, metrics, step):  # type: ignore[no-untyped-def]
            raise RuntimeError("503 from the dashboard")

        def close(self) -> None:
            self.closed = True

    flaky, ok = Flaky(), StdoutLogger(io.StringIO())
    fan = LoggerSet([flaky, ok])
    for step in range(3):
        fan.call("log", METRICS, step)
    assert fan.loggers == [ok] and flaky.closed
    records = mfumon_records(mfumon_log)
    assert len(records) == 1 and "503 from the dashboard" in records[0].getMessage()


@pytest.mark.parametrize("name", ["jsonl", "tensorboard"])
def test_a_log_dir_that_cannot_be_written_fails_at_setup_naming_it(tmp_path: Path, name: str) -> None:
    if name == "tensorboard":
        pytest.importorskip("tensorboard")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    log_dir = blocker / "runs"  # cannot be created, whoever runs the test (root included)
    with pytest.raises(ConfigError, match=r"cannot write in log_dir='.*a-file/runs'.*pass log_dir="):
        mfumon.Monitor(
            TinyLM(), seq_len=8, loggers=("stdout", name), log_dir=log_dir, peak_tflops=1.0
        ).start()


def test_a_failing_file_logger_closes_what_was_opened_for_it_not_the_callers_own(tmp_path: Path) -> None:
    class Mine(Logger):
        closed = False

        def close(self) -> None:
            self.closed = True

    mine = Mine()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="log_dir"):
        make_loggers([mine, "stdout", "jsonl"], run_name="r", log_dir=tmp_path / "a-file")
    assert not mine.closed  # the caller's instance outlives a failed setup (a callback reuses it)
