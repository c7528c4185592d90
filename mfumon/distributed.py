"""Ranks: which one this process is, and the once-per-log reduction of windows across them.

Every collective here runs once per log interval (or once per run), never per step, and over a
gloo group where the job's backend is another, so it never queues behind GPU work.
"""

from __future__ import annotations

import dataclasses
import math
import os
from datetime import timedelta
from typing import Any

import torch

from mfumon.errors import FaultLog
from mfumon.ledger import combine_stats
from mfumon.metrics import EMPTY_WINDOW, Window, combine_ranks

__all__ = ["Reducer", "all_ranks_agree", "initialized", "rank_world"]

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


class Reducer:
    """Combines every rank's windows into global ones, once per log; faults go to `faults`.

    Ranks reduce together only when every rank has a monitor. Each rank says so in the job's
    key-value store when it starts (no collective); at the first log, rank 0 looks for all of
    them and writes the verdict, which the other ranks read. A monitor on rank 0 alone (the
    `master_process` pattern) or a rank whose setup failed thus never waits in a collective that
    the others would never join: it says so once and reports its own figures.
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
            try:
                store = dist.distributed_c10d._get_default_store()
                seq = store.add(f"mfumon/monitors/rank{self._rank}", 1)  # this rank's n-th monitor
                self._prefix = f"mfumon/{seq}/"
                store.set(f"{self._prefix}rank{self._rank}", tag or "-")
                self._tag = tag or "-"
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
                    other = [r for r, m in enumerate(marks) if store.get(m).decode() != self._tag]
                    mine = f"ranks {other} have another monitor" if other else "ok"
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
        if verdict == "ok":
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

    def _gather(self, values: list[list[float]]) -> list[list[list[float]]]:
        """All ranks' `values` (same shape on every rank), over the reduction group."""
        local = torch.tensor(values, dtype=torch.float64, device=self._device)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, local, group=self._group)
        # Under gloo these are CPU tensors already; with a device group this waits, once per log.
        return [g.cpu().tolist() for g in gathered]  # host sync: once per log interval

    def agree(self, finished: int) -> int | None:
        """The smallest `finished` step over all ranks (every rank calls it); None after a fault."""
        if self._store is not None:
            self._decide()
        if self.world == 1:
            return None
        try:
            return int(min(row[0][0] for row in self._gather([[float(finished)]])))
        except Exception as exc:
            self._faults.fault("distributed", exc)
            return None

    def reduce(
        self, warm: Window, meas: Window, stats: list[float] | None = None, ops: tuple[str, ...] = ()
    ) -> tuple[Window, Window, list[float]]:
        """Global warm-up and measured windows (tokens and FLOPs summed, time of the slowest rank)
        and the ledger's `stats` combined over ranks by `ops` (see `mfumon.ledger`)."""
        stats = list(stats or ())
        if self._store is not None:
            self._decide()
        if self.world == 1:
            return warm, meas, stats
        try:
            width = len(_fields(warm))
            rows = [r[0] for r in self._gather([_fields(warm) + _fields(meas) + stats])]
            return (
                combine_ranks([Window(*r[:width]) for r in rows], self.world),
                combine_ranks([Window(*r[width : 2 * width]) for r in rows], self.world),
                combine_stats(ops, [r[2 * width :] for r in rows]),
            )
        except Exception as exc:
            self._faults.fault("distributed", exc)
            return EMPTY_WINDOW, EMPTY_WINDOW, [math.nan] * len(stats)


def _fields(w: Window) -> list[float]:
    return [float(v) for v in dataclasses.astuple(w)]
