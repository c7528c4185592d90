"""Per-log cost of the cross-rank exchange, by form and world size, over real gloo processes.

Each world size spawns that many processes (torch.multiprocessing, a FileStore rendezvous) and
times, in the same processes, one log's collectives in each form with the payload the monitor
sends (two windows of 8 fields, `--stats` ledger values, the per-rank view):

    gather x2   the 0.1 form: `agree`'s all_gather of 1 value, then an all_gather of every field
    gather x1   one all_gather of every field, `agree`'s value included (merged into it)
    reduce x3   all_reduce MAX (agree), all_reduce SUM, all_reduce MAX (minima negated into it)
    reduce x2   all_reduce SUM + all_reduce MAX, agree's value merged into the MAX one
    reduce x1   one all_reduce MAX alone (a lower bound: what one latency-bound collective costs)
    mfumon      the monitor's own `Reducer.agree` + `Reducer.reduce`, CPU clocks: one all_gather
    mfumon cuda     the same where a rank times on CUDA: agree's round, then the gather
    mfumon pipelined  `Reducer.pipelined`: started here, read at the next log (host time only)

Each log is timed from a barrier to its end; the figure is the median over logs of the mean
over ranks, printed in ms and as a ratio to `gather x2` measured in the same processes.

A second line: host time rank 0 spends in a log while the last rank reaches the log `--late-ms`
later (a straggler), for the monitor's exchange synchronous ("mfumon cuda") and pipelined
(`async_op=True`, started at one log and read at the next, a `--window-ms` "window" later).

    python benchmarks/bench_reduce.py [--worlds 2 4 8 16 32] [--logs 40] [--stats 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMS = (
    "gather x2",
    "gather x1",
    "reduce x3",
    "reduce x2",
    "reduce x1",
    "mfumon",
    "mfumon cuda",
    "mfumon pipelined",
)
WINDOW_FIELDS = 8  # mfumon.metrics.Window
SUM_FIELDS = 2 * 6  # per window: present, tokens, 2 FLOPs per step, input wait, waited
MAX_FIELDS = 2 * 3 + 5  # per window: steps, seconds and wall per step; agree, min, 2 arg-maxes, frac


def _forms(stats: int) -> dict[str, Callable[[], None]]:
    gather_width = 2 * WINDOW_FIELDS + stats
    world = dist.get_world_size()

    def gather(width: int) -> None:
        local = torch.zeros(width, dtype=torch.float64)
        out = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(out, local)

    def reduce(width: int, op: dist.ReduceOp) -> None:
        dist.all_reduce(torch.zeros(width, dtype=torch.float64), op=op)

    MAX, SUM = dist.ReduceOp.MAX, dist.ReduceOp.SUM
    return {
        "gather x2": lambda: (gather(1), gather(gather_width)),
        "gather x1": lambda: gather(1 + gather_width + 4),
        "reduce x3": lambda: (
            reduce(1, MAX),
            reduce(SUM_FIELDS + 2 * stats, SUM),
            reduce(MAX_FIELDS + stats, MAX),
        ),
        "reduce x2": lambda: (reduce(SUM_FIELDS + 2 * stats, SUM), reduce(MAX_FIELDS + stats, MAX)),
        "reduce x1": lambda: reduce(MAX_FIELDS + stats, MAX),
    }


def _reducer(stats: int, *, pipelined: bool, device: str = "cpu") -> Callable[[], None]:
    """One log of the monitor's own exchange (`Reducer.agree` + `Reducer.reduce`), as windows.py
    calls it; `device="cuda"` only names the clock (an agree round where it is not pipelined)."""
    from mfumon.distributed import Reducer
    from mfumon.errors import FaultLog
    from mfumon.metrics import Window

    reducer = Reducer(FaultLog())
    reducer.pipelined = pipelined
    reducer.join(torch.device(device), f"bench/{pipelined}/{device}")
    rank = dist.get_rank()
    meas = Window(10, 1000.0 * (rank + 1), 6e9, 8e9, 0.5 + 0.01 * rank, 0.6, 0.01, 0.5)
    values = [float(rank)] * stats
    ops = ("sum", "max", "min") * (stats // 3) + ("sum",) * (stats % 3)
    step = 0

    def log() -> None:
        nonlocal step
        step += 10
        reducer.agree(step)
        reducer.reduce(meas, meas, values, ops, step=step)

    log()  # the verdict, at the first log
    return log


def _time_forms(rank: int, logs: int, stats: int) -> dict[str, float]:
    forms = _forms(stats)
    forms["mfumon"] = _reducer(stats, pipelined=False)
    forms["mfumon cuda"] = _reducer(stats, pipelined=False, device="cuda")
    forms["mfumon pipelined"] = _reducer(stats, pipelined=True, device="cuda")
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(3):  # warm-up: connections, allocator
        for form in forms.values():
            form()
    for _ in range(logs):
        for name, form in forms.items():  # interleaved: load changes hit every form alike
            dist.barrier()
            t0 = time.perf_counter()
            form()
            times[name].append(time.perf_counter() - t0)
    return _mean_over_ranks({k: statistics.median(v) for k, v in times.items()})


def _time_straggler(rank: int, logs: int, stats: int, window_s: float, late_s: float) -> dict[str, float]:
    """Host seconds rank 0 spends in a log while the last rank arrives `late_s` after it."""
    world = dist.get_world_size()
    out: dict[str, float] = {}
    for name, pipelined in (("late sync", False), ("late pipelined", True)):
        log = _reducer(stats, pipelined=pipelined, device="cuda")
        spent: list[float] = []
        for _ in range(logs):
            time.sleep(window_s + (late_s if rank == world - 1 else 0.0))  # the window's training
            t0 = time.perf_counter()
            log()
            spent.append(time.perf_counter() - t0)
            dist.barrier()  # re-align the ranks: every log starts with the same lateness
        out[name] = statistics.median(spent[2:])
    return out if rank == 0 else {}


def _mean_over_ranks(medians: dict[str, float]) -> dict[str, float]:
    names = sorted(medians)
    local = torch.tensor([medians[n] for n in names], dtype=torch.float64)
    dist.all_reduce(local)
    return {n: v / dist.get_world_size() for n, v in zip(names, local.tolist(), strict=True)}


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    forms = _time_forms(rank, args.logs, args.stats)
    late = _time_straggler(rank, max(args.logs // 2, 8), args.stats, args.window_ms / 1e3, args.late_ms / 1e3)
    if rank == 0:
        Path(out_file).write_text(repr({**forms, **late}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo may abort there: see tests/procs.exit_now)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--logs", type=int, default=40, help="timed logs per form")
    parser.add_argument("--stats", type=int, default=16, help="ledger values per rank")
    parser.add_argument("--window-ms", type=float, default=50.0)
    parser.add_argument("--late-ms", type=float, default=20.0)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"gloo over loopback; {args.stats} ledger values; median of {args.logs} logs, mean over ranks"
    )
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out_file = str(Path(tmp, "out"))
            mp.start_processes(
                _worker,
                args=(world, str(Path(tmp, "init")), args, out_file),
                nprocs=world,
                start_method="spawn",
            )
            rows.append((world, eval(Path(out_file).read_text())))  # our own repr of a dict of floats
        world_, res = rows[-1]
        base = res["gather x2"]
        cells = " | ".join(f"{name} {res[name] * 1e3:.3f} ms ({res[name] / base:.2f}x)" for name in FORMS)
        print(f"world {world_:>3}: {cells}", flush=True)
        print(
            f"           rank 0's host in a log, a peer {args.late_ms:g} ms late: mfumon cuda "
            f"{res['late sync'] * 1e3:.3f} ms, mfumon pipelined {res['late pipelined'] * 1e3:.3f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
