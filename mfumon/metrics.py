"""Metric keys (defined once here) and the arithmetic that turns a window into metrics.

Every logger uses these keys; the README's metric table is checked against `METRIC_KEYS`.
All inputs are base units (FLOPs, FLOP/s, seconds); conversion to TFLOP/s and ms happens here,
at the boundary to the loggers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the metric keys are read by the run-file commands, which import no torch
    from mfumon.timing import StepRecord

__all__ = [
    "HFU",
    "HW_TFLOPS_PER_DEVICE",
    "METRIC_KEYS",
    "MFU",
    "MFU_AVG",
    "MFU_MEASURED",
    "PEAK_TFLOPS",
    "STEP_TIME_MS",
    "TFLOPS_PER_DEVICE",
    "TOKENS_PER_S",
    "TOKENS_PER_S_PER_DEVICE",
    "Window",
    "combine_ranks",
    "split_windows",
    "window_metrics",
]

MFU = "mfumon/mfu"
HFU = "mfumon/hfu"
TFLOPS_PER_DEVICE = "mfumon/tflops_per_device"
HW_TFLOPS_PER_DEVICE = "mfumon/hw_tflops_per_device"
TOKENS_PER_S = "mfumon/tokens_per_s"
TOKENS_PER_S_PER_DEVICE = "mfumon/tokens_per_s_per_device"
STEP_TIME_MS = "mfumon/step_time_ms"
PEAK_TFLOPS = "mfumon/peak_tflops"
MFU_AVG = "mfumon/mfu_avg"
MFU_MEASURED = "mfumon/mfu_measured"

#: Every key a logger can receive, with its meaning (the README table mirrors this).
METRIC_KEYS: dict[str, str] = {
    MFU: "model FLOPs utilization over the window, a fraction in [0, 1]",
    HFU: "hardware FLOPs utilization: model FLOPs plus recomputed FLOPs, a fraction in [0, 1]",
    TFLOPS_PER_DEVICE: "achieved model TFLOP/s per device",
    HW_TFLOPS_PER_DEVICE: "achieved hardware TFLOP/s per device (with recompute)",
    TOKENS_PER_S: "tokens per second, all devices",
    TOKENS_PER_S_PER_DEVICE: "tokens per second per device",
    STEP_TIME_MS: "mean optimizer-step time over the window, in ms (slowest rank)",
    PEAK_TFLOPS: "per-device dense peak TFLOP/s used as the MFU denominator (its dtype: `peak_dtype`)",
    MFU_AVG: "whole-run MFU so far, warm-up excluded",
    MFU_MEASURED: "MFU against the measured GEMM ceiling, not the datasheet (with measure_ceiling=True)",
}


@dataclass(frozen=True)
class Window:
    """Global (all-rank) totals of a run of timed optimizer steps."""

    steps: int  # optimizer steps in the window
    tokens: float  # tokens processed by all ranks
    model_flops: float  # model FLOPs of all ranks (MFU numerator)
    hardware_flops: float  # model FLOPs plus recompute, all ranks (HFU numerator)
    seconds: float  # wall time of the window on the device timeline, slowest rank

    def __add__(self, other: Window) -> Window:
        return Window(
            self.steps + other.steps,
            self.tokens + other.tokens,
            self.model_flops + other.model_flops,
            self.hardware_flops + other.hardware_flops,
            self.seconds + other.seconds,
        )


EMPTY_WINDOW = Window(0, 0.0, 0.0, 0.0, 0.0)


def utilization(flops: float, seconds: float, world_size: int, peak_flops: float) -> float:
    """Fraction of `world_size` devices' peak used by `flops` in `seconds`."""
    return flops / (seconds * world_size * peak_flops)  # DESIGN: global FLOPs / (time x devices x peak)


def window_metrics(
    window: Window,
    *,
    world_size: int,
    peak_flops: float | None,
    measured_peak_flops: float | None = None,
) -> dict[str, float]:
    """Metrics of one window; MFU/HFU keys are left out when no peak is known (never faked)."""
    if window.steps <= 0 or not (window.seconds > 0.0) or not math.isfinite(window.seconds):
        return {}
    per_device_s = window.seconds * world_size
    out = {
        TFLOPS_PER_DEVICE: window.model_flops / per_device_s / 1e12,
        HW_TFLOPS_PER_DEVICE: window.hardware_flops / per_device_s / 1e12,
        TOKENS_PER_S: window.tokens / window.seconds,
        TOKENS_PER_S_PER_DEVICE: window.tokens / per_device_s,
        STEP_TIME_MS: window.seconds / window.steps * 1e3,
    }
    if peak_flops is not None:
        out[MFU] = utilization(window.model_flops, window.seconds, world_size, peak_flops)
        out[HFU] = utilization(window.hardware_flops, window.seconds, world_size, peak_flops)
        out[PEAK_TFLOPS] = peak_flops / 1e12
    if measured_peak_flops is not None:
        out[MFU_MEASURED] = utilization(window.model_flops, window.seconds, world_size, measured_peak_flops)
    return out


def combine_ranks(windows: list[Window], world_size: int) -> Window:
    """Global window from each rank's: tokens and FLOPs summed, time of the slowest rank.

    Ranks may have resolved a different number of steps at log time (each reads only finished
    steps), so ranks are combined per step: the global step time is the slowest rank's mean step
    time, and per-step tokens/FLOPs are summed over ranks (ranks with no finished step count as
    the mean of the others).
    """
    present = [w for w in windows if w.steps > 0]
    if not present:
        return EMPTY_WINDOW
    steps = max(w.steps for w in present)
    scale = world_size / len(present)

    def per_step_sum(attr: str) -> float:
        return sum(getattr(w, attr) / w.steps for w in present) * scale * steps

    seconds = max(w.seconds / w.steps for w in present) * steps
    return Window(
        steps, per_step_sum("tokens"), per_step_sum("model_flops"), per_step_sum("hardware_flops"), seconds
    )


def split_windows(
    records: Iterable[StepRecord], *, warmup: int, flops_per_token: int, hw_flops_per_token: int
) -> tuple[Window, Window, list[StepRecord], list[StepRecord]]:
    """One rank's warm-up and measured windows from resolved steps, then the steps left out of them.

    A step's model FLOPs are tokens x flops_per_token plus its `extra_flops` (its own shapes); its
    hardware FLOPs scale with them: tokens x hw_flops_per_token plus extra x hw / model per token
    (the setup's recompute share). Steps that started while paused (no time) belong to neither.
    Left out and returned: steps whose token count is not a whole number >= 0 (NaN, negative,
    fractional: a tensor count is only checked here), then steps with a non-positive or non-finite
    time.
    """
    sums = [[0, 0.0, 0.0, 0.0], [0, 0.0, 0.0, 0.0]]  # warm-up, measured: [steps, tokens, seconds, extra]
    bad_tokens: list[StepRecord] = []
    bad_times: list[StepRecord] = []
    for record in records:
        index, seconds, tokens, extra = record
        if seconds is None:
            continue  # started while paused: not timed
        if not (tokens >= 0 and tokens.is_integer()):  # NaN and infinities are no integers
            bad_tokens.append(record)
            continue
        if not (seconds > 0.0 and math.isfinite(seconds)):
            bad_times.append(record)
            continue
        acc = sums[index > warmup]
        acc[0] += 1
        acc[1] += tokens
        acc[2] += seconds
        acc[3] += extra
    hw_share = hw_flops_per_token / flops_per_token
    warm, meas = (
        Window(int(n), tok, tok * flops_per_token + ex, tok * hw_flops_per_token + ex * hw_share, sec)
        for n, tok, sec, ex in sums
    )
    return warm, meas, bad_tokens, bad_times
