"""Log-time sources of the ledger: figures beside the step windows that the step clock cannot see.

A `Source` (device health from NVML, allocator memory, MoE expert load) declares at setup a fixed
layout of values (`fields`: name, cross-rank op, length). At every log, on every rank,
`collect()` returns this rank's values in that layout, NaN where it measured nothing; the
reducer combines them across ranks with the windows, in the same once-per-log exchange, by
each field's op; `metrics()` turns the combined values into metric keys (every logger) and
details (JSONL only). The layout never changes after setup, so every rank's vectors line up,
also after one source failed on one rank (its values turn NaN, its slots stay).

Ops: "sum" (over the ranks that measured it), "max", "min"; NaN stays NaN only when no rank
measured the value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from mfumon.errors import FaultLog
    from mfumon.metrics import Window

__all__ = ["OPS", "Field", "Ledger", "Source", "combine_stats"]

OPS = ("sum", "max", "min")


class Field(NamedTuple):
    """One named run of values in a source's layout, combined across ranks by `op`."""

    name: str
    op: str  # one of OPS
    size: int = 1


class Source:
    """Base of the ledger's log-time sources; subclasses set `name` and `fields`."""

    name = "source"
    fields: tuple[Field, ...] = ()

    def collect(self, final: bool = False) -> list[float]:
        """This rank's values in `fields` order (NaN: not measured); called at every log, every rank.

        `final`: the last log (close): a source may wait for the device then, never before.
        """
        raise NotImplementedError

    def metrics(
        self, values: dict[str, list[float]], window: Window, world: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Metric keys and JSONL-only details from the values combined over ranks (by field name).

        `window` is the measured window just reduced (global steps, tokens, seconds), `world` the
        number of ranks whose values were combined.
        """
        return {}, {}

    def start(self) -> None:
        """Start sampling (the monitor's start()); most sources need nothing."""

    def close(self) -> None:
        """Remove hooks, stop threads (idempotent)."""


def combine_stats(ops: Sequence[str], rows: Sequence[Sequence[float]]) -> list[float]:
    """Each column of `rows` (one row per rank) combined by its op, NaN treated as not measured."""
    out = []
    for j, op in enumerate(ops):
        present = [row[j] for row in rows if not math.isnan(row[j])]
        if not present:
            out.append(math.nan)
        elif op == "sum":
            out.append(math.fsum(present))
        elif op == "max":
            out.append(max(present))
        else:
            out.append(min(present))
    return out


class Ledger:
    """The monitor's sources, laid out as one flat vector; a failing source turns NaN, never raises."""

    def __init__(self, sources: Sequence[Source], faults: FaultLog) -> None:
        self.sources = list(sources)
        self._faults = faults
        self._off: set[int] = set()
        self.ops: tuple[str, ...] = tuple(f.op for s in self.sources for f in s.fields for _ in range(f.size))
        for s in self.sources:
            for f in s.fields:
                if f.op not in OPS or f.size < 0:
                    raise ValueError(f"{s.name}: field {f.name!r} has op {f.op!r}, size {f.size}")

    @property
    def layout(self) -> str:
        """The layout as text: ranks whose layouts differ reduce nothing together."""
        return ";".join(
            f"{s.name}:" + ",".join(f"{f.name}/{f.op}/{f.size}" for f in s.fields) for s in self.sources
        )

    def collect(self, final: bool = False) -> list[float]:
        """Every source's values for this rank, NaN for a source that is off or fails now."""
        out: list[float] = []
        for i, source in enumerate(self.sources):
            size = sum(f.size for f in source.fields)
            values: list[float] = [math.nan] * size
            if i not in self._off:
                try:
                    got = [float(v) for v in source.collect(final=final)]
                    if len(got) != size:
                        raise ValueError(f"{source.name} gave {len(got)} values, its layout has {size}")
                    values = got
                except Exception as exc:  # e.g. NVML failing mid-run: its keys disappear, once said
                    self._off.add(i)
                    self._faults.fault(source.name, exc, "its keys are left out from here on")
            out.extend(values)
        return out

    def metrics(
        self, combined: Sequence[float], window: Window, world: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Metric keys and details of every source from the combined vector (a failing source adds none)."""
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        at = 0
        for i, source in enumerate(self.sources):
            values: dict[str, list[float]] = {}
            for f in source.fields:
                values[f.name] = list(combined[at : at + f.size])
                at += f.size
            if i in self._off and all(math.isnan(v) for vs in values.values() for v in vs):
                continue
            try:
                m, d = source.metrics(values, window, world)
            except Exception as exc:
                self._off.add(i)
                self._faults.fault(source.name, exc, "its keys are left out from here on")
                continue
            metrics.update({k: v for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(v)})
            details.update(d)
        return metrics, details

    def start(self) -> None:
        """Start every source; a failure is reported once and that source turns NaN."""
        for i, source in enumerate(self.sources):
            try:
                source.start()
            except Exception as exc:
                self._off.add(i)
                self._faults.fault(source.name, exc, "its keys are left out from here on")

    def close(self) -> None:
        """Close every source; a failure is reported, never raised."""
        for source in self.sources:
            try:
                source.close()
            except Exception as exc:
                self._faults.fault(source.name, exc)
