"""A run's whole-run values from its file, the one way `report` and `compare` both add windows up.

From `<stem>.summary.json` where the run closed (and the summary is not an earlier run's), else
added up from the windows of the file's latest run, each key by what it measures:
- rates and fractions of step time (MFU, TFLOP/s, tokens/s, input wait): weighted by each window's
  time in steps (steps since the previous window x its mean step time), as the monitor's own
  summary adds them; per-step times (`*_ms`): weighted by steps;
- goodput: steps' time over wall time (a window's wall time is its time in steps / its goodput);
  MFU over wall time, power and SM clock: weighted by wall time;
- energy per token: weighted by tokens; peaks (memory, expert load): the largest window's;
  counts (allocator retries, OOMs): summed; ranks (slowest, largest input wait): the most frequent;
- `mfu_avg`, the peak: the last window's (they are whole-run figures already).
A key the summary lacks (the ledger's log-time sources) comes from the windows. Imports no torch.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from mfumon import metrics as K
from mfumon.runlog import PREFIX, RunLog, is_number

__all__ = ["RULES", "from_windows", "latest_run", "summary_is_stale", "whole_run_values"]

#: How windows add up, by key; any other `mfumon/*` key is weighted by the windows' time in steps.
RULES: dict[str, str] = {
    K.STEP_TIME_MS: "steps",
    K.STEP_TIME_MAX_MS: "steps",
    K.STEP_TIME_MIN_MS: "steps",
    K.GOODPUT: "goodput",
    K.MFU_WALL: "wall",
    K.POWER_W: "wall",
    K.SM_CLOCK_MHZ: "wall",
    K.JOULES_PER_TOKEN: "tokens",
    K.MEM_PEAK_GIB: "max",
    K.MEM_RESERVED_GIB: "max",
    K.EXPERT_LOAD_MAX: "max",
    K.EXPERTS_IDLE: "max",
    K.MEM_ALLOC_RETRIES: "sum",
    K.MEM_OOMS: "sum",
    K.SLOWEST_RANK: "mode",
    K.INPUT_WAIT_MAX_RANK: "mode",
    K.MFU_AVG: "last",
    K.PEAK_TFLOPS: "last",
}


def whole_run_values(run: RunLog) -> tuple[dict[str, float], str]:
    """Every `mfumon/*` key's whole-run value the run has, and where the values came from."""
    windows = latest_run(run.records)
    stale = run.summary is not None and summary_is_stale(run)
    if run.summary is not None and not stale:
        summary = {k: float(v) for k, v in run.summary.items() if k.startswith(PREFIX) and is_number(v)}
        if summary:
            return {**from_windows(run, windows), **summary}, "summary.json"
    n = sum(1 for r in windows if "profile" not in r and any(k.startswith(PREFIX) for k in r))
    why = (
        "summary.json older than the last window: a previous run's"
        if stale
        else "run still going, or it crashed"
    )
    return from_windows(run, windows), f"{n} window{'s' * (n != 1)} (no summary.json: {why})"


def summary_is_stale(run: RunLog) -> bool:
    """True when summary.json was written before the last window: left by an earlier run of that name."""
    last = run.records[-1].get("time")
    try:
        written = run.path.with_suffix(".summary.json").stat().st_mtime
    except OSError:
        return False
    return is_number(last) and written + 1.0 < float(last)  # 1 s: the clocks of file system and host


def latest_run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the file's latest run: a second run with the same name appends to the file."""
    starts = [i for i, r in enumerate(records) if isinstance(r.get("run"), dict)]
    return records[starts[-1] :] if starts else records


def from_windows(run: RunLog, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Whole-run values added up from the windows (`records`: the latest run's, by default)."""
    records = latest_run(run.records) if records is None else records
    if not records:
        return {}
    facts = records[0].get("run") if isinstance(records[0].get("run"), dict) else run.run
    previous = _int(facts.get("initial_step"), 0) + _int(facts.get("warmup"), 0)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    extremes: dict[str, float] = {}
    modes: dict[str, Counter[float]] = {}
    lasts: dict[str, float] = {}
    for record in records:
        ms, step = record.get(K.STEP_TIME_MS), record.get("step")
        if not is_number(step) or "profile" in record:
            continue  # not a window
        n, previous = step - previous, step
        if is_number(ms) and n > 0:
            seconds = n * float(ms) / 1e3
            goodput = record.get(K.GOODPUT)
            wall = seconds / goodput if is_number(goodput) and goodput > 0 else None
            tokens = record.get(K.TOKENS_PER_S)
            weight = {
                "time": seconds,
                "steps": float(n),
                "goodput": wall,
                "wall": wall if wall is not None else seconds,
                "tokens": seconds * tokens if is_number(tokens) else None,
            }
        else:  # a window without its step time (hand-written, or cut): each such window weighs alike
            seconds, weight = 1.0, dict.fromkeys(("time", "steps", "wall", "tokens"), 1.0)
            goodput = record.get(K.GOODPUT)
            weight["goodput"] = 1.0 / goodput if is_number(goodput) and goodput > 0 else None
        for key, value in record.items():
            if not key.startswith(PREFIX) or not is_number(value):
                continue
            rule = RULES.get(key, "time")
            if rule == "max":
                extremes[key] = max(extremes.get(key, -math.inf), float(value))
            elif rule == "sum":
                extremes[key] = extremes.get(key, 0.0) + float(value)
            elif rule == "mode":
                modes.setdefault(key, Counter())[float(value)] += 1
            elif rule == "last":
                lasts[key] = float(value)
            elif (w := weight[rule]) is not None:
                sums[key] = sums.get(key, 0.0) + (seconds if rule == "goodput" else float(value) * w)
                weights[key] = weights.get(key, 0.0) + w
    out = {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
    out.update(extremes)
    out.update(lasts)
    out.update({k: c.most_common(1)[0][0] for k, c in modes.items()})
    return out


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
