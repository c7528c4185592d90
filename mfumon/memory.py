"""Allocator memory at log time: the peak in the window, reserved memory, retries and OOMs.

Read from the CUDA caching allocator's own host-side counters (`torch.cuda.memory_stats`), no
device call and no sync. The peak is reset at every log (`torch.cuda.reset_peak_memory_stats`),
so each window gets its own: code that reads `torch.cuda.max_memory_allocated()` itself sees
the peak since mfumon's last log (turn `device_stats` off to keep the whole-run peak).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mfumon import metrics as K
from mfumon.errors import FaultLog
from mfumon.ledger import Field, Source
from mfumon.metrics import Window

__all__ = ["GIB", "MemorySource", "memory_source"]

GIB = float(2**30)  # bytes per GiB


class MemorySource(Source):
    """The caching allocator of one CUDA device: peak and reserved GiB, retries and OOMs per window."""

    name = "memory"
    fields = (
        Field("peak_gib", "max"),
        Field("reserved_gib", "max"),
        Field("alloc_retries", "sum"),
        Field("ooms", "sum"),
    )

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._counts = (0.0, 0.0)  # num_alloc_retries, num_ooms at the previous log
        stats = self._stats()
        if stats:  # the allocator is live: the first window counts from here
            self._counts = _counts(stats)
            torch.cuda.reset_peak_memory_stats(device)

    def _stats(self) -> dict[str, Any]:
        return torch.cuda.memory_stats_as_nested_dict(self.device)  # {} before CUDA is initialized

    def collect(self, final: bool = False) -> list[float]:
        """This rank's peak allocated GiB since the previous log (then reset), reserved GiB, counts."""
        stats = self._stats()
        if not stats:
            return [math.nan] * 4
        torch.cuda.reset_peak_memory_stats(self.device)  # host-side counters: no device call
        counts, (retries, ooms) = _counts(stats), self._counts
        self._counts = counts
        return [
            stats["allocated_bytes"]["all"]["peak"] / GIB,
            stats["reserved_bytes"]["all"]["current"] / GIB,
            counts[0] - retries,
            counts[1] - ooms,
        ]

    def metrics(
        self, values: dict[str, list[float]], window: Window, world: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """mem_peak_gib, mem_reserved_gib (max over ranks), mem_alloc_retries, mem_ooms (all ranks)."""
        return {
            K.MEM_PEAK_GIB: values["peak_gib"][0],
            K.MEM_RESERVED_GIB: values["reserved_gib"][0],
            K.MEM_ALLOC_RETRIES: values["alloc_retries"][0],
            K.MEM_OOMS: values["ooms"][0],
        }, {}


def _counts(stats: dict[str, Any]) -> tuple[float, float]:
    return float(stats.get("num_alloc_retries", 0)), float(stats.get("num_ooms", 0))


def memory_source(device: torch.device, faults: FaultLog) -> MemorySource | None:
    """The allocator source of CUDA `device`, or None (said once in `faults`) when torch cannot read it."""
    try:
        return MemorySource(device)
    except Exception as exc:
        left_out = "mem_peak_gib, mem_reserved_gib, mem_alloc_retries and mem_ooms are left out"
        faults.fault("memory", exc, left_out)
        return None
