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
# Where the time goes (the ledger): each is left out of a window where it cannot be measured.
GOODPUT = "mfumon/goodput"
MFU_WALL = "mfumon/mfu_wall"
INPUT_WAIT_FRAC = "mfumon/input_wait_frac"
STEP_TIME_MAX_MS = "mfumon/step_time_max_ms"
STEP_TIME_MIN_MS = "mfumon/step_time_min_ms"
SLOWEST_RANK = "mfumon/slowest_rank"
INPUT_WAIT_MAX_FRAC = "mfumon/input_wait_max_frac"
INPUT_WAIT_MAX_RANK = "mfumon/input_wait_max_rank"
SM_CLOCK_MHZ = "mfumon/sm_clock_mhz"
POWER_W = "mfumon/power_w"
JOULES_PER_TOKEN = "mfumon/joules_per_token"
MEM_PEAK_GIB = "mfumon/mem_peak_gib"
MEM_RESERVED_GIB = "mfumon/mem_reserved_gib"
MEM_ALLOC_RETRIES = "mfumon/mem_alloc_retries"
MEM_OOMS = "mfumon/mem_ooms"
EXPERT_LOAD_MAX = "mfumon/expert_load_max"
EXPERTS_IDLE = "mfumon/experts_idle"
#: Below this goodput a window lost notable time outside its steps: stdout's tail and plot mark it.
NOTABLE_GOODPUT = 0.95

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
    GOODPUT: "fraction of the wall time since the previous log spent inside timed training steps",
    MFU_WALL: "model FLOPs over wall time (paused time and gaps included) / (devices x peak)",
    INPUT_WAIT_FRAC: "fraction of step time from the end of one step to the first forward of the next",
    STEP_TIME_MAX_MS: "the slowest rank's mean step time over the window, in ms (2+ ranks)",
    STEP_TIME_MIN_MS: "the fastest rank's mean step time over the window, in ms (2+ ranks)",
    SLOWEST_RANK: "the rank with the largest mean step time in the window (2+ ranks)",
    INPUT_WAIT_MAX_FRAC: "the largest input-wait fraction of any rank in the window (2+ ranks)",
    INPUT_WAIT_MAX_RANK: "the rank with that largest input-wait fraction (2+ ranks)",
    SM_CLOCK_MHZ: "SM clock from NVML, newest sample (every 0.5 s, off the training thread), MHz, lowest",
    POWER_W: "mean board power from NVML since the previous log (at least the last second), W per device",
    JOULES_PER_TOKEN: "device energy over the window (NVML energy counter, all ranks) per token",
    MEM_PEAK_GIB: "the allocator's peak allocated memory in the window, GiB, max over ranks",
    MEM_RESERVED_GIB: "memory reserved by the caching allocator at log time, GiB, max over ranks",
    MEM_ALLOC_RETRIES: "allocator retries (cudaMalloc failed, caches flushed) in the window, all ranks",
    MEM_OOMS: "out-of-memory errors the allocator raised in the window, all ranks",
    EXPERT_LOAD_MAX: "MoE: max over layers of (max tokens per expert / mean) in the window; 1.0 is balance",
    EXPERTS_IDLE: "MoE: experts (over all MoE layers) that got no token in the window",
}


@dataclass(frozen=True)
class Window:
    """Global (all-rank) totals of a run of timed optimizer steps."""

    steps: int  # optimizer steps in the window
    tokens: float  # tokens processed by all ranks
    model_flops: float  # model FLOPs of all ranks (MFU numerator)
    hardware_flops: float  # model FLOPs plus recompute, all ranks (HFU numerator)
    seconds: float  # time inside the window's steps on the device timeline, slowest rank
    # Where the time goes; 0.0 where not measured:
    wall: float = 0.0  # wall time the steps span, paused time and gaps included (slowest rank)
    input_wait: float = 0.0  # seconds from step starts to first forwards, in steps where measured
    waited: float = 0.0  # step seconds of the steps whose input wait was measured

    def __add__(self, other: Window) -> Window:
        return Window(  # field by field: dataclasses.astuple deep-copies, and this runs at every log
            self.steps + other.steps,
            self.tokens + other.tokens,
            self.model_flops + other.model_flops,
            self.hardware_flops + other.hardware_flops,
            self.seconds + other.seconds,
            self.wall + other.wall,
            self.input_wait + other.input_wait,
            self.waited + other.waited,
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
    if window.wall > 0.0 and math.isfinite(window.wall):
        out[GOODPUT] = min(window.seconds / window.wall, 1.0)  # the clocks of spans and steps differ by ns
        if peak_flops is not None:
            out[MFU_WALL] = utilization(
                window.model_flops, max(window.wall, window.seconds), world_size, peak_flops
            )
    if window.waited > 0.0:
        out[INPUT_WAIT_FRAC] = window.input_wait / window.waited
    return out


def combine_ranks(windows: list[Window], world_size: int) -> Window:
    """Global window from each rank's: tokens and FLOPs summed, time of the slowest rank.

    Ranks may have resolved a different number of steps at log time (each reads only finished
    steps), so ranks are combined per step: the global step time is the slowest rank's mean step
    time, and per-step tokens/FLOPs are summed over ranks (ranks with no finished step count as
    the mean of the others).
    """
    present = [w for w in windows if w.steps > 0]
    if not present:  # every rank paused through the window: its wall time still is the run's
        wall = max((w.wall for w in windows), default=0.0)
        return EMPTY_WINDOW if wall <= 0.0 else Window(0, 0.0, 0.0, 0.0, 0.0, wall=wall)
    steps = max(w.steps for w in present)
    scale = world_size / len(present)

    def per_step_sum(attr: str) -> float:
        return sum(getattr(w, attr) / w.steps for w in present) * scale * steps

    def slowest(attr: str) -> float:
        return max(getattr(w, attr) / w.steps for w in present) * steps

    # Input wait: the ranks' waits and waited seconds summed, so their ratio is the time-weighted
    # mean fraction over ranks (the largest single rank's is the per-rank view's).
    return Window(
        steps,
        per_step_sum("tokens"),
        per_step_sum("model_flops"),
        per_step_sum("hardware_flops"),
        slowest("seconds"),
        slowest("wall"),
        sum(w.input_wait for w in present),
        sum(w.waited for w in present),
    )


def split_windows(
    records: Iterable[StepRecord], *, warmup: int, flops_per_token: int, hw_flops_per_token: int
) -> tuple[Window, Window, list[StepRecord], list[StepRecord]]:
    """One rank's warm-up and measured windows from resolved steps, then the steps left out of them.

    A step's model FLOPs are tokens x flops_per_token plus its `extra_flops` (its own shapes); its
    hardware FLOPs scale with them: tokens x hw_flops_per_token plus extra x hw / model per token
    (the setup's recompute share). Steps that ended while paused (no time) belong to neither, but
    their span counts in the window's wall time; profiled steps have neither time nor span.
    Left out and returned: steps whose token count is not a whole number >= 0 (NaN, negative,
    fractional: a tensor count is only checked here), then steps with a non-positive or non-finite
    time.
    """
    # warm-up, measured: [steps, tokens, seconds, extra, wall, input wait, waited seconds]
    sums = [[0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    bad_tokens: list[StepRecord] = []
    bad_times: list[StepRecord] = []
    for record in records:
        index, seconds, tokens, extra, span, wait = record
        acc = sums[index > warmup]
        if span is not None and span > 0.0 and math.isfinite(span):
            acc[4] += span
        if seconds is None:
            continue  # ended while paused, or profiled: not timed
        if not (tokens >= 0 and tokens.is_integer()):  # NaN and infinities are no integers
            bad_tokens.append(record)
            continue
        if not (seconds > 0.0 and math.isfinite(seconds)):
            bad_times.append(record)
            continue
        acc[0] += 1
        acc[1] += tokens
        acc[2] += seconds
        acc[3] += extra
        if wait is not None:
            acc[5] += wait
            acc[6] += seconds
    hw_share = hw_flops_per_token / flops_per_token
    warm, meas = (
        Window(
            int(n),
            tok,
            tok * flops_per_token + ex,
            tok * hw_flops_per_token + ex * hw_share,
            sec,
            wall,
            wait,
            waited,
        )
        for n, tok, sec, ex, wall, wait, waited in sums
    )
    return warm, meas, bad_tokens, bad_times
