"""Charts of runs over optimizer steps, from the JSONL files the monitor writes (`mfumon plot`).

matplotlib (the `plot` extra) is imported only when a chart is drawn, so `import mfumon` never
imports it. Figures are drawn on matplotlib's Agg canvas, not through pyplot: no display is
needed, and the caller's pyplot backend and figure list are left alone.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mfumon import metrics as K
from mfumon.errors import ConfigError, MissingDependencyError
from mfumon.runlog import PREFIX, RunLog, is_number, read_run

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_METRICS",
    "choose_metrics",
    "decimate",
    "draw",
    "line_data",
    "load_runs",
    "paused_spans",
    "plot",
    "save",
    "series_array",
    "step_array",
    "title_line",
]

log = logging.getLogger("mfumon")

#: Drawn by default, those of them that the runs logged.
DEFAULT_METRICS = (K.MFU, K.TFLOPS_PER_DEVICE, K.TOKENS_PER_S, K.STEP_TIME_MS)
#: Fractions in [0, 1], drawn in percent (the last three are the time ledger's, where a run has it).
PERCENT = {K.MFU, K.HFU, K.MFU_AVG, K.MFU_MEASURED}
PERCENT |= {K.GOODPUT, K.MFU_WALL, K.INPUT_WAIT_FRAC}
AXIS_LABELS = {
    K.MFU: "MFU (%)",
    K.HFU: "HFU (%)",
    K.MFU_AVG: "run MFU so far (%)",
    K.MFU_MEASURED: "MFU vs measured (%)",
    K.TFLOPS_PER_DEVICE: "TFLOP/s per device",
    K.HW_TFLOPS_PER_DEVICE: "hw TFLOP/s per device",
    K.TOKENS_PER_S: "tokens/s",
    K.TOKENS_PER_S_PER_DEVICE: "tokens/s per device",
    K.STEP_TIME_MS: "step time (ms)",
    K.PEAK_TFLOPS: "peak TFLOP/s",
}
MAX_POINTS = 4000  # per drawn line; longer series keep each bucket's first, last, min and max
GAP = 1.5  # a step gap over 1.5 windows means windows are missing (paused, or none logged)
MAX_GAP_MARKS = 500  # gaps shaded per chart; the line is broken at every gap regardless


def plot(
    paths: str | Path | Sequence[str | Path],
    *,
    metrics: str | Sequence[str] | None = None,
    output: str | Path | None = None,
) -> Figure:
    """A matplotlib Figure of `metrics` over optimizer steps, one chart per metric, runs overlaid.

    Args:
        paths: one or more run files (the `.jsonl` the monitor wrote).
        metrics: keys such as "mfu" or "mfumon/tokens_per_s" (a list or "a,b"); by default
            MFU, TFLOP/s per device, tokens/s and step time, those the runs logged.
        output: also save the figure there (.png, .svg, .pdf, ...).

    Raises RunLogError for a file that cannot be read, ConfigError for a metric no run has,
    MissingDependencyError without matplotlib (`pip install 'mfumon[plot]'`).
    """
    runs = load_runs([paths] if isinstance(paths, (str, Path)) else paths)
    for run in runs:
        for note in run.notes:
            log.warning("mfumon plot: %s", note)
    figure = draw(runs, choose_metrics(runs, metrics))
    if output is not None:
        save(figure, output)
    return figure


def load_runs(paths: Sequence[str | Path]) -> list[RunLog]:
    """The runs read back, in order; ConfigError when no path is given."""
    if not paths:
        raise ConfigError("no run file given: pass the .jsonl the monitor wrote, e.g. runs/<run>.jsonl")
    return [read_run(path) for path in paths]


def choose_metrics(runs: Sequence[RunLog], metrics: str | Sequence[str] | None = None) -> list[str]:
    """Full keys to draw; ConfigError for an unknown key, one no run logged, or runs sharing none."""
    named = [{k for k in set().union(*run.records) if k.startswith(PREFIX)} for run in runs]
    union = set().union(*named)

    def logged(key: str, run_index: int) -> bool:  # a number in at least one window (stops at the first)
        return key in named[run_index] and any(is_number(r.get(key)) for r in runs[run_index].records)

    if len(runs) > 1 and not any(
        all(logged(key, i) for i in range(len(runs))) for key in set.intersection(*named)
    ):
        raise ConfigError(f"{', '.join(str(run.path) for run in runs)}: these runs have no metric in common")
    if metrics is None:
        chosen = [key for key in DEFAULT_METRICS if any(logged(key, i) for i in range(len(runs)))]
        return chosen or [key for key in runs[0].keys() if key != K.PEAK_TFLOPS][:4]
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    keys = [name if name.startswith(PREFIX) else PREFIX + name for name in (n.strip() for n in names) if name]
    if not keys:
        raise ConfigError("--metric is empty: name at least one, e.g. --metric mfu,tokens_per_s")
    for key in keys:
        if key not in union and key not in K.METRIC_KEYS:
            known = ", ".join(k[len(PREFIX) :] for k in sorted(union))
            raise ConfigError(f"unknown metric {key[len(PREFIX) :]!r}: these runs have {known}")
        if not any(logged(key, i) for i in range(len(runs))):
            why = " (no peak was known, so no utilization was logged)" if key in PERCENT else ""
            raise ConfigError(f"no run logged {key[len(PREFIX) :]!r}{why}")
    return list(dict.fromkeys(keys))


def series_array(run: RunLog, key: str, *, steps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`run.series(key)` as two numpy float arrays, built in C where every value is a plain number.

    `steps`: every record's step as floats, when the caller already has them (see `step_array`).
    """
    import numpy as np

    values = list(map(dict.get, run.records, itertools.repeat(key)))
    if not set(map(type, values)) <= {int, float, type(None)}:  # bools, strings, ...: the careful path
        numbers = run.series(key)
        return np.asarray(numbers[0], dtype=float), np.asarray(numbers[1], dtype=float)
    y = np.array(values, dtype=float)  # None (key absent) -> NaN
    keep = np.isfinite(y)
    x = step_array(run) if steps is None else steps
    return x[keep], y[keep]


def step_array(run: RunLog) -> np.ndarray:
    """Every record's step, as floats."""
    import numpy as np

    return np.array(list(map(dict.get, run.records, itertools.repeat("step"))), dtype=float)


def line_data(steps: Sequence[int], values: Sequence[float], spacing: float | None = None) -> tuple[Any, Any]:
    """(x, y) numpy arrays with a NaN where windows are missing, so no line is drawn across the gap.

    A gap is a step difference over 1.5 x `spacing` (log_every; the median difference when None),
    or a step that does not increase (a second run appended to the same file).
    """
    import numpy as np

    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.size < 2:
        return x, y
    diffs = np.diff(x)
    if not spacing or spacing <= 0:
        spacing = float(np.median(diffs[diffs > 0])) if (diffs > 0).any() else 1.0
    breaks = np.flatnonzero((diffs > GAP * spacing) | (diffs <= 0)) + 1
    return np.insert(x, breaks, np.nan), np.insert(y, breaks, np.nan)


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most about `max_points` points of (x, y) that draw the same line: per bucket the first,
    last, lowest and highest point, and every gap (NaN) with the points on either side."""
    import numpy as np

    n = x.size
    if n <= max_points:
        return x, y
    size = math.ceil(n / (max_points // 4))
    buckets = math.ceil(n / size)
    padded = np.full(buckets * size, np.nan)
    padded[:n] = y
    rows = padded.reshape(buckets, size)
    base = np.arange(buckets) * size
    lows = base + np.argmin(np.where(np.isnan(rows), np.inf, rows), axis=1)
    highs = base + np.argmax(np.where(np.isnan(rows), -np.inf, rows), axis=1)
    gaps = np.flatnonzero(np.isnan(y))
    keep = np.concatenate([base, np.minimum(base + size - 1, n - 1), lows, highs, gaps, gaps - 1, gaps + 1])
    keep = np.unique(np.clip(keep, 0, n - 1))
    return x[keep], y[keep]


def title_line(run: RunLog) -> str:
    """`<label>: <device> x<world>, peak <TFLOP/s> <dtype>`, or the FP8 mix, or that no peak was known."""
    facts, last = run.run, run.records[-1]
    device = facts.get("device") or last.get("device") or "unknown device"
    world = facts.get("world_size")
    where = f"{device} x{world}" if world else str(device)
    peak = _positive(facts.get("peak_tflops")) or _positive(last.get(K.PEAK_TFLOPS))
    dtype = str(facts.get("peak_dtype") or last.get("peak_dtype") or "")
    mix = facts.get("peak_mix") or last.get("peak_mix")
    if isinstance(mix, dict) and mix and all(_positive(share) for share in mix.values()):
        dtype = " / ".join(f"{d} {share * 100:.0f}%" for d, share in mix.items())  # fp8 86% / bf16 14%
    if peak:
        text = f"peak {peak:.4g} TFLOP/s {dtype}".rstrip()
        if "measured" in str(facts.get("peak_source") or "").lower():
            text += " (measured)"
    else:
        text = "no peak known, no MFU"
        measured = _positive(facts.get("measured_peak_tflops"))
        if measured:
            text += f"; measured GEMM ceiling {measured:.4g} TFLOP/s {dtype}".rstrip()
    return f"{run.label}: {where}, {text}"


def draw(runs: Sequence[RunLog], keys: Sequence[str]) -> Figure:
    """One chart per key, stacked, sharing the step axis; each run one colour and one legend entry."""
    figure_cls, canvas_cls = _matplotlib()
    figure = figure_cls(figsize=(9.0, 1.0 + 2.3 * len(keys)), layout="constrained")
    canvas_cls(figure)  # Agg: renders to memory, no display
    axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    labels = _labels(runs)
    steps = [step_array(run) for run in runs]
    for ax, key in zip(axes, keys, strict=True):
        for index, run in enumerate(runs):
            _draw_run(ax, run, key, steps[index], color=f"C{index % 10}", label=labels[index])
        ax.set_ylabel(AXIS_LABELS.get(key, key[len(PREFIX) :]))
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    handles, names = axes[0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    order = [name for name in labels if name in unique] + [name for name in unique if name not in labels]
    axes[0].legend([unique[name] for name in order], order, fontsize="small", loc="best")
    lines = [title_line(run) for run in runs[:4]] + (
        [f"... and {len(runs) - 4} more"] if len(runs) > 4 else []
    )
    figure.suptitle("\n".join(lines), fontsize="medium")
    return figure


def save(figure: Figure, output: str | Path) -> Path:
    """Write `figure` to `output` (its suffix picks the format); ConfigError when it cannot."""
    path = Path(output)
    formats = figure.canvas.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ConfigError(f"{path}: name a picture file ending in one of .{', .'.join(sorted(formats))}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot be written ({type(exc).__name__}: {exc.strerror or exc})"
        ) from None
    return path


def _draw_run(ax: Axes, run: RunLog, key: str, every_step: np.ndarray, *, color: str, label: str) -> None:
    """One run's line on one chart, its warm-up span and its gaps shaded."""
    steps, values = series_array(run, key, steps=every_step)
    if not steps.size:
        return
    scale = 100.0 if key in PERCENT else 1.0
    x, y = line_data(steps, values * scale, _positive(run.run.get("log_every")))
    gaps = _gap_spans(x)
    x, y = decimate(x, y)
    ax.plot(x, y, color=color, label=label, linewidth=1.2, marker="o" if steps.size <= 60 else None, ms=3)
    warmup, first = _positive(run.run.get("warmup")), _positive(run.run.get("initial_step")) or 0.0
    if warmup:
        ax.axvspan(first, first + warmup, color="0.5", alpha=0.15, lw=0, label="warm-up (not logged)")
    if gaps:
        ax.broken_barh(
            gaps[:MAX_GAP_MARKS],
            (0, 1),
            transform=ax.get_xaxis_transform(),
            facecolor="none",
            edgecolor=color,  # whose windows are missing, where runs overlap
            alpha=0.3,
            hatch="//",
            lw=0,
            label="no window (paused or missing)",
        )
    for start, width, share in paused_spans(run, every_step)[:MAX_GAP_MARKS]:
        ax.axvspan(
            start,
            start + width,
            color="tab:red",
            alpha=0.08 + 0.3 * share,
            lw=0,
            label="paused or gaps in window",
        )


def paused_spans(run: RunLog, every_step: np.ndarray | None = None) -> list[tuple[float, float, float]]:
    """(first step, width, paused share of the wall time) of each window with paused time in it.

    From each window's `goodput` (1 - goodput is its paused share); a window spans the steps since
    the previous window (log_every steps for the first). Runs without goodput have none.
    """
    import numpy as np

    steps, goodput = series_array(run, K.GOODPUT, steps=every_step)
    if not steps.size:
        return []
    every = _positive(run.run.get("log_every")) or (
        float(np.median(np.diff(steps))) if steps.size > 1 else 1.0
    )
    starts = np.concatenate(([steps[0] - every], steps[:-1]))
    starts = np.where((steps - starts > 0) & (steps - starts <= GAP * every), starts, steps - every)
    return [
        (a, b - a, 1.0 - g) for a, b, g in zip(starts, steps, goodput, strict=True) if g < K.NOTABLE_GOODPUT
    ]


def _gap_spans(x: np.ndarray) -> list[tuple[float, float]]:
    """(start, width) of each gap line_data marked with a NaN: from the last window before it to the next."""
    import numpy as np

    at = np.flatnonzero(np.isnan(x))
    at = at[(at > 0) & (at < x.size - 1)][:MAX_GAP_MARKS]
    return [(x[i - 1], x[i + 1] - x[i - 1]) for i in at if x[i + 1] > x[i - 1]]


def _positive(value: Any) -> float | None:
    """`value` when it is a finite number > 0 (a fact read from a file), else None."""
    return float(value) if is_number(value) and value > 0 else None


def _labels(runs: Sequence[RunLog]) -> list[str]:
    """File stems, with the parent folder where two runs share a stem."""
    stems = [run.label for run in runs]
    return [
        f"{run.path.parent.name}/{run.label}" if stems.count(run.label) > 1 else run.label for run in runs
    ]


def _matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg); MissingDependencyError with the pip command when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("mfumon plot needs matplotlib: pip install 'mfumon[plot]'") from None
    return Figure, FigureCanvasAgg
