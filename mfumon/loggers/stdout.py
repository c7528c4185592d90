"""One compact human line per log on stdout."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from mfumon import metrics as K
from mfumon.loggers.base import Logger

__all__ = ["StdoutLogger", "format_line"]


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_line(metrics: Mapping[str, float], step: int, *, dtype: str | None = None, note: str = "") -> str:
    """The stdout line for one window: percent, TFLOP/s, tokens/s and ms.

    With no datasheet peak, MFU against the measured GEMM ceiling takes MFU's place, labelled so.
    """
    parts = [f"[mfumon] step {step}" + (f" ({note})" if note else "")]
    measured_only = K.MFU not in metrics and K.MFU_MEASURED in metrics
    if measured_only:  # a CPU (or an unknown device) with measure_ceiling=True
        parts.append(f"MFU {metrics[K.MFU_MEASURED] * 100:.1f}% of measured ceiling")
    if K.MFU in metrics:
        mfu = f"MFU {metrics[K.MFU] * 100:.1f}%"
        if K.HFU in metrics and abs(metrics[K.HFU] - metrics[K.MFU]) > 1e-9:
            mfu += f" HFU {metrics[K.HFU] * 100:.1f}%"
        parts.append(mfu)
    tflops = f"{metrics[K.TFLOPS_PER_DEVICE]:.3g} TFLOP/s/dev" if K.TFLOPS_PER_DEVICE in metrics else ""
    if K.PEAK_TFLOPS in metrics:
        tflops += f" (peak {metrics[K.PEAK_TFLOPS]:.4g} {dtype or ''})".replace(" )", ")")
    if tflops:
        parts.append(tflops)
    if K.TOKENS_PER_S in metrics:
        parts.append(f"{_num(metrics[K.TOKENS_PER_S])} tok/s")
    if K.STEP_TIME_MS in metrics:
        parts.append(f"{metrics[K.STEP_TIME_MS]:.1f} ms/step")
    if K.MFU_AVG in metrics:
        parts.append(f"avg MFU {metrics[K.MFU_AVG] * 100:.1f}%")
    if K.MFU_MEASURED in metrics and not measured_only:
        parts.append(f"MFU vs measured {metrics[K.MFU_MEASURED] * 100:.1f}%")
    return " | ".join(parts + notable(metrics))


#: When a ledger figure earns a place on the stdout line (every figure is in JSONL either way).
NOTABLE_INPUT_WAIT = 0.05  # above: data loading and host work take over 5% of the step
NOTABLE_RANK_SPREAD = 0.05  # the slowest rank's step over 5% longer than the fastest's
NOTABLE_EXPERT_LOAD = 1.5  # the busiest expert of some layer gets 1.5x its share of tokens


def notable(metrics: Mapping[str, float]) -> list[str]:
    """The ledger's short tail for the stdout line: only what is notable in this window, else nothing."""
    tail = []
    goodput = metrics.get(K.GOODPUT)
    if goodput is not None and goodput < K.NOTABLE_GOODPUT:  # paused time and gaps over 5%
        tail.append(f"goodput {goodput * 100:.0f}%")
    wait = metrics.get(K.INPUT_WAIT_FRAC)
    if wait is not None and wait > NOTABLE_INPUT_WAIT:
        tail.append(f"input wait {wait * 100:.0f}%")
    slow, fast, rank = (metrics.get(k) for k in (K.STEP_TIME_MAX_MS, K.STEP_TIME_MIN_MS, K.SLOWEST_RANK))
    if slow is not None and fast and rank is not None and slow / fast - 1 > NOTABLE_RANK_SPREAD:
        tail.append(f"rank {rank:.0f} slowest +{(slow / fast - 1) * 100:.0f}%")
    load = metrics.get(K.EXPERT_LOAD_MAX)
    if load is not None and load > NOTABLE_EXPERT_LOAD:
        tail.append(f"expert load {load:.2g}x")
    retries = metrics.get(K.MEM_ALLOC_RETRIES, 0) + metrics.get(K.MEM_OOMS, 0)
    if retries:
        tail.append(
            f"alloc retries {metrics.get(K.MEM_ALLOC_RETRIES, 0):.0f}, OOMs {metrics.get(K.MEM_OOMS, 0):.0f}"
        )
    return tail


class StdoutLogger(Logger):
    """Prints one line per log: `[mfumon] step 40 | MFU 38.2% | 378 TFLOP/s/dev (peak 989 bf16) | ...`."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._dtype: str | None = None
        self._initial_step = 0  # steps done before this run (a resumed run), from the run info

    def _write(self, line: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def log_run_info(self, info: Mapping[str, Any]) -> None:
        self._dtype = info.get("peak_dtype")
        self._initial_step = int(info.get("initial_step") or 0)
        device = info.get("device") or "unknown device"
        peak = info.get("peak_tflops")
        peak_txt = f"peak {peak:.4g} TFLOP/s {self._dtype}" if peak else "no peak known (pass peak_tflops=)"
        ceiling = info.get("measured_peak_tflops")
        if ceiling and not peak:  # MFU against what this device's GEMMs reach, labelled as such
            peak_txt = (
                f"no datasheet peak for {device}: MFU is against the GEMM ceiling measured here, "
                f"{ceiling:.3g} TFLOP/s {self._dtype} (pass peak_tflops= for a datasheet MFU)"
            )
        elif ceiling:
            peak_txt += f", measured GEMM ceiling {ceiling:.4g}"
        mix = info.get("peak_mix")
        if mix:  # FP8 beside bf16: shown once here; the window lines say "mixed"
            shares = " / ".join(f"{dtype} {share * 100:.0f}%" for dtype, share in mix.items())
            self._dtype = "mixed"
            if not peak:
                peak_txt += f"; FLOPs {shares}"
            elif info.get("peak_weighted"):
                peak_txt = f"peak {peak:.4g} TFLOP/s weighted by FLOPs: {shares}"
            else:
                peak_txt = f"peak {peak:.4g} TFLOP/s as given, not weighted (FLOPs {shares})"
            if info.get("peak_fallback"):
                peak_txt += f"; {info['peak_fallback']}"
        gflop = info.get("flops_per_token", 0) / 1e9
        total, trainable = info.get("params_total"), info.get("params_trainable")
        frozen = ""
        if isinstance(total, int) and isinstance(trainable, int) and trainable != total:
            frozen = f", {trainable:,} of {total:,} parameters trained"
        self._write(
            f"[mfumon] {device} x{info.get('world_size', 1)}, {peak_txt}; "
            f"{gflop:.4g} GFLOP/token (training{frozen}); "
            f"warm-up {info.get('warmup', 0)} steps excluded from averages"
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._write(format_line(metrics, step, dtype=self._dtype))

    def log_profile(self, profile: Any, step: int) -> None:
        self._write(f"[mfumon] step {step} profile (sorted by time lost):\n{profile.table()}")

    def log_warmup(self, metrics: Mapping[str, float], step: int, warmup: int) -> None:
        done = min(step - self._initial_step, warmup)  # this run's warm-up steps (a resumed run counts on)
        note = f"warm-up {done}/{warmup}, not in averages"
        self._write(format_line(metrics, step, dtype=self._dtype, note=note))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        steps = summary.get("steps", 0)
        if not steps:
            self._write("[mfumon] run summary: no timed steps after warm-up")
            return
        line = format_line(
            summary, int(summary.get("last_step", steps)), dtype=self._dtype, note="run summary"
        )
        wall = summary.get("wall_s")
        if wall:  # where the run's wall time went, in shares
            parts = [
                (k, summary.get(k.replace(" ", "_").replace("-", "") + "_s"))
                for k in ("training", "input wait", "paused", "warm-up")
            ]
            shares = ", ".join(f"{k} {v / wall * 100:.0f}%" for k, v in parts if v is not None)
            line += f" | wall {wall:.4g} s: {shares}"
        self._write(line)
