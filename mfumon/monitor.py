"""The monitor: ties parameter counts, FLOPs, device peak and step timing together.

Data flows one way: model -> FLOPs per token (once, at setup) -> per step: tokens and one
device timestamp -> per log interval: resolved window, reduced across ranks once -> loggers.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from mfumon import metrics as K
from mfumon.errors import ConfigError, ConfigTypeError
from mfumon.loggers import Logger, LoggerSet, make_loggers, validate_logger_spec
from mfumon.metrics import EMPTY_WINDOW, Window, combine_ranks, window_metrics
from mfumon.timing import StepRecord, StepTimer

__all__ = ["Monitor", "monitor"]

_log = logging.getLogger("mfumon")
DEFAULT_WARMUP = 5
Tokens = int | float | torch.Tensor


def check_int(name: str, value: Any, what: str, *, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`, or ConfigError naming `name` and what it counts."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum} ({what}), got {value!r}")
    return int(value)


def _check_tokens(tokens: Any, name: str = "tokens") -> Tokens:
    """Validate a token count: a whole number >= 0 or a 0-d numeric tensor (checked for shape only)."""
    if type(tokens) is int:  # fast path
        if tokens < 0:
            raise ConfigError(f"{name} must be >= 0 (tokens processed in this step), got {tokens}")
        return tokens
    if isinstance(tokens, torch.Tensor):
        if tokens.numel() != 1 or tokens.dtype == torch.bool or tokens.is_complex():
            raise ConfigError(
                f"{name} must be a number or a one-element tensor such as attention_mask.sum(), "
                f"got a tensor of shape {tuple(tokens.shape)} and dtype {tokens.dtype}"
            )
        return tokens
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Real):
        raise ConfigTypeError(f"{name} must be a whole number of tokens (int or 0-d tensor), got {tokens!r}")
    if not math.isfinite(tokens) or tokens < 0 or float(tokens) != int(tokens):
        raise ConfigError(
            f"{name} must be a whole number >= 0 (tokens processed in this step), got {tokens!r}"
        )
    return int(tokens)


def default_run_name() -> str:
    """The run name used when none is given: mfumon-<date>-<time>."""
    return time.strftime("mfumon-%Y%m%d-%H%M%S")


def _model_device(model: nn.Module | None) -> torch.device:
    if model is not None:
        for p in model.parameters():
            if p.device.type != "meta":
                return p.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


class Monitor:
    """Live MFU/HFU, TFLOP/s, tokens/s and step time for a training loop.

    Call `step(tokens=...)` once per optimizer step (all micro-batches' tokens of this rank), or
    `micro_step(tokens=...)` per micro-batch and `step()` after the optimizer step. Every
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
        run_name: file stem for file loggers (default: mfumon-<date>-<time>).
        log_dir: directory for file loggers.
        flops_per_token: training FLOPs per token, overriding the count from `model`.
        causal: count attention with causal masking (default) or PaLM's full-matrix convention.
        convention: FLOP convention of `mfumon.flop_breakdown` ("mfumon", "6N", "palm", "chinchilla").
        doc_lengths: lengths of the documents packed into a typical batch (each <= seq_len), so the
            attention term is summed over documents, not the padded length; fixed at setup.
        recompute: what activation checkpointing re-runs, counted in HFU only: "auto" (found on the
            model at setup: enable checkpointing before building the monitor; then refined by
            watching the first training step, see `mfumon.recompute.RecomputeProbe`), "none", a
            fraction in [0, 1] of the model's forward FLOPs, or the checkpointed modules.
        device: device whose clock and peak are used (default: the model's).
        measure_ceiling: also time a large GEMM at start and log `mfumon/mfu_measured` against it.
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
    ) -> None:
        from mfumon import hardware  # local: keeps NVML out of import time

        self._log_every = check_int("log_every", log_every, "optimizer steps per log")
        self._warmup = check_int("warmup", warmup, "steps excluded from averages", minimum=0)
        logger_spec = validate_logger_spec(loggers)
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if model is not None and next(iter(model.parameters()), None) is None and flops_per_token is None:
            raise ConfigError("model has no parameters: pass the model you train, or flops_per_token=")
        self.model = model

        # FLOPs per token, counted once from the model's structure.
        self.seq_len: int | None = None
        self.breakdown: Any = None
        if flops_per_token is not None:
            self.flops_per_token = check_int("flops_per_token", flops_per_token, "training FLOPs per token")
            self.hw_flops_per_token = self.flops_per_token
            if seq_len is not None:
                self.seq_len = check_int("seq_len", seq_len, "tokens per sequence")
        elif model is None:
            raise ConfigError("pass the model you train (monitor(model, seq_len=...)) or flops_per_token=")
        else:
            if seq_len is None:
                raise ConfigError(
                    "seq_len is required: pass seq_len=<tokens per sequence> (e.g. seq_len=2048)"
                )
            self.seq_len = check_int("seq_len", seq_len, "tokens per sequence")
            from mfumon.flops import flop_breakdown

            self.breakdown = flop_breakdown(
                model,
                self.seq_len,
                causal=causal,
                convention=convention,
                doc_lengths=doc_lengths,
                recompute=recompute,
            )
            self.flops_per_token = int(self.breakdown.total)
            self.hw_flops_per_token = int(self.breakdown.hardware)

        self.device = torch.device(device) if device is not None else _model_device(model)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._dtype_given = dtype is not None
        detected = hardware.matmul_dtype(model) if dtype is None else hardware.normalize_dtype(dtype)
        self._peak_tflops = peak_tflops
        self.peak = hardware.resolve_peak(peak_tflops=peak_tflops, dtype=detected, device=self.device)
        self._measure_ceiling = bool(measure_ceiling)
        self.measured_peak_flops: float | None = None

        self.rank = _rank()
        self.run_name = run_name or default_run_name()
        self.log_dir = Path(log_dir)
        self._logger_spec = logger_spec
        self._loggers = LoggerSet([])
        self._loggers_built = False
        dist = torch.distributed
        if (dist.is_available() and dist.is_initialized()) or "RANK" in os.environ:
            self._build_loggers()  # the rank is known: file and W&B setup errors surface here

        self._timer = StepTimer(self.device)
        self._world = 1
        self._group: Any = None
        self._reduce_device = torch.device("cpu")
        self._step = 0
        self._logged_step = 0
        self._micro: Tokens | None = None
        self._total = EMPTY_WINDOW
        self._metrics: dict[str, float] = {}
        self._reported: set[str] = set()
        self._run_info_sent = False
        self._started = False
        self._closed = False
        self._hook: Any = None
        if model is not None and not self._dtype_given:
            self._hook = model.register_forward_pre_hook(self._detect_autocast)
        self._probe: Any = None  # watches the first step's backward for what checkpointing re-runs
        self._causal, self._convention, self._doc_lengths = causal, convention, doc_lengths
        self._late_checkpoint_check = model is not None and isinstance(recompute, str) and recompute == "auto"
        if model is not None and isinstance(recompute, str) and recompute == "auto" and self.breakdown:
            if self.breakdown.recompute:
                try:
                    from mfumon.recompute import RecomputeProbe

                    self._probe = RecomputeProbe(model)
                except Exception as exc:
                    self._fault("recompute", exc)

    # -- lifecycle -----------------------------------------------------------------------------
    def _build_loggers(self) -> None:
        """Build the loggers, on rank 0 only."""
        self._loggers_built = True
        if self.rank == 0:
            self._loggers = LoggerSet(
                make_loggers(self._logger_spec, run_name=self.run_name, log_dir=self.log_dir)
            )

    def start(self) -> Monitor:
        """Start timing; joins the process group's reduction when torch.distributed is initialized.

        Collective under torch.distributed: call it on every rank (the `with` block does).
        """
        if self._started:
            return self
        self._started = True
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            self._world = dist.get_world_size()
            self.rank = dist.get_rank()
            self._group = self._make_group()
        if not self._loggers_built:  # built here when the rank was not known at construction
            self._build_loggers()
        if self._measure_ceiling and self.device.type == "cuda":
            try:
                from mfumon import hardware

                self.measured_peak_flops = hardware.measure_peak_flops(self.peak.dtype, device=self.device)
            except Exception as exc:
                self._fault("measure_ceiling", exc)
        self._timer.start()
        return self

    def _make_group(self) -> Any:
        """A gloo group for the once-per-log reduction, so it never waits on the GPU queue."""
        dist = torch.distributed
        if dist.get_backend() == "gloo":
            return None
        try:
            return dist.new_group(backend="gloo")
        except Exception as exc:  # no gloo: reduce over the default group on the device instead
            self._fault("gloo_group", exc)
            self._reduce_device = self.device
            return None

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)

    def close(self, *, failed: bool = False) -> None:
        """Log the last partial window, write the summary and close the loggers (idempotent).

        Args:
            failed: the run is ending on an exception. Other ranks may never reach `close()`, so
                under torch.distributed the final cross-rank reduction is skipped.
        """
        if self._closed:
            return
        self._closed = True
        if self._hook is not None:
            self._hook.remove()
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        # After an exception other ranks may not reach close(): skip the collective then.
        if self._started and not (failed and self._world > 1):
            if self._step > self._logged_step or self._timer.pending or self._world > 1:
                # Steps carried over from the last log (unfinished on the GPU then) join the totals
                # but get no second window at the same step.
                self._log(final=True, emit=self._step > self._logged_step)
        self._loggers.call("log_summary", self.summary())
        self._loggers.call("close")

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
    def micro_step(self, *, tokens: Tokens) -> None:
        """Add the tokens of one micro-batch (gradient accumulation); `step()` closes the step."""
        tokens = _check_tokens(tokens)
        self._micro = tokens if self._micro is None else self._micro + tokens

    def step(self, *, tokens: Tokens | None = None) -> None:
        """Mark the end of one optimizer step that processed `tokens` on this rank.

        `tokens` is an int or a 0-d tensor (a device tensor is read at log time, never synced
        here), added to what `micro_step()` collected since the last step.
        """
        if tokens is not None:
            tokens = _check_tokens(tokens)
            if self._micro is not None:
                tokens = self._micro + tokens
        elif self._micro is not None:
            tokens = self._micro
        else:
            raise ConfigError(
                "step() needs tokens=<tokens in this optimizer step>, or micro_step(tokens=...) calls"
            )
        self._micro = None
        if not self._started:  # Monitor used without start(): this first step only starts the clock
            self._step += 1
            try:
                self.start()
            except Exception as exc:  # a monitor must never stop a training run
                self._fault("start", exc)
        else:
            self._step += 1
            try:
                self._timer.mark_step(self._step, tokens)
            except Exception as exc:  # a monitor must never stop a training run
                self._fault("timing", exc)
        if self._probe is not None:
            self._refine_recompute()
        elif self._late_checkpoint_check:
            self._check_late_checkpointing()
        if self._step % self._log_every == 0:
            self._log()

    def _check_late_checkpointing(self) -> None:
        """Once, at the first step: say so if checkpointing was switched on after setup."""
        self._late_checkpoint_check = False
        if self.breakdown is None or self.breakdown.recompute:
            return
        try:
            from mfumon.recompute import find_checkpointing

            if find_checkpointing(self.model).modules:  # type: ignore[arg-type]
                _log.warning(
                    "mfumon: activation checkpointing was enabled after the monitor was built, so HFU "
                    "counts no recompute; build the monitor after enabling it, or pass recompute="
                )
        except Exception as exc:
            self._fault("recompute", exc)

    def _refine_recompute(self) -> None:
        """Once a backward has run: recompute FLOPs from what it re-ran (early stop included)."""
        probe, model, seq_len = self._probe, self.model, self.seq_len
        try:
            observed = probe.result()
            if observed is None and not probe.forward_seen:
                return  # no training step through the checkpointed modules yet
            if observed is None:  # they ran, but nothing re-ran where hooks see it (torch.compile)
                _log.info("mfumon: no recompute seen in the backward pass; HFU keeps the structural count")
            elif model is not None and seq_len is not None:
                from mfumon.flops import flop_breakdown

                refined = flop_breakdown(
                    model,
                    seq_len,
                    causal=self._causal,
                    convention=self._convention,
                    doc_lengths=self._doc_lengths,
                    recompute=observed,
                )
                self.breakdown = replace(self.breakdown, recompute=refined.recompute)
                self.hw_flops_per_token = int(self.breakdown.hardware)
        except Exception as exc:  # keep the structural estimate
            self._fault("recompute", exc)
        probe.remove()
        self._probe = None

    # -- log time ------------------------------------------------------------------------------
    def _log(self, *, final: bool = False, emit: bool = True) -> None:
        warm, meas = EMPTY_WINDOW, EMPTY_WINDOW
        # Every rank reaches each collective below at the same step, whatever fails locally.
        upto = self._agree_finished_step() if self._world > 1 and not final else None
        try:
            warm, meas = self._local_windows(self._timer.resolve(wait=final, upto=upto))
        except Exception as exc:
            self._fault("timing", exc)
        warm, meas = self._reduce(warm, meas)
        self._logged_step = self._step
        try:
            self._emit(warm, meas, emit=emit)
        except Exception as exc:
            self._fault("metrics", exc)

    def _local_windows(self, records: list[StepRecord]) -> tuple[Window, Window]:
        """This rank's warm-up and measured windows from resolved steps (odd timings dropped)."""
        sums = [[0, 0.0, 0.0], [0, 0.0, 0.0]]  # [steps, tokens, seconds] for warm-up, measured
        for index, seconds, tokens in records:
            if seconds is None:
                continue  # started while paused: not timed
            if not (seconds > 0.0 and math.isfinite(seconds)) or not (tokens >= 0 and math.isfinite(tokens)):
                self._fault("timing", ValueError(f"step {index}: {seconds} s, {tokens} tokens"))
                continue
            acc = sums[index > self._warmup]
            acc[0] += 1
            acc[1] += tokens
            acc[2] += seconds
        warm, meas = (
            Window(n, tok, tok * self.flops_per_token, tok * self.hw_flops_per_token, sec)
            for n, tok, sec in sums
        )
        return warm, meas

    def _gather(self, values: list[list[float]]) -> list[list[list[float]]]:
        """All ranks' `values` (same shape on every rank), over the reduction group."""
        dist = torch.distributed
        local = torch.tensor(values, dtype=torch.float64, device=self._reduce_device)
        gathered = [torch.empty_like(local) for _ in range(self._world)]
        dist.all_gather(gathered, local, group=self._group)
        # Under gloo these are CPU tensors already; with a device group this waits, once per log.
        return [g.cpu().tolist() for g in gathered]  # host sync: once per log interval

    def _agree_finished_step(self) -> int | None:
        """The last step every rank's device has finished, so all ranks resolve the same steps."""
        try:
            finished = self._timer.finished_through(self._step)
        except Exception as exc:
            self._fault("timing", exc)
            finished = self._logged_step  # resolve nothing new on this round
        try:
            return int(min(row[0][0] for row in self._gather([[float(finished)]])))
        except Exception as exc:
            self._fault("distributed", exc)
            return None

    def _reduce(self, warm: Window, meas: Window) -> tuple[Window, Window]:
        if self._world == 1:
            return warm, meas
        try:
            rows = self._gather([_fields(warm), _fields(meas)])
            return (
                combine_ranks([Window(*r[0]) for r in rows], self._world),
                combine_ranks([Window(*r[1]) for r in rows], self._world),
            )
        except Exception as exc:
            self._fault("distributed", exc)
            return EMPTY_WINDOW, EMPTY_WINDOW

    def _emit(self, warm: Window, meas: Window, *, emit: bool = True) -> None:
        if not emit:
            self._total += meas
            return
        if not self._run_info_sent and (meas.steps or warm.steps):
            self._run_info_sent = True
            self._loggers.call("log_run_info", self.run_info())
        peak = self.peak.flops
        if meas.steps:
            self._total += meas
            out = window_metrics(
                meas, world_size=self._world, peak_flops=peak, measured_peak_flops=self.measured_peak_flops
            )
            total_mfu = window_metrics(self._total, world_size=self._world, peak_flops=peak).get(K.MFU)
            if total_mfu is not None:
                out[K.MFU_AVG] = total_mfu
            self._metrics = out
            self._loggers.call("log", dict(out), self._step)
        elif warm.steps:
            out = window_metrics(warm, world_size=self._world, peak_flops=peak)
            self._loggers.call("log_warmup", out, self._step, self._warmup)

    # -- results -------------------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, float]:
        """Metrics of the latest logged window (empty before the first post-warm-up log)."""
        return dict(self._metrics)

    def summary(self) -> dict[str, Any]:
        """Whole-run metrics over all timed steps after warm-up, plus run facts."""
        out: dict[str, Any] = dict(
            window_metrics(self._total, world_size=self._world, peak_flops=self.peak.flops)
        )
        if K.MFU in out:
            out[K.MFU_AVG] = out[K.MFU]
        out.update(
            steps=self._total.steps,
            tokens=self._total.tokens,
            seconds=self._total.seconds,
            last_step=self._step,
            warmup_steps=self._warmup,
            world_size=self._world,
            device=self.device_name,
            peak_dtype=self.peak.dtype,
            flops_per_token=self.flops_per_token,
            hw_flops_per_token=self.hw_flops_per_token,
        )
        return out

    @property
    def device_name(self) -> str:
        """The device's name as looked up (NVML / ROCm), or the torch device type."""
        return self.peak.device or self.device.type

    def run_info(self) -> dict[str, Any]:
        """Facts about the run sent to loggers once (device, dtype, peak, FLOPs, parameters)."""
        info: dict[str, Any] = {
            "device": self.device_name,
            "peak_dtype": self.peak.dtype,
            "peak_tflops": None if self.peak.flops is None else self.peak.flops / 1e12,
            "peak_source": self.peak.source,
            "world_size": self._world,
            "seq_len": self.seq_len,
            "flops_per_token": self.flops_per_token,
            "hw_flops_per_token": self.hw_flops_per_token,
            "warmup": self._warmup,
            "log_every": self._log_every,
        }
        if self.measured_peak_flops is not None:
            info["measured_peak_tflops"] = self.measured_peak_flops / 1e12
        if self.model is not None and self.breakdown is not None:
            try:
                from mfumon.params import count_params

                counts = count_params(self.model)
                info.update(params_total=counts.total, params_active=counts.active)
            except Exception as exc:
                self._fault("params", exc)
        return info

    # -- faults --------------------------------------------------------------------------------
    def _fault(self, kind: str, exc: BaseException) -> None:
        """Report a runtime fault once per kind; never raises."""
        if kind in self._reported:
            return
        self._reported.add(kind)
        _log.warning(
            "mfumon: %s fault (%s: %s); this part is skipped, training goes on", kind, type(exc).__name__, exc
        )

    def _guard(self, kind: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            self._fault(kind, exc)

    def _detect_autocast(self, module: nn.Module, args: Any) -> None:
        """One-shot forward pre-hook: the matmul dtype is the autocast dtype when autocast is on."""
        try:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            kind = self.device.type
            if torch.is_autocast_enabled(kind):
                from mfumon import hardware

                dtype = hardware.normalize_dtype(torch.get_autocast_dtype(kind))
                if dtype != self.peak.dtype:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the device was already reported at setup
                        self.peak = hardware.resolve_peak(
                            peak_tflops=self._peak_tflops, dtype=dtype, device=self.device
                        )
        except Exception as exc:
            self._fault("dtype", exc)


def _fields(w: Window) -> list[float]:
    return [float(w.steps), w.tokens, w.model_flops, w.hardware_flops, w.seconds]


def monitor(model: nn.Module | None = None, **options: Any) -> Monitor:
    """A `Monitor` for `model`, to use as `with mfumon.monitor(model, seq_len=...) as mon:`.

    Takes the keyword arguments of `Monitor`.
    """
    return Monitor(model, **options)
