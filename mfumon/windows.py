"""Log time: finished steps -> this rank's windows -> global windows (once) -> metrics -> loggers.

`Windows` is the monitor's log-time half. At each log it resolves the steps the device has
finished (never waiting, except once at close), splits them into warm-up and measured windows,
reduces them across ranks, turns them into metrics and sends those to the loggers; it keeps the
whole-run total for `mfu_avg` and the summary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mfumon import metrics as K
from mfumon.distributed import Reducer
from mfumon.errors import FaultLog
from mfumon.flop_model import FlopModel
from mfumon.hardware import PeakInfo, measure_peak_flops
from mfumon.ledger import Ledger
from mfumon.loggers import LoggerSet
from mfumon.metrics import EMPTY_WINDOW, Window, split_windows, window_metrics
from mfumon.ranks import RankView, Stragglers
from mfumon.timing import StepTimer

__all__ = ["Windows"]


class Windows:
    """Window metrics of one run, computed at log time and sent to `loggers`."""

    def __init__(
        self,
        *,
        timer: StepTimer,
        reducer: Reducer,
        flops: FlopModel,
        peak: PeakInfo,
        warmup: int,
        log_every: int,
        device_type: str,
        faults: FaultLog,
        first_step: int = 0,
        ledger: Ledger | None = None,
    ) -> None:
        self.timer, self.reducer, self.flops, self.peak = timer, reducer, flops, peak
        self.ledger = ledger if ledger is not None else Ledger([], faults)
        self.warmup, self.log_every, self._device_type, self._faults = warmup, log_every, device_type, faults
        self.loggers = LoggerSet([])  # built by the monitor once the rank is known
        self.measured_peak_flops: float | None = None
        self.first_step = first_step  # steps done before this run (a resumed run's initial_step)
        self.logged_step = first_step
        self.total = EMPTY_WINDOW  # measured steps of the whole run, all ranks
        self.warm_total = EMPTY_WINDOW  # warm-up steps of the whole run, all ranks
        self.metrics: dict[str, float] = {}  # the latest window's
        self._run_info_sent = False
        self.stragglers = Stragglers(faults)  # rank 0 says when one rank stays the slowest

    def log(self, step: int, *, final: bool = False, emit: bool = True) -> None:
        """Log the steps finished up to `step`; `final` waits for all (close); never raises."""
        warm, meas = EMPTY_WINDOW, EMPTY_WINDOW
        # Every rank reaches each collective below at the same step, whatever fails locally.
        upto = None
        if self.reducer.world > 1 and not final:
            try:
                finished = self.timer.finished_through(step)
            except Exception as exc:
                self._faults.fault("timing", exc)
                finished = self.logged_step  # resolve nothing new on this round
            upto = self.reducer.agree(finished)
        try:
            warm, meas, bad_tokens, bad_times = split_windows(
                self.timer.resolve(wait=final, upto=upto),
                warmup=self.first_step + self.warmup,  # the first `warmup` steps of this run
                flops_per_token=self.flops.flops_per_token,
                hw_flops_per_token=self.flops.hw_flops_per_token,
            )
            for index, _, tokens, *_ in bad_tokens:
                self._faults.report(
                    "tokens",
                    "mfumon: step %d counted %s tokens; a token count must be a whole number >= 0 "
                    "(e.g. attention_mask.sum()); steps like it are left out, training goes on",
                    index,
                    tokens,
                )
            for index, seconds, tokens, *_ in bad_times:
                self._faults.fault("timing", ValueError(f"step {index}: {seconds} s, {tokens} tokens"))
        except Exception as exc:
            self._faults.fault("timing", exc)
        stats = self.ledger.collect(final=final)  # never raises: a failing source turns NaN
        reduced = self.reducer.reduce(warm, meas, stats, self.ledger.ops, step=step, final=final)
        self.logged_step = step
        for at, (warm, meas, stats, view), current in reduced:  # pipelined: the previous log's first
            try:
                self._emit(warm, meas, stats, at, emit=emit or not current, view=view)
            except Exception as exc:
                self._faults.fault("metrics", exc)
        if not final:  # the log's own work (loggers included) and its wait for other ranks: a gap
            try:
                self.timer.restart()
            except Exception as exc:
                self._faults.fault("timing", exc)

    def finish(self, step: int, *, started: bool, failed: bool) -> None:
        """At close: log the last partial window (unless the run failed across ranks), then the summary."""
        world = self.reducer.world
        if started and not (failed and world > 1):  # other ranks may not reach close() then
            fresh = step > self.logged_step
            if fresh or self.timer.pending or world > 1:
                # Steps carried over from the last log (unfinished on the GPU then) join the totals
                # but get no second window at the same step.
                self.log(step, final=True, emit=fresh)
        self.loggers.call("log_summary", self.summary(step))
        self.loggers.call("close")
        self.ledger.close()

    def _emit(
        self,
        warm: Window,
        meas: Window,
        stats: list[float],
        step: int,
        *,
        emit: bool,
        view: RankView | None = None,
    ) -> None:
        self.warm_total += warm
        self.total += meas  # also a window of paused steps only: its wall time is the run's
        if not emit:  # steps carried over to close(): totals only, no second window at this step
            return
        if not self._run_info_sent and (meas.steps or warm.steps):
            self._run_info_sent = True
            self.loggers.call("log_run_info", self.run_info())
        world, peak = self.reducer.world, self.peak.flops
        if meas.steps:
            out = window_metrics(
                meas, world_size=world, peak_flops=peak, measured_peak_flops=self.measured_peak_flops
            )
            total_mfu = window_metrics(self.total, world_size=world, peak_flops=peak).get(K.MFU)
            if total_mfu is not None:
                out[K.MFU_AVG] = total_mfu
            extra, details = self.ledger.metrics(stats, meas, world)
            out.update(extra)
            if view is not None:  # 2+ ranks: the per-rank view, and the straggler notice (rank 0)
                out.update(view.metrics())
            self.stragglers.observe(view, step, report=self.reducer.rank == 0)
            self.metrics = out
            self._check_possible(out, step)
            if details:
                self.loggers.call("log_details", details, step)
            self.loggers.call("log", dict(out), step)
        elif warm.steps:
            out = window_metrics(warm, world_size=world, peak_flops=peak)
            self.loggers.call("log_warmup", out, step, self.warmup)

    def _check_possible(self, out: dict[str, float], step: int) -> None:
        """Say once when a window claims more than the device can do: the count or the peak is wrong."""
        if out.get(K.HFU, 0.0) <= 1.0 and out.get(K.MFU_MEASURED, 0.0) <= 1.0:  # HFU >= MFU
            return
        over = {k: v for k in (K.MFU, K.HFU, K.MFU_MEASURED) if (v := out.get(k, 0.0)) > 1.0}
        claims = ", ".join(f"{k} = {v:.3g}" for k, v in over.items())
        self._faults.report(
            "impossible",
            "mfumon: step %d: %s, more than the device can do: a probable accounting error, not a fast "
            "run. Likely causes: the peak (peak_tflops= is per device, in TFLOP/s: %s %s here), tokens "
            "(tokens= counts this rank's tokens of one optimizer step, not all ranks' or the run's), "
            "the FLOPs per token (%s; pass flops_per_token= or check docs/accounting.md), or the device "
            "(%s). Logging goes on.",
            step,
            claims,
            self.peak.tflops,
            self.peak.label,  # a mix reads "fp8 86% / bf16 14%"
            f"{self.flops.flops_per_token:,}",
            self.device_name,
        )

    def measure_ceiling(self, device: torch.device) -> None:
        """Time the GEMM ceiling in the peak's dtype (a GPU, or the CPU: the one denominator it has)."""
        try:
            with torch.autocast(device.type, enabled=False):
                self.measured_peak_flops = measure_peak_flops(self.peak.dtype, device=device)
        except Exception as exc:
            self._faults.fault("measure_ceiling", exc)

    @property
    def signature(self) -> str:
        """What tells this monitor from another: its cadence, FLOPs per token and ledger layout (ranks
        whose rows differ in length must not exchange them: gloo aborts the process on that)."""
        return f"{self.log_every}/{self.warmup}/{self.flops.flops_per_token}/{self.ledger.layout}"

    @property
    def device_name(self) -> str:
        """The device's name as looked up (NVML / ROCm), or the torch device type."""
        return self.peak.device or self._device_type

    def summary(self, last_step: int) -> dict[str, Any]:
        """Whole-run metrics over all timed steps after warm-up, plus run facts."""
        world = self.reducer.world
        out: dict[str, Any] = dict(
            window_metrics(
                self.total,
                world_size=world,
                peak_flops=self.peak.flops,
                measured_peak_flops=self.measured_peak_flops,  # whole-run MFU against the measured ceiling
            )
        )
        if K.MFU in out:
            out[K.MFU_AVG] = out[K.MFU]
        out.update(
            steps=self.total.steps,
            tokens=self.total.tokens,
            seconds=self.total.seconds,
            **self.time_split(),
            last_step=last_step,
            warmup_steps=self.warmup,
            world_size=world,
            device=self.device_name,
            peak_dtype=self.peak.dtype,
            **self.peak.mix_facts(),
            flops_per_token=self.flops.flops_per_token,
            hw_flops_per_token=self.flops.hw_flops_per_token,
        )
        return out

    def time_split(self) -> dict[str, float]:
        """The run's wall time on the device timeline, in seconds, split by cause (all disjoint):
        training steps (less their input wait), input wait, paused time and gaps, and warm-up.

        Input wait is measured only in steps with a first forward seen and no pause: its seconds
        here are that share of the step time. Keys are left out when the wall time is unknown.
        """
        total, warm = self.total, self.warm_total
        warmup_s = warm.wall if warm.wall > 0.0 else warm.seconds
        if total.wall <= 0.0:
            return {"warmup_s": warmup_s} if warmup_s > 0.0 else {}
        out = {"wall_s": warmup_s + max(total.wall, total.seconds), "warmup_s": warmup_s}
        wait_s = total.seconds * total.input_wait / total.waited if total.waited > 0.0 else None
        out["training_s"] = total.seconds - (wait_s or 0.0)
        if wait_s is not None:
            out["input_wait_s"] = wait_s
        out["paused_s"] = max(total.wall - total.seconds, 0.0)
        return out

    def run_info(self) -> dict[str, Any]:
        """Facts about the run sent to loggers once (device, dtype, peak, FLOPs, parameters)."""
        info: dict[str, Any] = {
            "device": self.device_name,
            "peak_dtype": self.peak.dtype,
            "peak_tflops": self.peak.tflops,
            "peak_source": self.peak.source,
            **self.peak.mix_facts(),  # FP8 beside bf16: dtype -> FLOP share, whether the peak is weighted
            "world_size": self.reducer.world,
            "seq_len": self.flops.seq_len,
            "flops_per_token": self.flops.flops_per_token,
            "hw_flops_per_token": self.flops.hw_flops_per_token,
            "warmup": self.warmup,
            "log_every": self.log_every,
            "initial_step": self.first_step,
        }
        if self.measured_peak_flops is not None:
            info["measured_peak_tflops"] = self.measured_peak_flops / 1e12
        if self.flops.breakdown is not None:  # training FLOPs per token by component (docs/accounting.md)
            info["flops_by_component"] = dataclasses.asdict(self.flops.breakdown)
        try:
            counts = self.flops.params()
            if counts is not None:
                info.update(
                    params_total=counts.total, params_active=counts.active, params_trainable=counts.trainable
                )
        except Exception as exc:
            self._faults.fault("params", exc)
        return info
