"""Two runs side by side, whole-run values and relative changes, for `mfumon compare` (a CI gate).

A run's whole-run values come from its `<stem>.summary.json` when the run closed, else from the
windows of its latest run, added up as `mfumon.wholerun` says (the same values `report` shows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfumon import metrics as K
from mfumon.errors import ConfigError, MfumonError
from mfumon.runlog import PREFIX, RunLog, read_run
from mfumon.wholerun import whole_run_values

__all__ = [
    "GOODPUT",
    "METRICS",
    "Comparison",
    "Metric",
    "Row",
    "WholeRun",
    "compare",
    "format_change",
    "format_value",
    "metric_name",
    "parse_tolerance",
    "whole_run",
]

GOODPUT = K.GOODPUT  # shown as "-" for a run from before the time ledger


@dataclass(frozen=True)
class Metric:
    """One compared quantity: its key, how it is shown, and which way is better."""

    key: str
    label: str
    higher_is_better: bool


#: The compared quantities, by the name `--metric` takes (also accepted: the full `mfumon/...` key).
METRICS: dict[str, Metric] = {
    "mfu_avg": Metric(K.MFU_AVG, "MFU", True),
    "tflops_per_device": Metric(K.TFLOPS_PER_DEVICE, "TFLOP/s per device", True),
    "tokens_per_s": Metric(K.TOKENS_PER_S, "tokens/s", True),
    "step_time_ms": Metric(K.STEP_TIME_MS, "step time (ms)", False),
    "goodput": Metric(GOODPUT, "goodput", True),
}
ALIASES = {"mfu": "mfu_avg"}  # the whole-run MFU is mfu_avg; a window's mfu is not a whole-run value


@dataclass(frozen=True)
class WholeRun:
    """A run's whole-run values (metric key -> value; None where the run lacks it) and their source."""

    run: RunLog
    values: dict[str, float | None]
    source: str  # "summary.json" or "N windows (no summary.json: ...)"


@dataclass(frozen=True)
class Row:
    """One quantity of both runs; `change` is (new - base) / base, None when either lacks it."""

    name: str  # the METRICS name, e.g. "tokens_per_s"
    label: str
    base: float | None
    new: float | None
    change: float | None
    higher_is_better: bool
    gated: bool  # the gate's metric


@dataclass
class Comparison:
    """Two runs compared; `regressed` is True when NEW is worse than BASE by more than `tolerance`."""

    base: WholeRun
    new: WholeRun
    rows: list[Row]
    metric: str  # the METRICS name the gate used (tokens_per_s where a run has no peak)
    tolerance: float
    regressed: bool
    warnings: list[str] = field(default_factory=list)  # across hardware, fallback to tokens/s

    @property
    def gate(self) -> Row:
        """The row the gate decided on."""
        return next(row for row in self.rows if row.gated)


def parse_tolerance(text: str | float) -> float:
    """A tolerance as a fraction: 0.03 or "0.03" or "3%"; ConfigError (one line) otherwise."""
    raw = text
    try:
        if isinstance(text, str):
            text = text.strip()
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        elif isinstance(text, (int, float)) and not isinstance(text, bool):
            value = float(text)
        else:
            raise ValueError
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(
            f"--tolerance must be a fraction >= 0 such as 0.03 (or 3%), got {raw!r}: "
            "the largest relative loss that still passes"
        )
    return value


def metric_name(metric: str) -> str:
    """The METRICS name for `metric` (a name, an alias or the full key); ConfigError otherwise."""
    name = metric.removeprefix(PREFIX)
    name = ALIASES.get(name, name)
    if name not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return name


def whole_run(run: RunLog) -> WholeRun:
    """The run's whole-run values: from summary.json when present, else added up from its windows."""
    values, source = whole_run_values(run)
    return WholeRun(run, {m.key: values.get(m.key) for m in METRICS.values()}, source)


def compare(
    base: str | Path | RunLog, new: str | Path | RunLog, *, tolerance: float = 0.03, metric: str = "mfu_avg"
) -> Comparison:
    """Compare NEW against BASE on whole-run values; `.regressed` when NEW is worse by more than `tolerance`.

    The gate uses `metric` (a METRICS name); where either run has no peak (no MFU), it uses
    tokens/s and says so in `.warnings`. Raises MfumonError (one line) when a file cannot be read
    or the runs share no metric.
    """
    tolerance = parse_tolerance(tolerance)
    name = metric_name(metric)
    sides = [whole_run(r if isinstance(r, RunLog) else read_run(r)) for r in (base, new)]
    warnings = _hardware_warnings(sides[0].run, sides[1].run)
    common = [m for m, d in METRICS.items() if all(s.values[d.key] is not None for s in sides)]
    if not common:
        raise MfumonError(
            f"{sides[0].run.path} and {sides[1].run.path} have no metric in common "
            f"(compared: {', '.join(METRICS)}): nothing to compare"
        )
    if name == "mfu_avg" and name not in common:
        lacking = [str(s.run.path) for s in sides if s.values[K.MFU_AVG] is None]
        name = "tokens_per_s"
        warnings.append(f"no peak known for {' and '.join(lacking)} (no MFU): the gate compares tokens/s")
    if name not in common:
        lacking = [str(s.run.path) for s in sides if s.values[METRICS[name].key] is None]
        raise MfumonError(
            f"--metric {name}: not in {' and '.join(lacking)}; both runs have {', '.join(common)}"
        )
    rows = [_row(m, *(s.values[d.key] for s in sides), gated=m == name) for m, d in METRICS.items()]
    gate = next(row for row in rows if row.gated)
    regressed = _worse(gate) > tolerance
    return Comparison(sides[0], sides[1], rows, name, tolerance, regressed, warnings)


def _row(name: str, base: float | None, new: float | None, *, gated: bool) -> Row:
    metric = METRICS[name]
    change = (new - base) / base if base is not None and new is not None and base != 0 else None
    return Row(name, metric.label, base, new, change, metric.higher_is_better, gated)


def _worse(row: Row) -> float:
    """How much worse NEW is, as a positive fraction (negative when better); 0 when unknown."""
    if row.change is None:
        return 0.0
    return -row.change if row.higher_is_better else row.change


def _hardware_warnings(base: RunLog, new: RunLog) -> list[str]:
    """One line when the runs differ in device, world size or peak dtype, one when in FLOPs per token."""
    out = []
    differ = [
        f"{what} {a!r} vs {b!r}"
        for what in ("device", "world_size", "peak_dtype")
        if (a := _fact(base, what)) is not None and (b := _fact(new, what)) is not None and a != b
    ]
    if differ:
        out.append(f"the runs differ in {'; '.join(differ)}: a comparison across hardware")
    a, b = _fact(base, "flops_per_token"), _fact(new, "flops_per_token")
    if a is not None and b is not None and a != b:
        out.append(
            f"the runs differ in FLOPs per token ({a:,} vs {b:,}): "
            f"tokens/s and step time measure different work"
        )
    return out


def _fact(run: RunLog, name: str) -> Any:
    """A run fact from the first line's "run", else the summary, else the first window."""
    for source in (run.run, run.summary or {}, run.records[0]):
        if source.get(name) is not None:
            return source[name]
    return None


def format_value(name: str, value: float | None) -> str:
    """A METRICS value as people read it: MFU and goodput in %, rates with separators; "-" when None."""
    if value is None:
        return "-"
    if name in ("mfu_avg", "mfu", "goodput"):
        return f"{value * 100:.2f}%" if abs(value) >= 0.001 else f"{value * 100:.3g}%"  # 41.20%, 0.00524%
    if name == "tokens_per_s":
        return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"


def format_change(change: float | None) -> str:
    """A relative change as a signed percentage, "-" when unknown."""
    return "-" if change is None else f"{change * 100:+.2f}%"
