"""`mfumon report`: one run file -> one self-contained HTML page (facts, summary, charts, waterfall).

What goes on the page is decided here; how it is drawn lives in `mfumon.report_html`. Nothing is
estimated: a section the run has no data for says so, and the MFU waterfall shows only drops the
run measured, with the rest labelled as not explained by any measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfumon import metrics as K
from mfumon import report_html
from mfumon.errors import MfumonError
from mfumon.runlog import PREFIX, RunLog, is_number, read_run
from mfumon.wholerun import whole_run_values

__all__ = [
    "CHARTS",
    "LEDGER_KEYS",
    "MAX_POINTS",
    "Drop",
    "ReportError",
    "build",
    "decimate",
    "report",
    "waterfall",
    "write_report",
]

MAX_POINTS = 2000  # per series, embedded and drawn; first, last, and each bucket's min and max kept

CHARTS = (  # (title, keys drawn together)
    ("MFU", (K.MFU, K.MFU_MEASURED, K.MFU_AVG)),
    ("TFLOP/s per device", (K.TFLOPS_PER_DEVICE, K.HW_TFLOPS_PER_DEVICE)),
    ("tokens/s (all devices)", (K.TOKENS_PER_S,)),
    ("step time, ms", (K.STEP_TIME_MS,)),
    ("time ledger: goodput and input wait", (PREFIX + "goodput", PREFIX + "input_wait_frac")),
    (
        "step time of the slowest and the fastest rank, ms",
        (PREFIX + "step_time_max_ms", PREFIX + "step_time_min_ms"),
    ),
)

#: The time ledger (DESIGN.md, "Where the time goes"); shown for those the run logged.
LEDGER_KEYS = tuple(
    PREFIX + k
    for k in (
        "goodput",
        "mfu_wall",
        "input_wait_frac",
        "step_time_max_ms",
        "step_time_min_ms",
        "slowest_rank",
        "sm_clock_mhz",
        "power_w",
        "joules_per_token",
        "mem_peak_gib",
        "expert_load_max",
    )
)

FACTS = (  # (run fact, label)
    ("device", "device"),
    ("peak_tflops", "peak TFLOP/s per device (the MFU denominator)"),
    ("peak_dtype", "peak dtype"),
    ("peak_mix", "peak mix (dtype: share of model FLOPs)"),
    ("peak_weighted", "peak weighted by the mix"),
    ("peak_source", "peak source"),
    ("measured_peak_tflops", "measured GEMM ceiling, TFLOP/s"),
    ("world_size", "devices (world size)"),
    ("seq_len", "sequence length"),
    ("flops_per_token", "model FLOPs per token (training)"),
    ("hw_flops_per_token", "hardware FLOPs per token (with recompute)"),
    ("params_total", "parameters, total"),
    ("params_active", "parameters, active per token"),
    ("params_trainable", "parameters, trainable"),
    ("warmup", "warm-up steps (not measured)"),
    ("log_every", "steps per logged window"),
    ("initial_step", "initial step (resumed from)"),
)


Series = dict[str, tuple[list[int], list[float]]]  # key -> (steps, values), every window


class ReportError(MfumonError):
    """The report cannot be written (e.g. the output path is not writable). The message is one line."""


@dataclass(frozen=True)
class Drop:
    """One bar of the MFU waterfall: `points` of the peak (a fraction) lost to `name`."""

    name: str
    points: float  # fraction of the peak, e.g. 0.12 for 12 points of MFU
    measured_by: str  # which logged value gave it


def report(path: str | Path, output: str | Path) -> Path:
    """Write the run file at `path` as one self-contained HTML page at `output`; returns `output`.

    RunLogError for a missing, empty or foreign run file; ReportError when `output` cannot be written.
    """
    return write_report(read_run(path), output)


def write_report(run: RunLog, output: str | Path) -> Path:
    """Write the page of a run already read; ReportError when `output` cannot be written."""
    page = report_html.page(build(run))
    output = Path(output)
    try:
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        why = f"{type(exc).__name__}: {exc.strerror or exc}"
        raise ReportError(f"{output}: cannot be written ({why})") from None
    return output


def build(run: RunLog) -> dict[str, Any]:
    """Everything the page shows, as plain data (also embedded in the page as JSON)."""
    full = run.columns()
    series: dict[str, dict[str, list[float]]] = {}
    decimated = False
    for key, (steps, values) in full.items():
        small_steps, small_values = decimate(steps, values, MAX_POINTS)
        decimated |= len(small_steps) < len(steps)
        series[key] = {"steps": small_steps, "values": small_values}
    windows = _windows(run)
    summary, summary_source = _summary(run, windows)
    profiled = next((r for r in reversed(run.records) if isinstance(r.get("profile"), dict)), None)
    profile = profiled["profile"] if profiled else None
    profile_step = profiled["step"] if profiled else None
    return {
        "label": run.label,
        "path": str(run.path),
        "windows": windows,
        "first_step": run.records[0]["step"],
        "last_step": run.records[-1]["step"],
        "notes": list(run.notes),
        "facts": [(label, run.run[key]) for key, label in FACTS if run.run.get(key) not in (None, {}, "")],
        "flops_by_component": dict(run.run.get("flops_by_component") or {}),
        "summary": summary,
        "summary_source": summary_source,
        "series": series,
        "decimated": decimated,
        "max_points": MAX_POINTS,
        "charts": [(title, [k for k in keys if k in series]) for title, keys in CHARTS],
        "ledger": {k: v for k in LEDGER_KEYS if (v := _whole_run(summary, k)) is not None},
        "profile": profile,
        "profile_step": profile_step,
        "waterfall": waterfall(run, full, summary, profile),
    }


def decimate(steps: list[int], values: list[float], limit: int) -> tuple[list[int], list[float]]:
    """At most about `limit` points: the first, the last, and each bucket's min and max, in step order."""
    n = len(steps)
    if n <= limit:
        return list(steps), list(values)
    buckets = max(1, (limit - 2) // 2)
    keep = {0, n - 1}
    for b in range(buckets):
        lo, hi = b * n // buckets, (b + 1) * n // buckets
        if hi <= lo:
            continue
        chunk = values[lo:hi]
        keep.add(lo + chunk.index(min(chunk)))
        keep.add(lo + chunk.index(max(chunk)))
    order = sorted(keep)
    return [steps[i] for i in order], [values[i] for i in order]


def _summary(run: RunLog, windows: int) -> tuple[dict[str, Any], str]:
    """The whole-run values (`mfumon.wholerun`, as `compare` reads them) with the summary's facts."""
    values, source = whole_run_values(run)
    if source == "summary.json":
        name = run.path.with_suffix(".summary.json").name
        return {**dict(run.summary or {}), **values}, f"{name}, written when the run closed"
    out: dict[str, Any] = dict(values)
    if K.MFU_AVG in values:  # the last window's running whole-run MFU
        out[K.MFU] = values[K.MFU_AVG]
    out["windows"] = windows
    out["last_step"] = run.records[-1]["step"]
    return out, (
        f"computed from {source}: each window weighted by its time (goodput and MFU over wall time "
        "by wall time, peaks the largest); MFU is the last window's mfu_avg (the whole run so far)"
    )


def _windows(run: RunLog) -> int:
    """Lines with a metric (a profile record is no window)."""
    return sum(1 for r in run.records if "profile" not in r or any(k.startswith(PREFIX) for k in r))


def _whole_run(summary: dict[str, Any], key: str) -> float | None:
    """The whole-run value of `key` (from `_summary`: the summary's, else the windows' added up)."""
    value = summary.get(key)
    return float(value) if is_number(value) else None


def _peak(run: RunLog, full: Series) -> float | None:
    peak = run.run.get("peak_tflops")
    if is_number(peak) and peak > 0:
        return float(peak)
    return full[K.PEAK_TFLOPS][1][-1] if K.PEAK_TFLOPS in full else None


def waterfall(
    run: RunLog, full: Series, summary: dict[str, Any], profile: dict[str, Any] | None
) -> dict[str, Any]:
    """The MFU waterfall: 100% of the peak, each measured drop, the unexplained rest, the achieved MFU.

    Each cause is a fraction of the time (or of the peak, for the ceiling) and removes that share of
    what is left, so the drops compose: level x (1 - f). What the measurements do not reach is the
    remainder down to the achieved MFU; when they reach below it (overlapping measurements) the
    remainder is negative and says so. Without a peak there is no MFU and no waterfall.
    """
    peak = _peak(run, full)
    achieved = _whole_run(summary, K.MFU)
    if peak is None or achieved is None:
        return {"absent": "no peak known for this run, so no MFU to break down"}
    causes: list[tuple[str, float, str]] = []  # (name, fraction of what is left, measured by)
    measured = run.run.get("measured_peak_tflops")
    notes = []
    if is_number(measured) and measured >= peak:
        notes.append(f"the measured GEMM ceiling ({measured:.4g} TFLOP/s) is not below the peak: no drop")
    if is_number(measured) and 0 < measured < peak:
        by = f"measured_peak_tflops {measured:.4g}"
        causes.append(("GEMM ceiling (measured)", 1 - measured / peak, by))
    for name, frac in _profile_losses(profile):
        causes.append((f"{name}: time lost (step profile)", frac, "latest step profile"))
    wait = _whole_run(summary, PREFIX + "input_wait_frac")
    if wait is not None:
        causes.append(("input wait", wait, "mfumon/input_wait_frac"))
    slow, fast = (_whole_run(summary, PREFIX + k) for k in ("step_time_max_ms", "step_time_min_ms"))
    if slow and fast is not None and slow > 0:
        causes.append(("slowest rank's lead", 1 - fast / slow, "step_time_min_ms / step_time_max_ms"))
    end_name = "achieved MFU"
    goodput = _whole_run(summary, PREFIX + "goodput")
    if goodput is not None:
        causes.append(("paused time and gaps (1 - goodput)", 1 - goodput, "mfumon/goodput"))
        wall = _whole_run(summary, PREFIX + "mfu_wall")
        achieved, end_name = (wall if wall is not None else achieved * goodput), "achieved MFU over wall time"
    level, drops = 1.0, []
    for name, frac, by in causes:
        points = level * min(max(frac, 0.0), 1.0)
        drops.append(Drop(name, points, by))
        level -= points
    rest = level - achieved
    rest_name = "not explained by any measurement"
    if rest < 0:
        rest_name = "measured causes overlap (they explain more than the gap)"
    return {
        "peak_tflops": peak,
        "achieved": achieved,
        "achieved_name": end_name,
        "drops": [d.__dict__ for d in drops],
        "unexplained": {"name": rest_name, "points": rest},
        "notes": notes,
    }


def _profile_losses(profile: dict[str, Any] | None) -> list[tuple[str, float]]:
    """(component, share of the profiled step's time lost) for rows that carry a time lost."""
    if not profile:
        return []
    rows = [r for r in profile.get("rows", []) if isinstance(r, dict)]
    total = profile.get("seconds")
    if not is_number(total) or total <= 0:
        total = sum(float(r.get("seconds", 0.0)) for r in rows if is_number(r.get("seconds")))
    out = []
    for row in rows:
        lost = row.get("time_lost")
        if is_number(lost) and lost > 0 and total > 0:
            out.append((str(row.get("name", "?")), lost / total))
    return out
