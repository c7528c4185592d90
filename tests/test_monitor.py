from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import torch

import mfumon
from mfumon import metrics as K
from mfumon.errors import ConfigError, ConfigTypeError, MfumonError, MfumonWarning
from mfumon.loggers import Logger
from tests.conftest import TinyLM, mfumon_records, train_step

FPT = 1_000_000  # training FLOPs per token, given explicitly where the model's count is not the point


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Recorder(Logger):
    def __init__(self) -> None:
        self.logs: list[tuple[int, dict]] = []
        self.warmups: list[int] = []
        self.info: dict | None = None
        self.summary: dict | None = None
        self.closed = False

    def log(self, metrics, step):  # type: ignore[no-untyped-def]
        self.logs.append((step, dict(metrics)))

    def log_warmup(self, metrics, step, warmup):  # type: ignore[no-untyped-def]
        self.warmups.append(step)

    def log_run_info(self, info):  # type: ignore[no-untyped-def]
        self.info = dict(info)

    def log_summary(self, summary):  # type: ignore[no-untyped-def]
        self.summary = dict(summary)

    def close(self) -> None:
        self.closed = True


def test_jsonl_step_times_add_up_to_the_tests_own_clock(tiny, tmp_path: Path) -> None:
    model, opt = tiny
    steps, warmup, sleep_s = 30, 5, 0.005
    before: dict[int, float] = {}
    after: dict[int, float] = {}
    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=5,
        warmup=warmup,
        loggers=("jsonl",),
        peak_tflops=1.0,
        run_name="wall",
        log_dir=tmp_path,
    ) as mon:
        for i in range(1, steps + 1):
            tokens = train_step(model, opt)
            time.sleep(sleep_s)  # each step outlasts a mon.step() call many times: one lost or added shows
            before[i] = time.perf_counter()
            mon.step(tokens=tokens)
            after[i] = time.perf_counter()
    records = read_jsonl(tmp_path / "wall.jsonl")
    assert [r["step"] for r in records] == [10, 15, 20, 25, 30]
    seconds = sum(r[K.STEP_TIME_MS] / 1e3 * 5 for r in records)  # 5 steps per window
    tokens = sum(r[K.TOKENS_PER_S] * r[K.STEP_TIME_MS] / 1e3 * 5 for r in records)
    assert tokens == pytest.approx((steps - warmup) * 4 * 8)  # batch 4 x seq 8 per step
    # On the CPU, mon.step() marks the end of step i with time.perf_counter(), the clock read here,
    # so that mark lies in [before[i], after[i]] however loaded the machine is. The measured steps
    # 6..30 run from the mark of step 5 to the mark of step 30, less each log's own work (inside
    # mon.step() of steps 10, 15, 20, 25: a gap, no step's time), so their total lies in [lo, hi];
    # a lost or doubled step, warm-up misplaced, or a unit slip lands outside.
    logs = sum(after[i] - before[i] for i in (10, 15, 20, 25))
    lo, hi = before[steps] - after[warmup] - logs, after[steps] - before[warmup]
    rounding_s = 1e-9  # float sums of 25 terms of about 6 ms: off by 1e-16 s, not by a step
    assert lo - rounding_s <= seconds <= hi + rounding_s, (lo, seconds, hi)
    summary = mon.summary()
    assert summary["steps"] == steps - warmup
    assert lo - rounding_s <= summary["seconds"] <= hi + rounding_s, (lo, summary["seconds"], hi)
    assert summary[K.TOKENS_PER_S] == pytest.approx(tokens / seconds, rel=1e-9)


def test_metric_keys_and_their_relations(tiny, tmp_path: Path) -> None:
    model, opt = tiny
    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=4,
        warmup=2,
        loggers=("jsonl",),
        peak_tflops=0.5,
        flops_per_token=FPT,
        run_name="keys",
        log_dir=tmp_path,
    ) as mon:
        for _ in range(12):
            mon.step(tokens=train_step(model, opt))
    rec = read_jsonl(tmp_path / "keys.jsonl")[-1]
    expected = {
        K.MFU,
        K.HFU,
        K.TFLOPS_PER_DEVICE,
        K.HW_TFLOPS_PER_DEVICE,
        K.TOKENS_PER_S,
        K.TOKENS_PER_S_PER_DEVICE,
        K.STEP_TIME_MS,
        K.PEAK_TFLOPS,
        K.MFU_AVG,
        K.GOODPUT,  # the time ledger: measurable on one CPU process with a model
        K.MFU_WALL,
        K.INPUT_WAIT_FRAC,
    }
    assert set(rec) == expected | {"step", "time", "peak_dtype", "device"}
    assert set(mon.metrics) == expected
    assert rec[K.TFLOPS_PER_DEVICE] == pytest.approx(rec[K.TOKENS_PER_S] * FPT / 1e12)
    assert rec[K.MFU] == pytest.approx(rec[K.TFLOPS_PER_DEVICE] / 0.5)
    assert rec[K.HFU] == rec[K.MFU]  # no recompute
    assert rec[K.PEAK_TFLOPS] == 0.5
    assert rec[K.TOKENS_PER_S_PER_DEVICE] == rec[K.TOKENS_PER_S]  # one device
    assert rec["peak_dtype"] == "fp32"


def test_flops_per_token_come_from_the_model(tiny) -> None:
    model, _ = tiny
    with pytest.warns(MfumonWarning, match="peak_tflops"):
        mon = mfumon.Monitor(model, seq_len=8, loggers=())
    assert mon.flops_per_token == mfumon.flops_per_token(model, 8)


def test_cpu_has_no_peak_so_no_mfu_and_one_warning(tiny) -> None:
    model, opt = tiny
    with pytest.warns(MfumonWarning, match="peak_tflops") as caught:
        mon = mfumon.Monitor(model, seq_len=8, log_every=2, warmup=0, loggers=())
    assert len([w for w in caught if issubclass(w.category, MfumonWarning)]) == 1
    with mon:
        for _ in range(4):
            mon.step(tokens=train_step(model, opt))
    assert K.MFU not in mon.metrics and K.HFU not in mon.metrics and K.PEAK_TFLOPS not in mon.metrics
    assert mon.metrics[K.TOKENS_PER_S] > 0


def test_env_peak_override_gives_mfu(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = tiny
    monkeypatch.setenv("MFUMON_PEAK_TFLOPS", "2.0")
    with mfumon.monitor(model, seq_len=8, log_every=2, warmup=0, loggers=(), flops_per_token=FPT) as mon:
        for _ in range(2):
            mon.step(tokens=train_step(model, opt))
    assert mon.metrics[K.PEAK_TFLOPS] == 2.0
    assert mon.metrics[K.MFU] == pytest.approx(mon.metrics[K.TFLOPS_PER_DEVICE] / 2.0)


def test_warmup_excluded_from_averages_and_announced(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    model, opt = tiny
    rec = Recorder()
    with mfumon.monitor(
        model, seq_len=8, log_every=2, warmup=3, loggers=("stdout", rec), peak_tflops=1.0, flops_per_token=FPT
    ) as mon:
        for _ in range(8):
            mon.step(tokens=train_step(model, opt))
    out = capsys.readouterr().out
    assert "step 2 (warm-up 2/3, not in averages)" in out
    assert rec.warmups == [2]  # step 4's window holds step 4, which is past warm-up
    assert [s for s, _ in rec.logs] == [4, 6, 8]
    assert rec.summary is not None and rec.summary["steps"] == 8 - 3
    assert rec.summary["tokens"] == (8 - 3) * 32
    assert rec.summary[K.MFU_AVG] == pytest.approx(rec.logs[-1][1][K.MFU_AVG])


def test_gradient_accumulation_micro_steps(tiny) -> None:
    model, opt = tiny
    rec = Recorder()
    with mfumon.monitor(
        model, seq_len=8, log_every=3, warmup=0, loggers=(rec,), peak_tflops=1.0, flops_per_token=FPT
    ) as mon:
        for _ in range(6):
            for _ in range(2):  # two micro-batches of 4 x 8 tokens, one optimizer step
                mon.micro_step(tokens=32)
            mon.step()
        mon.micro_step(tokens=10)
        mon.step(tokens=5)  # both add up: 15
    assert mon.summary()["tokens"] == 6 * 64 + 15
    assert mon.summary()["steps"] == 7


def test_tensor_tokens_on_cpu(tiny) -> None:
    model, opt = tiny
    with mfumon.monitor(
        model, seq_len=8, log_every=2, warmup=0, loggers=(), peak_tflops=1.0, flops_per_token=FPT
    ) as mon:
        for _ in range(4):
            mask = torch.ones(4, 8, dtype=torch.long)
            mask[:, 6:] = 0  # two padding positions per row
            train_step(model, opt)
            mon.step(tokens=mask.sum())
    assert mon.summary()["tokens"] == 4 * 4 * 6


def test_pause_excludes_evaluation_time(tiny) -> None:
    model, opt = tiny
    mon = mfumon.monitor(
        model, seq_len=8, log_every=4, warmup=0, loggers=(), peak_tflops=1.0, flops_per_token=FPT
    )
    # A step's time is what passes between the monitor's marks (start() or the previous step(), and
    # this step()) less the paused time: pause() marks where the step stops, resume() where it goes
    # on. All marks are time.perf_counter() readings inside those calls, so the test's own readings
    # around each call bound the total in [lo, hi] under any load; 0.2 s of "evaluation" counted
    # would overshoot hi.
    lo = hi = 0.0
    carry = (0.0, 0.0)  # bounds of the time from a step's mark to the pause after it
    entered = time.perf_counter()
    with mon:
        start = (entered, time.perf_counter())  # start() took the first mark
        for _ in range(4):
            tokens = train_step(model, opt)
            before = time.perf_counter()
            mon.step(tokens=tokens)
            after = time.perf_counter()
            lo, hi = lo + before - start[1] + carry[0], hi + after - start[0] + carry[1]
            pausing = time.perf_counter()
            with mon.paused():
                paused = time.perf_counter()
                time.sleep(0.2)  # "evaluation": must not appear in any step
                leaving = time.perf_counter()
            start = (leaving, time.perf_counter())  # leaving paused() resumed: the next step's start
            carry = (pausing - after, paused - before)  # belongs to the next step, if one comes
    assert mon.summary()["steps"] == 4  # each step after a pause is timed
    rounding_s = 1e-9  # float sums of a few terms
    assert lo - rounding_s <= mon.summary()["seconds"] <= hi + rounding_s, (lo, mon.summary()["seconds"], hi)


def test_a_pause_inside_a_step_keeps_the_time_before_it(tiny) -> None:
    """One evaluation per window, in the middle of a step: the step keeps both halves of its time."""
    model, opt = tiny
    mon = mfumon.monitor(model, seq_len=8, log_every=4, warmup=0, loggers=(), peak_tflops=1.0)
    lo = hi = 0.0
    entered = time.perf_counter()
    with mon:
        start = (entered, time.perf_counter())
        for i in range(1, 9):
            time.sleep(0.01)  # the first half of the step's work
            if i % 4 == 2:  # once per window, mid-step
                pausing = time.perf_counter()
                with mon.paused():
                    paused = time.perf_counter()
                    time.sleep(0.05)
                    leaving = time.perf_counter()
                resumed = time.perf_counter()
                lo, hi = lo + pausing - start[1], hi + paused - start[0]  # before the pause
                start = (leaving, resumed)
            tokens = train_step(model, opt)  # the rest of the step
            before = time.perf_counter()
            mon.step(tokens=tokens)
            after = time.perf_counter()
            lo, hi = lo + before - start[1], hi + after - start[0]
            start = (before, after)
    summary = mon.summary()
    rounding_s = 1e-9
    assert lo - rounding_s <= summary["seconds"] <= hi + rounding_s, (lo, summary["seconds"], hi)
    truth = summary["tokens"] / ((lo + hi) / 2)  # tokens over the unpaused time
    assert summary[K.TOKENS_PER_S] == pytest.approx(truth, rel=0.02)


def test_without_with_block(tiny) -> None:
    model, opt = tiny
    rec = Recorder()
    mon = mfumon.Monitor(
        model, seq_len=8, log_every=5, warmup=1, loggers=(rec,), peak_tflops=1.0, flops_per_token=FPT
    )
    mon.start()
    for _ in range(7):
        mon.step(tokens=train_step(model, opt))
    mon.close()
    mon.close()  # idempotent
    assert [s for s, _ in rec.logs] == [5, 7]  # last partial window logged at close
    assert rec.closed and rec.summary is not None and rec.summary["steps"] == 6
    assert rec.info is not None and rec.info["flops_per_token"] == FPT


def test_step_before_start_starts_the_clock(tiny) -> None:
    model, opt = tiny
    mon = mfumon.Monitor(model, log_every=100, warmup=0, loggers=(), peak_tflops=1.0, flops_per_token=FPT)
    for _ in range(3):
        mon.step(tokens=train_step(model, opt))
    mon.close()
    assert mon.summary()["steps"] == 2  # step 1 started the clock


def test_raising_logger_is_switched_off_and_training_goes_on(tiny, mfumon_log) -> None:
    class Broken(Logger):
        calls = 0

        def log(self, metrics, step):  # type: ignore[no-untyped-def]
            Broken.calls += 1
            raise OSError("disk full")

    model, opt = tiny
    good = Recorder()
    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=2,
        warmup=0,
        loggers=(Broken(), good),
        peak_tflops=1.0,
        flops_per_token=FPT,
    ) as mon:
        for _ in range(10):
            mon.step(tokens=train_step(model, opt))
    assert Broken.calls == 1
    assert len(good.logs) == 5
    records = mfumon_records(mfumon_log)
    assert len(records) == 1 and "disk full" in records[0].getMessage()


def test_jsonl_keeps_lines_when_the_run_crashes(tiny, tmp_path: Path) -> None:
    model, opt = tiny
    with pytest.raises(RuntimeError, match="boom"):
        with mfumon.monitor(
            model,
            seq_len=8,
            log_every=2,
            warmup=0,
            loggers=("jsonl",),
            peak_tflops=1.0,
            flops_per_token=FPT,
            run_name="crash",
            log_dir=tmp_path,
        ) as mon:
            for i in range(1, 10):
                mon.step(tokens=train_step(model, opt))
                if i == 7:
                    # every line so far is on disk before the crash
                    assert len(read_jsonl(tmp_path / "crash.jsonl")) == 3
                    raise RuntimeError("boom")
    lines = read_jsonl(tmp_path / "crash.jsonl")
    assert [r["step"] for r in lines] == [2, 4, 6, 7]  # close() logged step 7's partial window
    assert json.loads((tmp_path / "crash.summary.json").read_text())["steps"] == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, "seq_len must be an int >= 1"),
        ({"seq_len": 8, "log_every": 0}, "log_every must be an int >= 1"),
        ({"seq_len": 8, "warmup": -1}, "warmup must be an int >= 0"),
        ({"seq_len": 8, "loggers": ("stdout", "nope")}, "unknown logger 'nope'"),
        ({}, "seq_len is required"),
        ({"seq_len": 8, "peak_tflops": 0}, "peak_tflops"),
        ({"seq_len": 8, "dtype": "fp12"}, "fp12"),
    ],
)
def test_bad_setup_fails_fast_naming_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        mfumon.Monitor(TinyLM(), **{"peak_tflops": 1.0, **kwargs})


def test_model_without_parameters_and_wrong_kinds() -> None:
    with pytest.raises(ConfigError, match="no parameters"):
        mfumon.Monitor(torch.nn.ReLU(), seq_len=8, peak_tflops=1.0)
    with pytest.raises(ConfigTypeError, match="torch.nn.Module"):
        mfumon.Monitor("gpt2", seq_len=8, peak_tflops=1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match="loggers"):
        mfumon.Monitor(TinyLM(), seq_len=8, peak_tflops=1.0, loggers=(print,))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tokens", "error"),
    [
        (-1, ConfigError),
        (2.5, ConfigError),
        (float("nan"), ConfigError),
        (torch.ones(2, dtype=torch.long), ConfigError),
        (torch.tensor(True), ConfigError),
        ("32", ConfigTypeError),
        (True, ConfigTypeError),
    ],
)
def test_bad_tokens_fail_at_once(tokens: object, error: type[MfumonError]) -> None:
    mon = mfumon.Monitor(TinyLM(), seq_len=8, loggers=(), peak_tflops=1.0)
    with pytest.raises(error, match="tokens"):
        mon.step(tokens=tokens)  # type: ignore[arg-type]
    with pytest.raises(error, match="tokens"):
        mon.micro_step(tokens=tokens)  # type: ignore[arg-type]


def test_cpu_tensor_tokens_are_copied_at_step_time(tiny) -> None:
    model, opt = tiny
    count = torch.tensor(10.0, dtype=torch.float64)
    with mfumon.monitor(model, seq_len=8, log_every=10, warmup=0, loggers=(), peak_tflops=1.0) as mon:
        for _ in range(3):
            train_step(model, opt)
            mon.step(tokens=count)
            count += 5  # the caller reuses its tensor: steps counted 10, 15, 20
    assert mon.summary()["tokens"] == 10 + 15 + 20


def test_step_without_tokens_says_what_to_pass() -> None:
    mon = mfumon.Monitor(TinyLM(), seq_len=8, loggers=(), peak_tflops=1.0)
    with pytest.raises(ConfigError, match=r"tokens=.*micro_step"):
        mon.step()


def test_whole_float_tokens_are_accepted(tiny) -> None:
    model, opt = tiny
    with mfumon.monitor(model, seq_len=8, log_every=2, warmup=0, loggers=(), peak_tflops=1.0) as mon:
        for _ in range(2):
            train_step(model, opt)
            mon.step(tokens=32.0)
    assert mon.summary()["tokens"] == 2 * 32


def test_an_impossible_mfu_is_called_out_once_and_logging_goes_on(tiny, tmp_path: Path, mfumon_log) -> None:
    model, opt = tiny
    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=4,
        warmup=0,
        loggers=("jsonl",),
        peak_tflops=1e-9,
        run_name="x",
        log_dir=tmp_path,
    ) as mon:  # a peak of 1 kFLOP/s: any real step "beats" it
        for _ in range(12):
            mon.step(tokens=train_step(model, opt))
    records = mfumon_records(mfumon_log)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "step 4: mfumon/mfu = " in message and "probable accounting error" in message
    assert "peak_tflops= is per device, in TFLOP/s: 1e-09 fp32 here" in message
    assert "tokens=" in message and "flops_per_token=" in message
    assert [r["step"] for r in read_jsonl(tmp_path / "x.jsonl")] == [4, 8, 12]  # logging went on
    assert mon.metrics[K.MFU] > 1.0  # the figure itself is not altered, only called out


def test_a_possible_mfu_says_nothing(tiny, mfumon_log) -> None:
    model, opt = tiny
    with mfumon.monitor(model, seq_len=8, log_every=4, warmup=0, loggers=(), peak_tflops=1.0) as mon:
        for _ in range(8):
            mon.step(tokens=train_step(model, opt))
    assert 0.0 < mon.metrics[K.MFU] < 1.0 and mfumon_records(mfumon_log) == []


@pytest.mark.parametrize("bad", [float("nan"), -3.0, 2.5])
def test_a_bad_tensor_token_count_is_a_token_problem_named_by_step(tiny, mfumon_log, bad: float) -> None:
    model, opt = tiny
    with mfumon.monitor(model, seq_len=8, log_every=4, warmup=0, loggers=(), peak_tflops=1.0) as mon:
        for i in range(1, 9):
            tokens = train_step(model, opt)
            mon.step(tokens=torch.tensor(bad if i in (3, 6) else float(tokens)))  # read at log time
    records = mfumon_records(mfumon_log)
    assert len(records) == 1  # once, for steps 3 and 6 alike
    assert records[0].getMessage().startswith(f"mfumon: step 3 counted {bad} tokens; a token count must be")
    assert mon.summary()["steps"] == 6  # the two bad steps are left out
    assert mon.summary()["tokens"] == 6 * 4 * 8


def test_initial_step_continues_the_step_axis_after_a_resume(tiny, tmp_path: Path) -> None:
    model, opt = tiny
    with mfumon.monitor(
        model, seq_len=8, log_every=5, warmup=2, loggers=("jsonl",), peak_tflops=1.0,
        run_name="resumed", log_dir=tmp_path, initial_step=100,
    ) as mon:  # fmt: skip
        for _ in range(12):
            mon.step(tokens=train_step(model, opt))
    # windows end at multiples of log_every on the run's own axis; steps 101-102 are this run's warm-up
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed.jsonl")] == [105, 110, 112]
    summary = mon.summary()
    assert summary["last_step"] == 112 and summary["steps"] == 10 and summary["tokens"] == 10 * 4 * 8
    with pytest.raises(ConfigError, match="initial_step must be an int >= 0"):
        mfumon.Monitor(model, seq_len=8, initial_step=-1)


def test_the_warm_up_note_counts_this_runs_steps_after_a_resume(tiny) -> None:
    from mfumon.loggers.stdout import StdoutLogger

    model, opt = tiny
    out = io.StringIO()
    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=5,
        warmup=10,
        loggers=(StdoutLogger(out),),
        peak_tflops=1.0,
        initial_step=100,
    ) as mon:
        for _ in range(10):
            mon.step(tokens=train_step(model, opt))
    lines = out.getvalue().splitlines()
    assert "step 105" in lines[1] and "warm-up 5/10, not in averages" in lines[1]  # 5 of this run's 10
    assert "step 110" in lines[2] and "warm-up 10/10" in lines[2]
