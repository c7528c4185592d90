"""Two real gloo processes: global figures and rank-0-only output."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mfumon
from mfumon import metrics as K
from tests.procs import exit_now, spawn

FPT = 1_000_000
STEPS, LOG_EVERY = 12, 6
TOKENS = {0: 100, 1: 300}  # tokens per step on each rank
DELAY_S = {0: 0.0, 1: 0.03}  # rank 1 is slower


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from tests.conftest import TinyLM

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before, after = [], []  # the worker's clock around each mon.step(), which marks the step's end
    with mfumon.monitor(
        model,
        seq_len=8,
        flops_per_token=FPT,
        peak_tflops=1.0,
        log_every=LOG_EVERY,
        warmup=0,
        loggers=("stdout", "jsonl"),
        run_name="dist",
        log_dir=out_dir,
    ) as mon:
        for _ in range(STEPS):
            idx = torch.randint(0, 32, (1, TOKENS[rank] + 1))
            loss = model(idx[:, :-1]).logsumexp(-1).mean()
            time.sleep(DELAY_S[rank])
            loss.backward()  # the gradient all-reduce keeps ranks in step
            opt.step()
            opt.zero_grad()
            before.append(time.perf_counter())
            mon.step(tokens=TOKENS[rank])
            after.append(time.perf_counter())
    record = {"before": before, "after": after, "metrics": mon.metrics}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    exit_now()


def test_two_gloo_ranks_log_global_figures_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    spawn(_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    out = capfd.readouterr().out
    assert out.count("[mfumon] step 6 |") == 1 and out.count("[mfumon] step 12 |") == 1  # rank 0 only
    assert out.count("(run summary)") == 1
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["dist.jsonl"]
    lines = [json.loads(x) for x in (tmp_path / "dist.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [6, 12]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank marks a step's end with time.perf_counter() inside mon.step(), so its own readings
    # around the calls bound its steps 7..12 (the second window) whatever the load: from the mark
    # of step 6 to that of step 12. The global step time is the slowest rank's.
    last = lines[-1]
    window_s = last[K.STEP_TIME_MS] / 1e3 * 6
    lo = max(r["before"][11] - r["after"][5] for r in ranks)
    hi = max(r["after"][11] - r["before"][5] for r in ranks)
    assert lo - 1e-9 <= window_s <= hi + 1e-9, (lo, window_s, hi)  # 1e-9 s: float rounding
    assert last[K.STEP_TIME_MS] >= DELAY_S[1] * 1e3
    assert last[K.TOKENS_PER_S] == pytest.approx(
        (100 + 300) / (last[K.STEP_TIME_MS] / 1e3)
    )  # summed over ranks
    assert last[K.TOKENS_PER_S_PER_DEVICE] == pytest.approx(last[K.TOKENS_PER_S] / 2)
    # MFU = global FLOPs / (time x world x peak)
    assert last[K.MFU] == pytest.approx(400 * FPT / (last[K.STEP_TIME_MS] / 1e3) / (2 * 1e12))
    # every rank holds the same global numbers
    assert ranks[0]["metrics"] == ranks[1]["metrics"]


def _master_only_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """nanoGPT's pattern: DDP on every rank, the monitor on rank 0 only."""
    import logging

    from tests.conftest import TinyLM

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("mfumon").addHandler(Keep())
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = None
    if rank == 0:
        mon = mfumon.Monitor(
            model, seq_len=8, flops_per_token=FPT, peak_tflops=1.0, log_every=LOG_EVERY, warmup=0,
            loggers=("jsonl",), run_name="master", log_dir=out_dir,
        )  # fmt: skip
        mon.start()
    for _ in range(STEPS):
        idx = torch.randint(0, 32, (1, TOKENS[rank] + 1))
        model(idx[:, :-1]).logsumexp(-1).mean().backward()  # the all-reduce keeps the ranks in step
        opt.step()
        opt.zero_grad()
        if mon is not None:
            mon.step(tokens=TOKENS[rank])
    if mon is not None:
        mon.close()
        Path(out_dir, "rank0.json").write_text(json.dumps({"records": records, "summary": mon.summary()}))
    dist.destroy_process_group()
    exit_now()


def test_a_monitor_on_rank_0_only_never_waits_for_the_others(tmp_path: Path) -> None:
    spawn(_master_only_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, timeout_s=60)
    result = json.loads((tmp_path / "rank0.json").read_text())
    said = [r for r in result["records"] if "not every rank has a monitor" in r]
    assert said == [
        "mfumon: not every rank has a monitor (ranks 1), so no figures are reduced across ranks (that "
        "would wait forever): rank 0 reports its own. Build the monitor on every rank (only rank 0 logs)."
    ]
    lines = [json.loads(x) for x in (tmp_path / "master.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [6, 12]
    summary = result["summary"]
    assert summary["world_size"] == 1 and summary["tokens"] == STEPS * TOKENS[0]  # rank 0's own figures


def _extra_monitor_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank 0 runs a short monitor of its own first, then every rank runs the training monitor."""
    from tests.conftest import TinyLM

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    options = dict(seq_len=8, flops_per_token=FPT, peak_tflops=1.0, warmup=0, loggers=())
    if rank == 0:
        with mfumon.monitor(model, log_every=2, **options) as probe:  # its own cadence: another monitor
            for _ in range(3):
                probe.step(tokens=1)
    with mfumon.monitor(model, log_every=LOG_EVERY, **options) as mon:
        for _ in range(STEPS):
            idx = torch.randint(0, 32, (1, TOKENS[rank] + 1))
            model(idx[:, :-1]).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.step(tokens=TOKENS[rank])
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(mon.summary()))
    dist.destroy_process_group()
    exit_now()


def test_monitors_that_differ_across_ranks_are_never_paired(tmp_path: Path) -> None:
    # rank 0's first monitor and rank 1's only one are each rank's first: paired by count alone they
    # would meet in one collective with different shapes (gloo aborts) or wait forever
    spawn(_extra_monitor_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, timeout_s=90)
    summaries = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in summaries] == [1, 1]  # each said so and reported its own figures
    assert [s["tokens"] for s in summaries] == [STEPS * TOKENS[0], STEPS * TOKENS[1]]


def test_combine_table_gives_combine_stats_figures() -> None:
    from mfumon.distributed import combine_table
    from mfumon.ledger import combine_stats

    nan = math.nan
    ops = ("sum", "max", "min", "sum", "max", "min")
    rows = [[0.1, 3.0, -2.0, nan, nan, nan], [0.2, nan, 5.0, nan, nan, 4.0]]
    # by hand: 0.1 + 0.2, max(3), min(-2, 5), none measured (NaN, never 0), none, min(4)
    expected = [0.1 + 0.2, 3.0, -2.0, nan, nan, 4.0]
    got = combine_table(ops, torch.tensor(rows, dtype=torch.float64))
    same = [a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(got, expected, strict=True)]
    assert all(same) and all(
        a == b or (math.isnan(a) and math.isnan(b))
        for a, b in zip(got, combine_stats(ops, rows), strict=True)
    )  # bit for bit with two ranks
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(7, 60, generator=gen, dtype=torch.float64)
    table[torch.rand(7, 60, generator=gen) < 0.3] = nan
    table[:, 0] = nan  # a column no rank measured
    ops = ("sum", "max", "min") * 20
    got = combine_table(ops, table)
    want = combine_stats(ops, table.tolist())
    assert math.isnan(got[0]) and math.isnan(want[0])
    assert got[1:] == pytest.approx(want[1:], rel=1e-12, abs=1e-12)  # 7 ranks: torch's sum vs fsum
    assert combine_table((), torch.empty(2, 0, dtype=torch.float64)) == []
