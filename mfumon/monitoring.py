"""The monitor: ties the FLOP model, the device peak, step timing and the loggers together.

Data flows one way: model -> FLOPs per token (once, at setup: `FlopModel`) -> per step: tokens,
the step's own shapes if given (`StepInput`) and one device timestamp (`StepTimer`) -> per log
interval: resolved windows, reduced across ranks once (`Reducer`) -> loggers.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from mfumon.devices import model_device
from mfumon.distributed import Reducer, initialized, rank_world
from mfumon.dtypes import matmul_dtype, normalize_dtype
from mfumon.errors import ConfigTypeError, FaultLog, check_int
from mfumon.flop_model import FlopModel
from mfumon.hardware import autocast_peak, mixed_peak, resolve_peak
from mfumon.ledger import Ledger, Source
from mfumon.loggers import Logger, LoggerSet, make_loggers, validate_logger_spec
from mfumon.profiling import monitor_profiler
from mfumon.steps import Lengths, StepInput, Tokens, check_tokens
from mfumon.timing import StepTimer
from mfumon.windows import Windows

__all__ = ["DEFAULT_WARMUP", "Monitor", "Tokens", "check_tokens", "default_run_name", "monitor"]

DEFAULT_WARMUP = 5


class Monitor:
    """Live MFU/HFU, TFLOP/s, tokens/s and step time for a training loop.

    Call `step(tokens=...)` once per optimizer step (all micro-batches' tokens of this rank), or
    `micro_step(tokens=...)` per micro-batch and `step()` after the optimizer step; either takes the
    step's own `doc_lengths=` or `seq_len=` for its attention FLOPs. Every
    `log_every` steps the finished steps are reduced across ranks (once) and sent to the
    loggers. Use as a context manager, or call `start()` and `close()` yourself.

    Args:
        model: the model being trained; its structure gives the FLOPs per token (counted once).
        seq_len: tokens per sequence (the attention term depends on it).
        log_every: optimizer steps per log window.
        warmup: first steps excluded from averages (compilation, allocator warm-up).
        loggers: names from `mfumon.loggers.LOGGER_NAMES` and/or `Logger` instances; only rank 0 logs.
        peak_tflops: per-device dense peak TFLOP/s, overriding the device table.
        dtype: matmul dtype for the peak ("bf16", "fp16", "tf32", ...); detected when None.
        run_name, log_dir: file stem (default: mfumon-<date>-<time>) and directory of file loggers.
        flops_per_token: training FLOPs per token, overriding the count from `model`.
        causal: count attention with causal masking (default) or PaLM's full-matrix convention.
        convention: FLOP convention of `mfumon.flop_breakdown` ("mfumon", "6N", "palm", "chinchilla").
        doc_lengths: documents packed into a typical batch (each <= seq_len): attention per document.
        recompute: what activation checkpointing re-runs, for HFU only: "auto" (found at setup, then
            watched in the first step: enable checkpointing before building the monitor), "none", a
            fraction in [0, 1] of the forward FLOPs, or the checkpointed modules (docs/hfu.md).
        device: device whose clock and peak are used (default: the model's).
        measure_ceiling: also time a large GEMM at start and log `mfumon/mfu_measured` against it.
        initial_step: optimizer steps done before (a resumed run): its steps count on from there.
        self_check: trace one step on fake tensors at setup; warn if the count misses a part.
        device_stats: NVML clock, power and energy; allocator memory (its peak reset per window).
        expert_load: MoE models: count tokens per expert from the routers' own top-k (on the device).
        profile_every: profile one step in N per component (`mfumon.profile_step`), out of the windows.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        seq_len: int | None = None,
        log_every: int = 10,
        warmup: int = DEFAULT_WARMUP,
        loggers: Iterable[str | Logger] | str | Logger | None = ("stdout", "jsonl"),
        peak_tflops: float | None = None,
        dtype: str | torch.dtype | None = None,
        run_name: str | None = None,
        log_dir: str | os.PathLike[str] = "runs",
        flops_per_token: int | None = None,
        causal: bool = True,
        convention: str = "mfumon",
        doc_lengths: Iterable[int] | torch.Tensor | None = None,
        recompute: Any = "auto",
        device: torch.device | str | None = None,
        measure_ceiling: bool = False,
        initial_step: int = 0,
        self_check: bool = True,
        device_stats: bool = True,
        expert_load: bool = True,
        profile_every: int | None = None,
    ) -> None:
        self._log_every = check_int("log_every", log_every, "optimizer steps per log")
        self._warmup = check_int("warmup", warmup, "steps excluded from averages", minimum=0)
        self._logger_spec: list[str | Logger] | None = validate_logger_spec(loggers)  # None: built
        self._step = check_int("initial_step", initial_step, "optimizer steps done before", minimum=0)
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._faults = FaultLog()
        self.flops = FlopModel(
            model,
            seq_len=seq_len,
            flops_per_token=flops_per_token,
            causal=causal,
            convention=convention,
            doc_lengths=doc_lengths,
            recompute=recompute,
            faults=self._faults,
            self_check=self_check,
        )
        self.device = _device(device, model)
        self._peak_tflops = peak_tflops
        self._measure_ceiling = bool(measure_ceiling) and self.device.type in ("cuda", "cpu")
        detected = matmul_dtype(model) if dtype is None else normalize_dtype(dtype)
        peak = resolve_peak(
            peak_tflops=peak_tflops, dtype=detected, device=self.device, measured=self._measure_ceiling
        )
        peak = mixed_peak(peak, self.flops, device=self.device, follow_autocast=dtype is None)
        self.rank = rank_world()[0]
        self.run_name = run_name or default_run_name()
        self.log_dir = Path(log_dir)
        self._timer = StepTimer(self.device)
        self._reducer = Reducer(self._faults)
        self._windows = Windows(
            timer=self._timer,
            reducer=self._reducer,
            flops=self.flops,
            peak=peak,
            warmup=self._warmup,
            log_every=self._log_every,
            device_type=self.device.type,
            faults=self._faults,
            first_step=self._step,
        )
        if initialized() or "RANK" in os.environ:
            self._build_loggers()  # the rank is known: file and W&B setup errors surface here
        self._input = StepInput(self.flops)  # tokens and shapes until step() closes the step
        self._started = self._closed = False
        self._profiler = monitor_profiler(profile_every, self)  # None unless profile_every= is given
        # Hooks and threads go on last: nothing after them can fail (a failed setup leaves none).
        peak_now = functools.partial(_peak_now, self)  # the peak at log time (autocast may change it)
        sources = _sources(model, self.device, device_stats, expert_load, self._faults, peak_now)
        self._windows.ledger = Ledger(sources, self._faults)
        self._hook: Any = None  # one-shot: the autocast dtype at the first forward
        if model is not None and peak.pending:  # the autocast dtype, Transformer Engine's FP8
            self._hook = model.register_forward_pre_hook(functools.partial(_detect_autocast, self))
        self._input_hooks = _watch_first_forward(model, self._timer)  # input wait: one mark per step
        self.flops.watch_first_step()

    seq_len = property(lambda self: self.flops.seq_len, doc="Tokens per sequence (None if not given).")
    breakdown = property(lambda self: self.flops.breakdown, doc="FLOPs per token by component.")
    flops_per_token = property(lambda self: self.flops.flops_per_token, doc="Model FLOPs per token.")
    hw_flops_per_token = property(lambda self: self.flops.hw_flops_per_token, doc="With recompute.")
    measured_peak_flops = property(lambda self: self._windows.measured_peak_flops, doc="GEMM ceiling.")
    peak = property(lambda self: self._windows.peak, doc="The per-device peak MFU divides by (PeakInfo).")

    # -- lifecycle -----------------------------------------------------------------------------
    def _build_loggers(self) -> None:
        """Build the loggers once, on rank 0 only."""
        spec, self._logger_spec = self._logger_spec, None
        if spec is not None and self.rank == 0:
            self._windows.loggers = LoggerSet(
                make_loggers(spec, run_name=self.run_name, log_dir=self.log_dir)
            )

    def start(self) -> Monitor:
        """Start timing; under torch.distributed, join the once-per-log reduction: a collective, so
        call it on every rank (the `with` block does)."""
        if self._started:
            return self
        self._started = True
        rank = self._reducer.join(self.device, self._windows.signature)
        self.rank = self.rank if rank is None else rank
        self._build_loggers()  # here when the rank was not known at construction
        if self._measure_ceiling and not self.peak.pending:  # pending: dtype known at the first forward
            self._windows.measure_ceiling(self.device)
        self._windows.ledger.start()
        self._timer.start()
        return self

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)

    def close(self, *, failed: bool = False) -> None:
        """Log the last partial window, write the summary and close the loggers (idempotent).

        `failed`: the run ends on an exception; other ranks may never reach `close()`, so under
        torch.distributed the final cross-rank reduction is skipped.
        """
        if self._closed:
            return
        self._closed = True
        if self._hook is not None:
            self._hook.remove()
        for hook in (*self._input_hooks, *filter(None, [self._profiler])):
            hook.remove()
        self.flops.close()
        self._windows.finish(self._step, started=self._started, failed=failed)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Exclude the enclosed time (evaluation, checkpointing) from every step."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def pause(self) -> None:
        """Stop timing until `resume()`."""
        self._guard("timing", self._timer.pause)

    def resume(self) -> None:
        """Resume timing after `pause()`."""
        self._guard("timing", self._timer.start)

    # -- per step ------------------------------------------------------------------------------
    def micro_step(
        self, *, tokens: Tokens, doc_lengths: Lengths | None = None, seq_len: int | None = None
    ) -> None:
        """Add one micro-batch (gradient accumulation): its tokens and shapes as for `step()`."""
        self._input.add(tokens, doc_lengths, seq_len)

    def step(
        self, *, tokens: Tokens | None = None, doc_lengths: Lengths | None = None, seq_len: int | None = None
    ) -> None:
        """Mark the end of one optimizer step that processed `tokens` on this rank.

        `tokens` is an int or a 0-d tensor (a device tensor is read at log time, never synced
        here), added to what `micro_step()` collected since the last step. `doc_lengths` (the
        documents packed into it: a list or 1-D integer tensor, any device) or `seq_len` (its rows'
        length) set its attention FLOPs, computed on their device and read at log time.
        """
        extra, plain = None, type(tokens) is int and tokens >= 0 and doc_lengths is seq_len is None
        if not plain or self._input.pending is not None:  # a plain count needs no call: the hot path
            tokens, extra = self._input.take(tokens, doc_lengths, seq_len)
        self._step += 1
        if not self._started:  # Monitor used without start(): this first step only starts the clock
            self._guard("start", self.start)
        else:
            try:
                self._timer.mark_step(self._step, tokens, extra)
            except Exception as exc:  # a monitor must never stop a training run
                self._faults.fault("timing", exc)
        self.flops.after_step()
        if self._step % self._log_every == 0:
            self._windows.log(self._step)
        if self._profiler is not None and self._started:  # after the log; never raises
            self._profiler.after_step(self._step, tokens)

    # -- results -------------------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, float]:
        """Metrics of the latest logged window (empty before the first post-warm-up log)."""
        return dict(self._windows.metrics)

    def summary(self) -> dict[str, Any]:
        """Whole-run metrics over all timed steps after warm-up, plus run facts."""
        return self._windows.summary(self._step)

    @property
    def device_name(self) -> str:
        """The device's name as looked up (NVML / ROCm), or the torch device type."""
        return self._windows.device_name

    def run_info(self) -> dict[str, Any]:
        """Facts about the run sent to loggers once (device, dtype, peak, FLOPs, parameters)."""
        return self._windows.run_info()

    # -- faults --------------------------------------------------------------------------------
    def _guard(self, kind: str, fn: Any) -> None:
        """Run `fn`; a fault is reported once per kind and never raised (a running job is never harmed)."""
        try:
            fn()
        except Exception as exc:
            self._faults.fault(kind, exc)


def _detect_autocast(mon: Monitor, module: nn.Module, args: Any) -> None:
    """One-shot forward pre-hook: the matmul dtype is the autocast dtype when autocast is on."""
    try:
        mon._hook.remove()
        mon._windows.peak = autocast_peak(mon.peak, peak_tflops=mon._peak_tflops, device=mon.device)
        if mon._measure_ceiling and mon._started and mon.measured_peak_flops is None:
            mon._timer.pause()  # inside the first step: its time is not the step's
            mon._windows.measure_ceiling(mon.device)  # in the dtype the matmuls run in, now known
            mon._timer.start()
    except Exception as exc:
        mon._faults.fault("dtype", exc)


def _peak_now(mon: Monitor) -> float | None:
    """The per-device peak FLOP/s MFU divides by now (None: unknown)."""
    return mon.peak.flops


def _watch_first_forward(model: nn.Module | None, timer: StepTimer) -> list[Any]:
    """Forward pre-hooks marking each step's first forward (its input wait ends there).

    On the root and its direct children: a Lightning module's training_step often calls a child,
    not itself. A hook costs one flag check per call; only the first call of a step records a mark.
    """
    if model is None:
        return []
    return [m.register_forward_pre_hook(timer.forward_pre_hook) for m in (model, *model.children())]


def _sources(
    model: nn.Module | None,
    device: torch.device,
    device_stats: bool,
    expert_load: bool,
    faults: FaultLog,
    peak_flops: Callable[[], float | None],
) -> list[Source]:
    """The ledger's log-time sources for this run (each finds out at setup whether it can measure)."""
    found: list[Source] = []
    if device_stats:
        from mfumon.health import device_sources

        found += device_sources(device, faults, peak_flops)
    if expert_load and model is not None:
        from mfumon.expert_load import expert_load_source

        source = expert_load_source(model, faults)
        if source is not None:
            found.append(source)
    return found


def default_run_name() -> str:
    """The run name used when none is given: mfumon-<date>-<time>."""
    return time.strftime("mfumon-%Y%m%d-%H%M%S")


def _device(device: torch.device | str | None, model: nn.Module | None) -> torch.device:
    """The device whose clock and peak are used: `device`, else the model's first real parameter's,
    else the current CUDA device where there is one, else the CPU."""
    found = model_device(model, device)
    if found is None and torch.cuda.is_available():
        found = torch.device("cuda", torch.cuda.current_device())
    return found if found is not None else torch.device("cpu")


def monitor(model: nn.Module | None = None, **options: Any) -> Monitor:
    """A `Monitor` for `model`, to use as `with mfumon.monitor(model, seq_len=...) as mon:`.

    Takes the keyword arguments of `Monitor`.
    """
    return Monitor(model, **options)
