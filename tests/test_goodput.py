"""The time ledger on one process: goodput, MFU over wall time, input wait and the summary's split.

Truths come from the test's own clock (time.perf_counter around each step, pause and loader
call), never from the monitor: the monitor measures its own marks; the test checks them.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mfumon
from mfumon import metrics as K
from mfumon.loggers import Logger
from mfumon.metrics import Window, combine_ranks, window_metrics
from tests.conftest import TinyLM

VOCAB, SEQ, BATCH = 32, 8, 4
LOG_EVERY = 4


class Keep(Logger):
    """Keeps every window's metrics and details, by step."""

    def __init__(self) -> None:
        self.windows: dict[int, dict[str, float]] = {}
        self.details: dict[int, dict] = {}

    def log(self, metrics, step):  # type: ignore[no-untyped-def]
        self.windows[step] = dict(metrics)

    def log_details(self, details, step):  # type: ignore[no-untyped-def]
        self.details[step] = dict(details)


def spin(seconds: float) -> None:
    """Busy host work for `seconds` (a sleep's wake-up is late by an unknown amount under load)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1))


def train(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, busy: float = 0.0) -> int:
    logits = model(ids[:, :-1])
    spin(busy)  # a slower model: known time inside the step
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return BATCH * SEQ


def run(
    *, steps: int, pause_s: float = 0.0, loader_s: float = 0.0, busy: float = 0.01, warmup: int = 0
) -> tuple[Keep, dict, dict[int, dict[str, float]]]:
    """Train with a known pause per window and a known loader delay per step; returns the monitor's
    windows, its summary and the test's own truths per window (goodput, input-wait share).

    Each log's own work (inside the mon.step() call that logs, after the step's end) is a gap in
    the next window's wall time, as a pause is: the truths count it so, from the test's clock."""
    torch.manual_seed(0)
    model = TinyLM(VOCAB)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    keep = Keep()
    truths: dict[int, dict[str, float]] = {}
    with mfumon.monitor(
        model, seq_len=SEQ, log_every=LOG_EVERY, warmup=warmup, loggers=(keep,), peak_tflops=1.0
    ) as mon:
        window_start = last_end = time.perf_counter()
        paused = waited = gap = log_s = 0.0
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            spin(loader_s)  # the data loader: before the first forward
            ids = batch()
            waited += time.perf_counter() - t0 + (t0 - last_end) - gap
            gap = 0.0
            tokens = train(model, opt, ids, busy)
            last_end = time.perf_counter()  # the step's end
            mon.step(tokens=tokens)
            if step % LOG_EVERY == 0:
                wall = last_end - window_start
                lost = paused + log_s  # the pause and the previous log's work: no step's time
                truths[step] = {"goodput": (wall - lost) / wall, "wait": waited / (wall - lost)}
                gap = log_s = time.perf_counter() - last_end  # this log's work: in the next window
                if pause_s:  # evaluation: paused, after the window's last step
                    p0 = time.perf_counter()
                    with mon.paused():
                        spin(pause_s)
                    paused = time.perf_counter() - p0
                else:
                    paused = 0.0
                window_start, waited = last_end, 0.0  # the pause is in the next window's wall time
                gap += paused  # a paused step holds no input wait: neither time is the loader's
    return keep, mon.summary(), truths


def test_goodput_follows_a_known_pause_per_window() -> None:
    keep, summary, truths = run(steps=5 * LOG_EVERY, pause_s=0.03)
    assert sorted(keep.windows) == sorted(truths)
    for step, window in keep.windows.items():
        assert window[K.GOODPUT] == pytest.approx(truths[step]["goodput"], abs=0.02), step
        expected_wall = window[K.MFU] * window[K.GOODPUT]  # model FLOPs over the wall time
        assert window[K.MFU_WALL] == pytest.approx(expected_wall, rel=1e-9)
    later = [truths[s]["goodput"] for s in sorted(truths)[1:]]
    assert max(later) < 0.95  # the pause is a notable share: the check above could fail


def test_goodput_is_one_without_pauses() -> None:
    keep, _, truths = run(steps=3 * LOG_EVERY)
    for step, window in keep.windows.items():
        assert window[K.GOODPUT] == pytest.approx(truths[step]["goodput"], abs=0.02)
        assert window[K.GOODPUT] > 0.9  # only the logs' own work is outside the steps


def test_input_wait_is_the_loaders_share_of_the_step() -> None:
    keep, summary, truths = run(steps=4 * LOG_EVERY, loader_s=0.015)
    for step, window in keep.windows.items():
        assert window[K.INPUT_WAIT_FRAC] == pytest.approx(truths[step]["wait"], abs=0.05), step
        assert truths[step]["wait"] > 0.1  # 15 ms of ~25 ms (more under load): the check above could fail
    assert summary[K.INPUT_WAIT_FRAC] == pytest.approx(
        sum(t["wait"] for t in truths.values()) / len(truths), abs=0.05
    )


def test_no_loader_delay_reports_almost_no_input_wait() -> None:
    keep, _, _ = run(steps=3 * LOG_EVERY)
    assert all(w[K.INPUT_WAIT_FRAC] < 0.05 for w in keep.windows.values())


def test_the_summary_splits_the_wall_time_by_cause() -> None:
    warmup = LOG_EVERY
    t0 = time.perf_counter()
    _, summary, _ = run(steps=4 * LOG_EVERY, pause_s=0.02, loader_s=0.003, warmup=warmup)
    elapsed = time.perf_counter() - t0
    parts = [summary[k] for k in ("training_s", "input_wait_s", "paused_s", "warmup_s")]
    assert sum(parts) == pytest.approx(summary["wall_s"], rel=1e-9)
    assert summary["wall_s"] < elapsed  # inside the test's own clock (the model's build is outside)
    # Pauses after steps 4 (the warm-up window's end), 8 and 12 fall in measured windows' wall time;
    # the one after step 16 is followed by no step, so no window spans it.
    assert summary["paused_s"] == pytest.approx(3 * 0.02, abs=0.015)
    assert summary["input_wait_s"] == pytest.approx(summary[K.INPUT_WAIT_FRAC] * summary["seconds"])
    assert summary["training_s"] + summary["input_wait_s"] == pytest.approx(summary["seconds"])
    assert summary[K.GOODPUT] == pytest.approx(summary["seconds"] / (summary["wall_s"] - summary["warmup_s"]))


def test_window_metrics_leave_ledger_keys_out_when_not_measured() -> None:
    plain = Window(4, 100.0, 1e9, 1e9, 2.0)  # no wall time, no input wait: as before the ledger
    out = window_metrics(plain, world_size=1, peak_flops=1e12)
    assert not {K.GOODPUT, K.MFU_WALL, K.INPUT_WAIT_FRAC} & set(out)
    spanned = Window(4, 100.0, 1e9, 1e9, 2.0, wall=2.5, input_wait=0.5, waited=2.0)
    out = window_metrics(spanned, world_size=2, peak_flops=1e12)
    assert out[K.GOODPUT] == 0.8 and out[K.INPUT_WAIT_FRAC] == 0.25
    assert out[K.MFU_WALL] == pytest.approx(1e9 / (2.5 * 2 * 1e12))  # by hand
    assert K.MFU_WALL not in window_metrics(spanned, world_size=1, peak_flops=None)


def test_ranks_combine_wall_as_the_slowest_and_input_wait_time_weighted() -> None:
    a = Window(4, 100.0, 1.0, 1.0, 2.0, wall=2.4, input_wait=0.2, waited=2.0)  # 0.6 s wall per step
    b = Window(2, 50.0, 0.5, 0.5, 1.2, wall=1.6, input_wait=0.6, waited=1.2)  # 0.8 s wall per step
    g = combine_ranks([a, b], world_size=2)
    assert g.seconds == pytest.approx(0.6 * 4) and g.wall == pytest.approx(0.8 * 4)
    assert g.input_wait / g.waited == pytest.approx(0.8 / 3.2)  # (0.2 + 0.6) s of (2.0 + 1.2) s


def test_jsonl_carries_the_ledger_keys(tiny, tmp_path: Path) -> None:
    model, opt = tiny
    options = dict(seq_len=SEQ, log_every=2, warmup=0, peak_tflops=1.0, run_name="r", log_dir=tmp_path)
    with mfumon.monitor(model, loggers=("jsonl",), **options) as mon:
        for _ in range(4):
            mon.step(tokens=train(model, opt, batch()))
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x[k]) for x in lines for k in (K.GOODPUT, K.MFU_WALL, K.INPUT_WAIT_FRAC))
    summary = json.loads((tmp_path / "r.summary.json").read_text())
    assert {"wall_s", "training_s", "input_wait_s", "paused_s", "warmup_s"} <= set(summary)


def test_a_window_of_paused_steps_only_still_counts_its_wall_time(tiny) -> None:
    model, opt = tiny
    with mfumon.monitor(model, seq_len=SEQ, log_every=2, warmup=0, loggers=(), peak_tflops=1.0) as mon:
        for step in range(1, 7):
            if step in (3, 4):  # a whole window inside a pause: no timed step, nothing logged
                with mon.paused():
                    p0 = time.perf_counter()
                    spin(0.03)
                    mon.step(tokens=train(model, opt, batch()))
                    paused = time.perf_counter() - p0
            else:
                mon.step(tokens=train(model, opt, batch()))
    summary = mon.summary()
    assert summary["steps"] == 4
    assert summary["paused_s"] > 2 * 0.03  # both paused steps' time, though no window showed them
    assert summary["paused_s"] == pytest.approx(summary["wall_s"] - summary["seconds"], rel=1e-9)
    assert paused > 0.03


def test_the_stdout_summary_line_shares_out_the_wall_time(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    model, opt = tiny
    with mfumon.monitor(
        model, seq_len=SEQ, log_every=2, warmup=2, loggers=("stdout",), peak_tflops=1.0
    ) as mon:
        for step in range(1, 7):
            mon.step(tokens=train(model, opt, batch()))
            if step == 4:
                with mon.paused():
                    spin(0.03)
    line = next(x for x in capsys.readouterr().out.splitlines() if "(run summary)" in x)
    s = mon.summary()
    shares = [round(s[k] / s["wall_s"] * 100) for k in ("training_s", "input_wait_s", "paused_s", "warmup_s")]
    expected = "training {}%, input wait {}%, paused {}%, warm-up {}%".format(*shares)
    assert line.endswith(f" | wall {s['wall_s']:.4g} s: {expected}")
    assert s["paused_s"] >= 0.03 and shares[2] > 0  # the pause shows: the line could be wrong


def test_a_compiled_model_traces_the_hook_away_and_leaves_input_wait_out(tiny) -> None:
    """fullgraph=True raises on any graph break: the input-wait hook must trace to nothing."""
    model, opt = tiny
    keep = Keep()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = dict(seq_len=SEQ, log_every=4, warmup=4, loggers=(keep,), peak_tflops=1.0, dtype="fp32")
        with mfumon.monitor(model, **options) as mon:
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            for _ in range(12):
                spin(0.005)
                ids = batch()
                logits = compiled(ids[:, :-1])
                nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                mon.step(tokens=BATCH * SEQ)
    assert not [w for w in caught if "Dynamo" in str(w.message) or "graph break" in str(w.message)]
    assert keep.windows and all(K.INPUT_WAIT_FRAC not in w for w in keep.windows.values())  # not measured
    assert all(K.GOODPUT in w for w in keep.windows.values())  # the step clock is outside the model


def test_a_step_that_ends_while_paused_leaves_the_timer_paused(tiny) -> None:
    model, opt = tiny
    keep = Keep()
    with mfumon.monitor(model, seq_len=SEQ, log_every=4, warmup=0, loggers=(keep,), peak_tflops=1.0) as mon:
        for step in range(1, 9):
            if step == 6:
                mon.pause()
                mon.step(tokens=train(model, opt, batch(), 0.01))  # ends while paused: untimed
                assert mon._timer.paused  # still paused: the evaluation below is no step's time
                spin(0.1)  # evaluation
                mon.resume()
            else:
                mon.step(tokens=train(model, opt, batch(), 0.01))
    window = keep.windows[8]  # steps 5, 7, 8 timed (~10 ms each); 100 ms of evaluation is paused
    assert window[K.STEP_TIME_MS] < 60
    assert window[K.GOODPUT] < 0.7
    assert window[K.INPUT_WAIT_FRAC] < 0.2


def test_an_eval_forward_between_steps_is_no_steps_first_forward(tiny) -> None:
    model, opt = tiny
    keep = Keep()
    with mfumon.monitor(model, seq_len=SEQ, log_every=4, warmup=0, loggers=(keep,), peak_tflops=1.0) as mon:
        for _ in range(8):
            model.eval()
            with torch.no_grad():
                model(batch()[:, :-1])  # a quick evaluation, not paused
            model.train()
            spin(0.015)  # then the loader
            mon.step(tokens=train(model, opt, batch(), 0.01))
    assert all(w[K.INPUT_WAIT_FRAC] > 0.3 for w in keep.windows.values())  # 15 ms of ~25 ms


class SlowLogger(Keep):
    def log(self, metrics, step):  # type: ignore[no-untyped-def]
        super().log(metrics, step)
        time.sleep(0.03)  # a slow backend (W&B over a bad network)


def test_the_monitors_own_log_work_is_no_input_wait_on_one_rank(tiny) -> None:
    model, opt = tiny
    keep = SlowLogger()
    with mfumon.monitor(model, seq_len=SEQ, log_every=2, warmup=0, loggers=(keep,), peak_tflops=1.0) as mon:
        for _ in range(8):
            mon.step(tokens=train(model, opt, batch(), 0.01))
    later = [keep.windows[s] for s in (4, 6, 8)]  # each after a 30 ms log
    assert all(w[K.INPUT_WAIT_FRAC] < 0.15 for w in later)  # not loading data (as input wait: 0.7)
    assert all(w[K.GOODPUT] < 0.8 for w in later)  # a gap in the wall time: 30 ms beside ~2 x 10 ms


def test_ranks_that_all_paused_through_a_window_keep_its_wall_time() -> None:
    paused = Window(0, 0.0, 0.0, 0.0, 0.0, wall=1.5)
    assert combine_ranks([paused, Window(0, 0.0, 0.0, 0.0, 0.0, wall=2.0)], world_size=2).wall == 2.0
    assert combine_ranks([Window(0, 0.0, 0.0, 0.0, 0.0)] * 2, world_size=2) == Window(0, 0.0, 0.0, 0.0, 0.0)
