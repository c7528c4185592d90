"""Ranks: which one this process is, and the once-per-log reduction of windows across them.

Every collective here runs once per log interval (or once per run), never per step, and over a
gloo group where the job's backend is another, so it never queues behind GPU work.

The exchange is one all_gather of each rank's row (its two windows and the ledger's values),
combined on every rank by `combine_ranks` and `combine_table` (`combine_stats`, in torch); the per-rank view
(`mfumon.ranks`) is read from the same rows. Where any rank times on CUDA, a one-value
all_gather first agrees on the last step every rank's device has finished, so all ranks resolve
the same steps; CPU clocks have finished every step they marked, so without CUDA there is no such
round. gloo runs both as rings (W - 1 hops for an all_gather, 2(W - 1) for an all_reduce), so one
gather of a few dozen values costs about half of a pair of all_reduces (benchmarks/bench_reduce.py,
BENCHMARKS.md). `Reducer.pipelined` reads each exchange one log later, so no host waits on it:
on from `PIPELINE_FROM_RANKS` ranks, or as the job's ``MFUMON_EXCHANGE`` says ("sync",
"pipelined", "auto"); the choice is part of each rank's monitor tag, so ranks that differ in it
reduce nothing together instead of waiting in mismatched collectives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from datetime import timedelta
from typing import Any, NamedTuple

import torch

from mfumon.errors import ConfigError, FaultLog
from mfumon.ledger import OPS
from mfumon.metrics import EMPTY_WINDOW, Window, combine_ranks
from mfumon.ranks import RankView, rank_view

__all__ = [
    "EXCHANGE_ENV",
    "PIPELINE_FROM_RANKS",
    "Reduced",
    "Reducer",
    "all_ranks_agree",
    "combine_table",
    "initialized",
    "pipelined_for",
    "rank_world",
]

RANK_WAIT_S = 5.0  # rank 0, at its first log: how long the other ranks' monitors may be late
VERDICT_WAIT_S = 60.0  # another rank, at its first log: how long rank 0's first log may be late


def initialized() -> bool:
    """True when torch.distributed is available and its default process group is set up."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed's, else ``RANK`` (default 0) and 1."""
    if initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), 1


def all_ranks_agree(ok: bool) -> bool:
    """True when `ok` on every rank; one tiny all-reduce, called once per run at setup."""
    dist = torch.distributed
    if not initialized() or dist.get_world_size() == 1:
        return ok
    backend = str(dist.get_backend())
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "gloo" not in backend and torch.cuda.is_available()
        else torch.device("cpu")
    )
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())  # host sync: once per run, at the first training batch


class Reduced(NamedTuple):
    """One log's global figures: warm-up and measured windows, ledger values, the per-rank view."""

    warm: Window
    meas: Window
    stats: list[float]
    ranks: RankView | None  # None with one rank (or after a fault)


EXCHANGE_ENV = "MFUMON_EXCHANGE"  # "sync", "pipelined" or "auto" (the default)
PIPELINE_FROM_RANKS = 64  # "auto": from here a synchronous exchange holds each host for tens of ms


def pipelined_for(world: int) -> bool:
    """Whether the exchange is pipelined for `world` ranks: ``MFUMON_EXCHANGE``, else from 64 ranks.

    At 32 gloo ranks a synchronous exchange held a host 89 ms per log and a pipelined one 7.6 ms,
    at the price of each window reaching the loggers one log later (BENCHMARKS.md, bench_reduce.py).
    """
    mode = os.environ.get(EXCHANGE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "sync", "pipelined"):
        raise ConfigError(f"{EXCHANGE_ENV} must be sync, pipelined or auto, got {mode!r}")
    return mode == "pipelined" or (mode == "auto" and world >= PIPELINE_FROM_RANKS)


class Reducer:
    """Combines every rank's windows into global ones, once per log; faults go to `faults`.

    Ranks reduce together only when every rank has a monitor. Each rank says so in the job's
    key-value store when it starts (no collective); at the first log, rank 0 looks for all of
    them and writes the verdict, which the other ranks read. A monitor on rank 0 alone (the
    `master_process` pattern) or a rank whose setup failed thus never waits in a collective that
    the others would never join: it says so once and reports its own figures.

    `pipelined`: each log starts its exchange (`async_op=True`) and reads the previous log's, so
    no rank's host waits for a slower peer or for the collective's own latency, at the price of
    one log of latency (each window reaches the loggers one log later, at its own step; under
    CUDA the agreed finished step also comes from the previous exchange, so a window holds the
    steps every device had finished one log earlier). Off by default: see BENCHMARKS.md.
    """

    def __init__(self, faults: FaultLog) -> None:
        self.world = 1
        self._faults = faults
        self._group: Any = None
        self._device = torch.device("cpu")
        self._store: Any = None  # set between join() and the verdict at the first log
        self._prefix = ""
        self._tag = ""
        self._rank = 0
        self._agree = True  # some rank times on CUDA: agree on the finished step before each log
        self.pipelined = False  # read each exchange at the next log (set before the first log)
        self._flight: _Flight | None = None  # pipelined: the exchange started at the last log
        self._landed: list[tuple[int, Reduced]] = []  # finished exchanges not yet handed out
        self._finished = 0  # this rank's last finished step, given to agree() at this log
        self._agreed: int | None = None  # the smallest finished step the last exchange carried

    def join(self, device: torch.device, tag: str = "") -> int | None:
        """Say in the job's store that this rank has a monitor; returns the rank (None: not distributed).

        `tag` describes the monitor (its cadence and FLOPs): ranks whose n-th monitors differ in it
        are not the same monitor, and reduce nothing together.
        """
        if not initialized():
            return None
        dist = torch.distributed
        self._rank, self.world, self._device = dist.get_rank(), dist.get_world_size(), device
        if self.world > 1:
            self.pipelined = self.pipelined or pipelined_for(self.world)
            tag = f"{tag or '-'}/{'pipelined' if self.pipelined else 'sync'}"
            try:
                store = dist.distributed_c10d._get_default_store()
                seq = store.add(f"mfumon/monitors/rank{self._rank}", 1)  # this rank's n-th monitor
                self._prefix = f"mfumon/{seq}/"
                self._tag = tag or "-"
                store.set(f"{self._prefix}rank{self._rank}", f"{self._tag}@{device.type}")
                self._store = store
            except Exception as exc:  # no store to ask: take every rank as having a monitor
                self._faults.fault("distributed", exc)
                self._connect()
        return self._rank

    def _connect(self) -> None:
        """The gloo group the reduction runs over (a collective: every rank has a monitor here)."""
        device, self._device = self._device, torch.device("cpu")
        if torch.distributed.get_backend() != "gloo":
            try:
                self._group = torch.distributed.new_group(backend="gloo")
            except Exception as exc:  # no gloo: reduce over the default group on the device instead
                self._faults.fault("gloo_group", exc)
                self._device = device

    def _decide(self) -> None:
        """Once, at the first log: reduce across ranks only when every rank has a monitor.

        The verdict is one store key, set once (compare-and-set): by rank 0 after looking for every
        rank's monitor, or by a rank that waited in vain for rank 0; every rank acts on it alike.
        """
        store, prefix, self._store = self._store, self._prefix, None
        key = f"{prefix}verdict"
        try:
            if self._rank == 0:
                marks = [f"{prefix}rank{r}" for r in range(self.world)]
                try:  # ranks that train in step started their monitors long before this first log
                    store.wait(marks, timedelta(seconds=RANK_WAIT_S))
                    tags = [store.get(m).decode().rpartition("@") for m in marks]
                    other = [r for r, (tag, _, _) in enumerate(tags) if tag != self._tag]
                    cuda = any(device == "cuda" for _, _, device in tags)
                    mine = f"ranks {other} have another monitor" if other else ("ok+agree" if cuda else "ok")
                except Exception:  # timed out: some ranks built no monitor
                    mine = "ranks " + ", ".join(str(r) for r, m in enumerate(marks) if not store.check([m]))
                verdict = store.compare_set(key, "", mine).decode()
                store.set(f"{prefix}decided", "1")  # wakes waiters on every store (compare_set may not)
            else:
                try:
                    store.wait([f"{prefix}decided"], timedelta(seconds=VERDICT_WAIT_S))
                    verdict = store.get(key).decode()
                except Exception:  # rank 0 has no monitor, or is far behind: reduce nothing
                    late = f"rank {self._rank} waited {VERDICT_WAIT_S:.0f} s for rank 0"
                    verdict = store.compare_set(key, "", late).decode()
        except Exception as exc:  # no verdict: never enter a collective the others may not join
            self._faults.fault("distributed", exc, "this rank reports its own figures")
            verdict = "no verdict"
        if verdict in ("ok", "ok+agree"):
            self._agree = verdict == "ok+agree"
            self._connect()
            return
        self._faults.report(
            "ranks",
            "mfumon: not every rank has a monitor (%s), so no figures are reduced across ranks (that "
            "would wait forever): rank %d reports its own. Build the monitor on every rank (only rank 0 "
            "logs).",
            verdict,
            self._rank,
        )
        self.world = 1

    def _launch(self, row: list[float], step: int, ops: tuple[str, ...], *, async_op: bool) -> _Flight:
        """Start the all_gather of every rank's `row` (same length on every rank)."""
        local = torch.tensor(row, dtype=torch.float64, device=self._device)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        work = torch.distributed.all_gather(gathered, local, group=self._group, async_op=async_op)
        return _Flight(step, work, gathered, ops, len(row) - 1 - 2 * _WIDTH)

    def _combine(self, flight: _Flight) -> Reduced:
        """The global figures of a finished exchange."""
        if flight.work is not None:
            flight.work.wait()  # pipelined: started a log ago, so normally done already
        # Under gloo these are CPU tensors already; with a device group this waits, once per log.
        table = torch.stack(flight.gathered).cpu()  # (ranks, row); host sync: once per log interval
        rows = table[:, : 1 + 2 * _WIDTH].tolist()  # host tensor, no sync: the windows, a few values a rank
        self._agreed = int(min(r[0] for r in rows))
        measured = [Window(*r[1 + _WIDTH :]) for r in rows]
        return Reduced(
            combine_ranks([Window(*r[1 : 1 + _WIDTH]) for r in rows], self.world),
            combine_ranks(measured, self.world),
            combine_table(flight.ops, table[:, 1 + 2 * _WIDTH :]),
            rank_view(measured),
        )

    def _land(self) -> None:
        """Pipelined: finish the exchange in flight; its figures wait in `_landed`."""
        flight, self._flight = self._flight, None
        if flight is None:
            return
        self._agreed = None
        try:
            self._landed.append((flight.step, self._combine(flight)))
        except Exception as exc:
            self._faults.fault("distributed", exc)
            self._landed.append((flight.step, _empty(flight.stats)))

    @property
    def rank(self) -> int:
        """This process's rank (0 when not distributed)."""
        return self._rank

    def agree(self, finished: int) -> int | None:
        """The smallest `finished` step over all ranks (every rank calls it); None when there is
        nothing to agree on (one rank, or no rank times on CUDA: every marked step is finished)
        and after a fault. Pipelined, after the first log, it is the smallest carried by the
        previous log's exchange (no round of its own: those steps are finished everywhere)."""
        if self._store is not None:
            self._decide()
        if self.world == 1 or not self._agree:
            return None
        self._finished = finished
        if self._flight is not None:
            self._land()
            return self._agreed
        try:
            local = torch.tensor([float(finished)], dtype=torch.float64, device=self._device)
            gathered = [torch.empty_like(local) for _ in range(self.world)]
            torch.distributed.all_gather(gathered, local, group=self._group)
            return int(min(g.item() for g in gathered))  # host sync: once per log interval
        except Exception as exc:
            self._faults.fault("distributed", exc)
            return None

    def reduce(
        self,
        warm: Window,
        meas: Window,
        stats: list[float] | None = None,
        ops: tuple[str, ...] = (),
        *,
        step: int = 0,
        final: bool = False,
    ) -> list[tuple[int, Reduced, bool]]:
        """Global figures, each as (its log's step, figures, whether it is this log's), in order.

        Figures: warm-up and measured windows (tokens and FLOPs summed, time of the slowest rank),
        the ledger's `stats` combined over ranks by `ops` (see `mfumon.ledger`), and the per-rank
        view of the measured windows; one all_gather. Synchronous: this log's alone. Pipelined
        (`pipelined`): the exchange started at the previous log, if any, and this one is started,
        to be read at the next log; at `final` (close) this one's follows, synchronously.
        """
        stats = list(stats or ())
        if self._store is not None:
            self._decide()
        if self.world == 1:
            return [(step, Reduced(warm, meas, stats, None), True)]
        self._land()
        out: list[tuple[int, Reduced, bool]] = [(s, r, False) for s, r in self._landed]
        self._landed = []
        row = [float(self._finished)] + _fields(warm) + _fields(meas) + stats
        try:
            flight = self._launch(row, step, ops, async_op=self.pipelined and not final)
            if self.pipelined and not final:
                self._flight = flight
                return out
            return [*out, (step, self._combine(flight), True)]
        except Exception as exc:
            self._faults.fault("distributed", exc)
            return [*out, (step, _empty(len(stats)), True)]


class _Flight(NamedTuple):
    """An exchange started, not yet read."""

    step: int
    work: Any  # the async handle (None: finished already)
    gathered: list[torch.Tensor]
    ops: tuple[str, ...]
    stats: int  # how many ledger values each row carries


WINDOW_FIELDS = tuple(f.name for f in dataclasses.fields(Window))
_WIDTH = len(WINDOW_FIELDS)


def _empty(stats: int) -> Reduced:
    return Reduced(EMPTY_WINDOW, EMPTY_WINDOW, [math.nan] * stats, None)


def combine_table(ops: tuple[str, ...], table: torch.Tensor) -> list[float]:
    """`combine_stats` over a (ranks, values) float64 tensor, column by column, in torch: the
    ledger's values never become Python floats per rank (at 10,000 ranks x 4,096 values that
    alone takes seconds). Same figures, except that a sum over 3+ ranks is torch's float64 sum,
    not `math.fsum`'s exactly rounded one (a few ulps apart; bit for bit with 2 ranks)."""
    if table.shape[1] == 0:
        return []
    missing = torch.isnan(table)
    kind = _kinds(ops)
    out = torch.where(
        kind == 0,
        table.masked_fill(missing, 0.0).sum(0),
        torch.where(
            kind == 1,
            table.masked_fill(missing, -math.inf).amax(0),
            table.masked_fill(missing, math.inf).amin(0),
        ),
    )
    return out.masked_fill(missing.all(0), math.nan).tolist()  # a host tensor: no sync


@functools.lru_cache(maxsize=8)
def _kinds(ops: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([OPS.index(op) for op in ops])  # 0 sum, 1 max, 2 min: one layout per run


def _fields(w: Window) -> list[float]:
    return [float(getattr(w, name)) for name in WINDOW_FIELDS]
