"""Ranks: which one this process is, and the once-per-log reduction of windows across them.

Every collective here runs once per log interval (or once per run), never per step, and over a
gloo group where the job's backend is another, so it never queues behind GPU work.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mfumon.errors import FaultLog
from mfumon.metrics import EMPTY_WINDOW, Window, combine_ranks

__all__ = ["Reducer", "all_ranks_agree", "initialized", "rank_world"]


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
    """Combines every rank's windows into global ones, once per log; faults go to `faults`."""

    def __init__(self, faults: FaultLog) -> None:
        self.world = 1
        self._faults = faults
        self._group: Any = None
        self._device = torch.device("cpu")

    def join(self, device: torch.device) -> int | None:
        """Join the initialized process group (collective: every rank calls it); returns the rank."""
        if not initialized():
            return None
        dist = torch.distributed
        self.world = dist.get_world_size()
        if dist.get_backend() != "gloo":
            try:
                self._group = dist.new_group(backend="gloo")
            except Exception as exc:  # no gloo: reduce over the default group on the device instead
                self._faults.fault("gloo_group", exc)
                self._device = device
        return dist.get_rank()

    def _gather(self, values: list[list[float]]) -> list[list[list[float]]]:
        """All ranks' `values` (same shape on every rank), over the reduction group."""
        local = torch.tensor(values, dtype=torch.float64, device=self._device)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, local, group=self._group)
        # Under gloo these are CPU tensors already; with a device group this waits, once per log.
        return [g.cpu().tolist() for g in gathered]  # host sync: once per log interval

    def agree(self, finished: int) -> int | None:
        """The smallest `finished` step over all ranks (every rank calls it); None after a fault."""
        try:
            return int(min(row[0][0] for row in self._gather([[float(finished)]])))
        except Exception as exc:
            self._faults.fault("distributed", exc)
            return None

    def reduce(self, warm: Window, meas: Window) -> tuple[Window, Window]:
        """Global warm-up and measured windows: tokens and FLOPs summed, time of the slowest rank."""
        if self.world == 1:
            return warm, meas
        try:
            rows = self._gather([_fields(warm), _fields(meas)])
            return (
                combine_ranks([Window(*r[0]) for r in rows], self.world),
                combine_ranks([Window(*r[1]) for r in rows], self.world),
            )
        except Exception as exc:
            self._faults.fault("distributed", exc)
            return EMPTY_WINDOW, EMPTY_WINDOW


def _fields(w: Window) -> list[float]:
    return [float(w.steps), w.tokens, w.model_flops, w.hardware_flops, w.seconds]
