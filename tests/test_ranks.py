"""The per-rank view and straggler notices (mfumon.ranks), and the exchange they ride on, over two
real gloo processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import mfumon
from mfumon import metrics as K
from mfumon.distributed import pipelined_for
from mfumon.errors import ConfigError, FaultLog
from mfumon.ledger import combine_stats
from mfumon.metrics import Window, combine_ranks
from mfumon.ranks import RankView, Stragglers, rank_view
from tests.procs import exit_now, spawn

FPT = 1_000_000
LOG_EVERY = 4
PHASE_STEPS = 12  # three windows per phase
SLOW_S = 0.05  # the slowed rank's extra time per step

# Two ranks' windows that resolved different numbers of steps (rank 1: 3 measured steps, rank 0: 5),
# and ledger values with NaN (not measured) where a rank has none: the reduction must give exactly
# what combine_ranks / combine_stats give on the same rows.
WARM = [Window(2, 200.0, 2e8, 3e8, 0.4, 0.5), Window(0, 0.0, 0.0, 0.0, 0.0)]
MEAS = [
    Window(5, 500.0, 5e8, 6e8, 1.25, 1.5, 0.25, 1.0),
    Window(3, 900.0, 9e8, 9.9e8, 0.96, 1.2, 0.06, 0.96),
]
OPS = ("sum", "sum", "max", "max", "min", "min")
STATS = [[1.5, math.nan, 2.0, math.nan, 7.0, math.nan], [2.25, math.nan, -1.0, math.nan, 3.0, math.nan]]


def test_rank_view_of_two_windows() -> None:
    view = rank_view(MEAS)
    # mean step times: rank 0 1.25 / 5 = 0.25 s, rank 1 0.96 / 3 = 0.32 s
    # input-wait fractions: rank 0 0.25 / 1.0 = 0.25, rank 1 0.06 / 0.96 = 0.0625
    assert view == RankView(0.32, 0.25, 1, 0.25, 0)
    assert view.metrics() == {
        K.STEP_TIME_MAX_MS: 320.0,
        K.STEP_TIME_MIN_MS: 250.0,
        K.SLOWEST_RANK: 1.0,
        K.INPUT_WAIT_MAX_FRAC: 0.25,
        K.INPUT_WAIT_MAX_RANK: 0.0,
    }
    assert view.gap == pytest.approx(0.32 / 0.25 - 1)  # 28% slower than the fastest


def test_rank_view_leaves_out_what_no_rank_measured() -> None:
    no_wait = [Window(2, 1.0, 1.0, 1.0, 0.2), Window(2, 1.0, 1.0, 1.0, 0.2)]
    view = rank_view(no_wait)
    assert view is not None and (view.step_time_max, view.step_time_min) == (0.1, 0.1)  # 0.2 s / 2 steps
    assert (view.slowest_rank, view.input_wait_max_rank) == (0, -1) and math.isnan(
        view.input_wait_max
    )  # a tie: rank 0
    assert set(view.metrics()) == {K.STEP_TIME_MAX_MS, K.STEP_TIME_MIN_MS, K.SLOWEST_RANK}
    assert rank_view([Window(2, 1.0, 1.0, 1.0, 0.2)]) is None  # one rank
    assert rank_view([Window(2, 1.0, 1.0, 1.0, 0.2), Window(0, 0.0, 0.0, 0.0, 0.0)]) is None  # one timed


def _view(slowest: int, gap: float) -> RankView:
    return RankView(0.1 * (1 + gap), 0.1, slowest, math.nan, -1)


def test_a_straggler_is_said_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    stragglers = Stragglers(FaultLog())
    with caplog.at_level(logging.WARNING, logger="mfumon"):
        for step, view in enumerate(
            [
                _view(5, 0.08),
                _view(5, 0.08),
                _view(5, 0.08),  # 3 windows: said at the third
                _view(5, 0.09),
                _view(5, 0.08),  # the same episode: nothing more
                _view(5, 0.04),  # caught up (5% or less): the episode ends
                _view(5, 0.08),
                _view(5, 0.08),  # 2 windows: not yet
                _view(2, 0.08),
                _view(2, 0.08),
                _view(2, 0.08),  # another rank: a new episode
                None,  # one rank, or no view: ends it too
            ],  # fmt: skip
            start=1,
        ):
            stragglers.observe(view, step * 10)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "mfumon: rank 5 has been the slowest rank for 3 windows (+8% step time vs the fastest rank: "
        "108.0 vs 100.0 ms at step 30); said once until it catches up",
        "mfumon: rank 2 has been the slowest rank for 3 windows (+8% step time vs the fastest rank: "
        "108.0 vs 100.0 ms at step 110); said once until it catches up",
    ]
    quiet = Stragglers(FaultLog())  # ranks other than 0 count, and say nothing
    with caplog.at_level(logging.WARNING, logger="mfumon"):
        for step in range(4):
            quiet.observe(_view(1, 0.5), step, report=False)
    assert len(caplog.records) == 2


def test_one_rank_has_no_per_rank_keys(tmp_path: Path) -> None:
    from tests.conftest import TinyLM, train_step

    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mfumon.monitor(
        model, seq_len=8, flops_per_token=FPT, peak_tflops=1.0, log_every=2, warmup=0, loggers=()
    ) as mon:
        for _ in range(4):
            mon.step(tokens=train_step(model, opt))
    per_rank = {
        K.STEP_TIME_MAX_MS,
        K.STEP_TIME_MIN_MS,
        K.SLOWEST_RANK,
        K.INPUT_WAIT_MAX_FRAC,
        K.INPUT_WAIT_MAX_RANK,
    }
    assert K.STEP_TIME_MS in mon.metrics and not per_rank & set(mon.metrics)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from mfumon.distributed import Reducer
    from tests.conftest import TinyLM

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("mfumon").addHandler(Keep())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # 1. The exchange alone, on windows that differ across the ranks: synchronous, then pipelined
    # (read a log later) as if timed on CUDA (the store says "cuda": agree on the finished step).
    reducer = Reducer(FaultLog())
    reducer.join(torch.device("cpu"), "check")
    agreed = reducer.agree(7 - rank)  # CPU clocks on every rank: nothing to agree on, no round
    [(at, reduced, current)] = reducer.reduce(WARM[rank], MEAS[rank], STATS[rank], OPS, step=7)
    piped = Reducer(FaultLog())
    piped.pipelined = True
    piped.join(torch.device("cuda"), "piped")  # the device only names the clock here: no CUDA call
    logs = []
    for step, final in ((4, False), (8, False), (12, True)):
        finished = None if final else piped.agree(step - rank)  # rank 1's device is a step behind
        meas = Window(*(v * step for v in dataclasses.astuple(MEAS[rank])))
        got = piped.reduce(WARM[rank], meas, STATS[rank], OPS, step=step, final=final)
        logs.append([finished, [[s, dataclasses.astuple(r.meas), c] for s, r, c in got]])
    # 2. A real run: rank 1 slowed inside its steps, then rank 0 slowed in its data loader.
    torch.manual_seed(rank)
    model = TinyLM()  # no gradient all-reduce: each rank's step time is its own (see mfumon.ranks)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mfumon.monitor(
        model, seq_len=8, flops_per_token=FPT, peak_tflops=1.0, log_every=LOG_EVERY, warmup=0,
        loggers=("jsonl",), run_name="ranks", log_dir=out_dir,
    ) as mon:  # fmt: skip
        for i in range(2 * PHASE_STEPS):
            slow_loader = i >= PHASE_STEPS and rank == 0
            if slow_loader:
                time.sleep(SLOW_S)  # the data loader: before the forward
            idx = torch.randint(0, 32, (4, 9))
            loss = torch.nn.functional.cross_entropy(
                model(idx[:, :-1]).reshape(-1, 32), idx[:, 1:].reshape(-1)
            )
            if i < PHASE_STEPS and rank == 1:
                time.sleep(SLOW_S)  # inside the step: after the forward
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(tokens=32)
    said = list(records)  # the notices of run 2
    # 3. The same monitor with the exchange pipelined, as the job's environment asks.
    os.environ["MFUMON_EXCHANGE"] = "pipelined"
    with mfumon.monitor(
        model, seq_len=8, flops_per_token=FPT, peak_tflops=1.0, log_every=LOG_EVERY, warmup=0,
        loggers=("jsonl",), run_name="piped", log_dir=out_dir,
    ) as piped_mon:  # fmt: skip
        del os.environ["MFUMON_EXCHANGE"]
        assert piped_mon._reducer.pipelined
        for _ in range(PHASE_STEPS):
            idx = torch.randint(0, 32, (4, 9))
            model(idx[:, :-1]).sum().backward()
            opt.step()
            opt.zero_grad()
            piped_mon.step(tokens=32)
    result: dict[str, Any] = {
        "agreed": agreed,
        "reduced": [[dataclasses.astuple(w) for w in reduced[:2]], reduced[2]],
    }
    result["view"] = None if reduced.ranks is None else list(reduced.ranks.__dict__.values())
    result["records"] = said
    result["at"], result["current"], result["piped"] = at, current, logs
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    exit_now()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    spawn(_worker, (2, str(out / "init"), str(out)), nprocs=2)
    return out


def _rank(out: Path, rank: int) -> dict[str, Any]:
    return json.loads((out / f"rank{rank}.json").read_text())


def test_the_exchange_gives_combine_ranks_figures(two_ranks: Path) -> None:
    for rank in (0, 1):
        got = _rank(two_ranks, rank)
        assert got["agreed"] is None and (got["at"], got["current"]) == (7, True)
        warm, meas = (Window(*w) for w in got["reduced"][0])
        # bit for bit: the same arithmetic on the same rows
        assert warm == combine_ranks(WARM, 2) and meas == combine_ranks(MEAS, 2)
        stats = got["reduced"][1]
        assert stats[::2] == combine_stats(OPS[::2], [row[::2] for row in STATS]) == [3.75, 2.0, 3.0]
        assert all(math.isnan(v) for v in stats[1::2])  # measured by no rank: NaN, never 0
        assert got["view"] == [0.32, 0.25, 1, 0.25, 0]  # as test_rank_view_of_two_windows works out
    # by hand, measured: 5 steps (the most); tokens per step 500/5 + 900/3 = 400, x 5 = 2000;
    # seconds: the slowest per step, 0.96 / 3 = 0.32, x 5 = 1.6
    assert combine_ranks(MEAS, 2).tokens == 2000.0 and combine_ranks(MEAS, 2).seconds == pytest.approx(1.6)


def test_a_pipelined_exchange_gives_the_same_figures_a_log_later(two_ranks: Path) -> None:
    def meas(step: int) -> list[float]:  # the windows each rank sent at `step`, combined
        return list(
            dataclasses.astuple(
                combine_ranks([Window(*(v * step for v in dataclasses.astuple(w))) for w in MEAS], 2)
            )
        )

    for rank in (0, 1):
        logs = _rank(two_ranks, rank)["piped"]
        # agreed: a round of its own at the first log (rank 1 has finished 3, rank 0 4), then the
        # smallest step the previous exchange carried: the steps both had finished then
        assert [finished for finished, _ in logs] == [3, 3, None]
        assert [got for _, got in logs] == [
            [],  # started, read at the next log
            [[4, meas(4), False]],
            [[8, meas(8), False], [12, meas(12), True]],  # close: the one in flight, then its own
        ]


def test_a_pipelined_monitor_logs_every_window_at_its_own_step(two_ranks: Path) -> None:
    lines = [json.loads(x) for x in (two_ranks / "piped.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12]  # 4 and 8 read a log later, 12 at close
    tokens = sum(r[K.TOKENS_PER_S] * r[K.STEP_TIME_MS] / 1e3 * LOG_EVERY for r in lines)
    assert tokens == pytest.approx(PHASE_STEPS * 32 * 2)  # every step of both ranks, once
    assert all(K.SLOWEST_RANK in r for r in lines)


def test_the_slow_rank_is_named_and_said_once(two_ranks: Path) -> None:
    lines = [json.loads(x) for x in (two_ranks / "ranks.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12, 16, 20, 24]
    for line in lines[:3]:  # rank 1 sleeps SLOW_S inside each of its steps
        assert line[K.SLOWEST_RANK] == 1 and line[K.STEP_TIME_MAX_MS] >= SLOW_S * 1e3
        # the global step time is the slowest rank's
        assert line[K.STEP_TIME_MAX_MS] == pytest.approx(line[K.STEP_TIME_MS])
    for line in lines[3:]:  # rank 0 sleeps SLOW_S before each forward
        assert line[K.SLOWEST_RANK] == 0 and line[K.INPUT_WAIT_MAX_RANK] == 0
        # each of its steps waited at least SLOW_S of its mean step time (the slowest: rank 0's)
        assert line[K.INPUT_WAIT_MAX_FRAC] >= SLOW_S / (line[K.STEP_TIME_MAX_MS] / 1e3) * (1 - 1e-9)
    assert all(line[K.STEP_TIME_MIN_MS] < line[K.STEP_TIME_MAX_MS] for line in lines)
    said = [r for r in _rank(two_ranks, 0)["records"] if "the slowest rank" in r]
    assert len(said) == 2, said  # one episode each, said once
    assert said[0].startswith("mfumon: rank 1 has been the slowest rank for 3 windows (+")
    assert "at step 12" in said[0]  # its input wait, if any, is noise here
    assert said[1].startswith("mfumon: rank 0 has been the slowest rank for 3 windows (+")
    assert "at step 24, its input wait" in said[1]
    assert not [r for r in _rank(two_ranks, 1)["records"] if "the slowest rank" in r]  # rank 0 speaks


def test_the_notice_names_a_straggler_s_own_input_wait(caplog: pytest.LogCaptureFixture) -> None:
    stragglers = Stragglers(FaultLog())
    slow_loader = RankView(0.2, 0.1, 3, 0.4, 3)  # rank 3: twice the fastest, 40% of it input wait
    with caplog.at_level(logging.WARNING, logger="mfumon"):
        for step in (10, 20, 30):
            stragglers.observe(slow_loader, step)
    assert [r.getMessage() for r in caplog.records] == [
        "mfumon: rank 3 has been the slowest rank for 3 windows (+100% step time vs the fastest rank: "
        "200.0 vs 100.0 ms at step 30, its input wait 40% of its step time); said once until it catches up"
    ]


def test_restart_keeps_the_time_before_it_out_of_the_next_step() -> None:
    from mfumon.timing import StepTimer

    timer = StepTimer(torch.device("cpu"))
    timer.start()
    timer.mark_step(1, 8)
    time.sleep(0.05)  # a log waiting for another rank
    t0 = time.perf_counter()
    timer.restart()
    timer.mark_forward()
    timer.mark_step(2, 8)
    t2 = time.perf_counter()
    step = timer.resolve()[1]
    # the step runs from the restart (after t0) to its end (before t2); its span still reaches
    # back to step 1's end, 50 ms or more before the restart; its input wait is measured
    assert step.seconds is not None and step.seconds <= t2 - t0 < 0.05
    assert step.span is not None and step.span >= step.seconds + 0.05
    assert step.input_wait is not None and step.input_wait <= step.seconds
    timer.pause()
    timer.restart()  # paused: nothing happens
    assert timer.paused


@pytest.mark.parametrize(
    ("env", "world", "expected"),
    [(None, 2, False), (None, 63, False), (None, 64, True), ("sync", 1000, False), ("pipelined", 2, True)],
)
def test_the_exchange_is_pipelined_from_64_ranks_or_as_the_job_says(
    monkeypatch: pytest.MonkeyPatch, env: str | None, world: int, expected: bool
) -> None:
    if env is None:
        monkeypatch.delenv("MFUMON_EXCHANGE", raising=False)
    else:
        monkeypatch.setenv("MFUMON_EXCHANGE", env)
    assert pipelined_for(world) is expected


def test_a_bad_exchange_setting_fails_at_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFUMON_EXCHANGE", "async")
    with pytest.raises(ConfigError, match="MFUMON_EXCHANGE must be sync, pipelined or auto, got 'async'"):
        pipelined_for(2)
