"""One training step timed per component, with its FLOPs, bytes and roofline: `profile_step`.

The step is timed on the device timeline: a CUDA event (on the CPU, `time.perf_counter()`) at
every component boundary, forward and backward, read back with one sync after the step.

- Forward: a pre-hook and a hook on each timed module (`mfumon.roofline.component_map`).
- Backward: a module starts when the first gradient of its outputs is ready and ends when the
  gradients of all its inputs that need one are (`torch.autograd.graph.register_multi_grad_hook`);
  a module whose inputs need none (embeddings, the root) ends when its last parameter's gradient is
  accumulated (`register_post_accumulate_grad_hook`), else with the backward pass.
- The optimizer: every `torch.optim.Optimizer.step` in the step (the global step pre/post hooks).
- Each slice of time between two marks goes to the innermost open module (the most recently
  started when siblings overlap in backward) and its component; time with nothing open is
  "other" (data loading, host gaps, communication outside modules, zero_grad, grad clipping).
  The rows' seconds therefore add up to the step's.

A torch.compile'd model keeps the boundaries of its compiled modules, not what is inside them:
the components a compiled region holds are merged into one row named so (never guessed apart).
FLOPs and bytes per row, and the roofline: `mfumon.roofline`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from mfumon.devices import model_device
from mfumon.dtypes import matmul_dtype, normalize_dtype
from mfumon.errors import ConfigError, ConfigTypeError, check_int
from mfumon.flops import FlopBreakdown, flop_breakdown
from mfumon.roofline import (
    COMPONENTS,
    EXPERTS,
    OPTIMIZER,
    OTHER,
    ROUTER,
    component_costs,
    optimizer_bytes,
    roofline,
)
from mfumon.step_timer import StepRecorder

__all__ = ["ProfileRow", "StepProfile", "build_profile", "ceilings", "profile_step"]

_ELEMENT_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "fp4": 1}


@dataclass(frozen=True)
class ProfileRow:
    """One component of a profiled step: its FLOPs, bytes, device seconds and roofline."""

    name: str
    flops: float  # model FLOPs (forward + backward) of this component in the step
    bytes: float  # bytes moved by the analytic model of `mfumon.roofline`
    seconds: float  # device seconds attributed to it
    tflops: float | None = None  # achieved TFLOP/s (flops / seconds)
    intensity: float | None = None  # FLOPs per byte
    ceiling_tflops: float | None = None  # roofline ceiling: min(peak, intensity x bandwidth)
    fraction: float | None = None  # of the ceiling reached: least seconds / seconds
    time_lost: float | None = None  # seconds - max(flops / peak, bytes / bandwidth)
    note: str = ""


@dataclass(frozen=True)
class StepProfile:
    """One training step per component: `.rows`, `.seconds` (the whole step), `.table()`."""

    rows: tuple[ProfileRow, ...]
    seconds: float
    tokens: int
    peak_flops: float | None  # per-device peak FLOP/s the ceilings use (None: unknown)
    bandwidth: float | None  # memory bandwidth, bytes/s (None: unknown)
    device: str
    notes: tuple[str, ...] = field(default=())

    def row(self, name: str) -> ProfileRow | None:
        """The row named `name`, or None."""
        return next((r for r in self.rows if r.name == name), None)

    def sorted_rows(self) -> list[ProfileRow]:
        """Rows by time lost, largest first (rows with no time lost after, by seconds)."""
        return sorted(self.rows, key=lambda r: (r.time_lost is None, -(r.time_lost or r.seconds), -r.seconds))

    def table(self, limit: int = 24) -> str:
        """The rows as a printable table, sorted by time lost: the first row is where to work.

        At most `limit` rows (a model with many MoE layers has two rows per layer); the rest are
        counted in one line, and are all in `.rows` and the JSONL record.
        """
        width = max(len("component"), *(len(r.name) for r in self.rows)) + 2
        head = f"{'component':<{width}}{'ms':>9}{'% step':>8}{'GFLOP':>10}{'TFLOP/s':>9}{'FLOP/B':>8}"
        head += f"{'ceiling':>9}{'% ceil':>8}{'lost ms':>9}"
        lines = [head]
        ranked = self.sorted_rows()
        for r in ranked[:limit]:
            share = 100 * r.seconds / self.seconds if self.seconds > 0 else 0.0
            cells = [
                f"{r.name:<{width}}{r.seconds * 1e3:>9.3f}{share:>8.1f}{r.flops / 1e9:>10.4g}",
                _cell(r.tflops, 9, ".3g"),
                _cell(r.intensity, 8, ".3g"),
                _cell(r.ceiling_tflops, 9, ".4g"),
                _cell(None if r.fraction is None else 100 * r.fraction, 8, ".1f"),
                _cell(None if r.time_lost is None else r.time_lost * 1e3, 9, ".3f"),
            ]
            lines.append("".join(cells))
        if len(ranked) > limit:
            rest = ranked[limit:]
            lines.append(f"... {len(rest)} more rows, {sum(r.seconds for r in rest) * 1e3:.3f} ms together")
        peak = "unknown" if self.peak_flops is None else f"{self.peak_flops / 1e12:.4g} TFLOP/s"
        bw = "unknown" if self.bandwidth is None else f"{self.bandwidth / 1e9:.4g} GB/s"
        lines.append(
            f"step {self.seconds * 1e3:.3f} ms on {self.device}, {self.tokens} tokens; peak {peak}, "
            f"bandwidth {bw}"
        )
        lines += [f"note: {n}" for n in (*self.notes, *(f"{r.name}: {r.note}" for r in self.rows if r.note))]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The JSONL record's shape: seconds, rows, peak_tflops, bandwidth_gbs, tokens, device, notes."""
        return {
            "seconds": self.seconds,
            "rows": [{k: v for k, v in asdict(r).items() if v is not None and v != ""} for r in self.rows],
            "peak_tflops": None if self.peak_flops is None else self.peak_flops / 1e12,
            "bandwidth_gbs": None if self.bandwidth is None else self.bandwidth / 1e9,
            "tokens": self.tokens,
            "device": self.device,
            "notes": list(self.notes),
        }


def _cell(value: float | None, width: int, spec: str) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def build_profile(
    recorder: StepRecorder,
    seconds_by: dict[str, float],
    step_seconds: float,
    *,
    breakdown: FlopBreakdown,
    tokens: int,
    dtype: str,
    peak_flops: float | None,
    bandwidth: float | None,
    device: str,
) -> StepProfile:
    """Rows from the attributed seconds, the FLOP breakdown and the bytes model."""
    cmap = recorder.map
    costs = component_costs(cmap, breakdown, tokens=tokens, act_bytes=_ELEMENT_BYTES.get(dtype, 4))
    costs.bytes[OPTIMIZER] = optimizer_bytes(recorder.optimizers)
    notes = [f"{'device events' if recorder.cuda else 'host clock (CPU)'}; matmul dtype {dtype}"]
    if peak_flops is not None and bandwidth is None:
        notes.append("memory bandwidth unknown: ceilings and time lost are against the compute peak alone")
    if not recorder.optimizers:
        notes.append("no torch.optim optimizer stepped in this step: its time, if any, is in other")
    rows = []
    merged = sorted(cmap.merged)
    if merged:
        where = ", ".join(p or "the whole model" for p in cmap.compiled)
        name = "compiled: " + " + ".join(merged)
        secs = seconds_by.pop("compiled") + sum(seconds_by.pop(c) for c in merged)
        flops = sum(costs.flops[c] for c in merged)
        nbytes = sum(costs.bytes[c] for c in merged)
        note = f"torch.compile'd ({where}): these components run inside compiled code and are not separated"
        rows.append(_row(name, flops, nbytes, secs, peak_flops, bandwidth, note))
    for group, why in cmap.joined:
        parts = sorted(c for c in group if c in seconds_by)
        if len(parts) > 1:
            secs = sum(seconds_by.pop(c) for c in parts)
            flops = sum(costs.flops[c] for c in parts)
            nbytes = sum(costs.bytes[c] for c in parts)
            note = f"{why}: not separable"
            rows.append(_row(" + ".join(parts), flops, nbytes, secs, peak_flops, bandwidth, note))
    layers = moe_layer_seconds(recorder)
    for name in COMPONENTS:
        if name not in seconds_by:
            continue
        secs, flops, nbytes = seconds_by[name], costs.flops[name], costs.bytes[name]
        if name in layers:  # routed experts and router: a row per MoE layer, each an equal share of the work
            by_layer = layers[name]
            for path, layer_secs in by_layer.items():
                share = 1 / len(by_layer)
                row_name = f"{name} {path}"
                rows.append(
                    _row(row_name, flops * share, nbytes * share, layer_secs, peak_flops, bandwidth, "")
                )
            continue
        if secs > 0 or flops > 0 or name in (OPTIMIZER, OTHER):
            rows.append(_row(name, flops, nbytes, secs, peak_flops, bandwidth, ""))
    return StepProfile(tuple(rows), step_seconds, tokens, peak_flops, bandwidth, device, tuple(notes))


def moe_layer_seconds(recorder: StepRecorder) -> dict[str, dict[str, float]]:
    """Routed experts' and routers' seconds per MoE layer (by block path), for models with 2+ MoE layers.

    A unit's own time goes to the MoE block whose path holds it. Every MoE layer of a model has the
    same shapes, so each layer's row gets an equal share of the component's FLOPs and bytes.
    """
    blocks = [m.path for m in recorder.map.structure.moe] if recorder.map.structure is not None else []
    if len(blocks) < 2 or recorder.map.merged:
        return {}
    out: dict[str, dict[str, float]] = {
        EXPERTS: dict.fromkeys(blocks, 0.0),
        ROUTER: dict.fromkeys(blocks, 0.0),
    }
    for unit, secs in recorder.unit_seconds.items():
        path, _, label = recorder.units[unit]
        block = max((b for b in blocks if path == b or path.startswith(b + ".")), key=len, default=None)
        if label in out and block is not None:
            out[label][block] += secs
    return out


def _row(
    name: str, flops: float, nbytes: float, secs: float, peak: float | None, bw: float | None, note: str
) -> ProfileRow:
    return ProfileRow(
        name, float(flops), float(nbytes), secs, **roofline(flops, nbytes, secs, peak, bw), note=note
    )


def profile_step(
    model: nn.Module,
    step_fn: Callable[[], Any],
    *,
    seq_len: int,
    tokens: int,
    peak_tflops: float | None = None,
    bandwidth_gbs: float | None = None,
    dtype: str | torch.dtype | None = None,
    device: torch.device | str | None = None,
    breakdown: FlopBreakdown | None = None,
) -> StepProfile:
    """Run `step_fn` (forward, backward, optimizer step) once, timed per component (module docstring).

    Args:
        seq_len: tokens per sequence (the attention FLOPs depend on it).
        tokens: tokens the step processes on this device (all micro-batches).
        peak_tflops, bandwidth_gbs: the roofline's ceilings; default: the device's datasheet
            (none on a CPU: then no ceiling, and the table sorts by seconds).
        dtype: the matmul dtype (for the peak and bytes per activation); default: autocast or parameters.
        breakdown: FLOPs per token by component (default: `flop_breakdown(model, seq_len)`).
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(step_fn):
        raise ConfigTypeError("step_fn must be a function running one training step: forward, backward, step")
    tokens = check_int("tokens", tokens, "tokens the step processes on this device")
    check_int("seq_len", seq_len, "tokens per sequence")
    target = model_device(model, device) or torch.device("cpu")
    canonical = (
        normalize_dtype(dtype) if dtype is not None else matmul_dtype(getattr(model, "_orig_mod", model))
    )
    peak, bandwidth = ceilings(target, canonical, peak_tflops, bandwidth_gbs)
    flops = breakdown or flop_breakdown(getattr(model, "_orig_mod", model), seq_len, recompute="none")
    recorder = StepRecorder(model, target)
    recorder.arm()
    try:
        step_fn()
    except BaseException:
        recorder.remove()  # the caller's error, raised as is, with no hook left behind
        raise
    by, total = recorder.finish()  # the end mark first, then the hooks go
    name = torch.cuda.get_device_name(target) if recorder.cuda else target.type
    return build_profile(
        recorder,
        by,
        total,
        breakdown=flops,
        tokens=tokens,
        dtype=canonical,
        peak_flops=peak,
        bandwidth=bandwidth,
        device=name,
    )


def ceilings(
    device: torch.device, dtype: str, peak_tflops: float | None, bandwidth_gbs: float | None
) -> tuple[float | None, float | None]:
    """The roofline's peak FLOP/s and bandwidth bytes/s: the given ones, else the device's datasheet."""
    for value, name in ((peak_tflops, "peak_tflops"), (bandwidth_gbs, "bandwidth_gbs")):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        ):
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    peak = None if peak_tflops is None else peak_tflops * 1e12
    bandwidth = None if bandwidth_gbs is None else bandwidth_gbs * 1e9
    if device.type == "cuda":
        from mfumon.hardware import memory_bandwidth, peak_flops

        peak = peak if peak is not None else peak_flops(dtype=dtype, device=device)
        bandwidth = bandwidth if bandwidth is not None else memory_bandwidth(device=device)
    return peak, bandwidth


class MonitorProfiler:
    """`Monitor(profile_every=N)`: profiles step k x N (k >= 1, after warm-up) inside a running monitor.

    At the end of step k x N - 1, after its log, it arms the hooks and tells the timer to leave the
    next step out of the MFU windows and the wall time; at the end of step k x N it reads the marks
    (one sync), removes the hooks and sends the profile to the loggers (`Logger.log_profile`). A
    profiled step that held a pause (evaluation, checkpointing) is void: the next step is profiled
    instead. Steps in between run with no hook. A failure is reported once and switches profiling
    off; training goes on.
    """

    def __init__(self, every: int, monitor: Any) -> None:
        # 1 would profile every step: no step left in the MFU windows, no MFU at all
        self.every = check_int("profile_every", every, "optimizer steps per profiled step", minimum=2)
        self._mon = monitor  # the Monitor: its model, FLOP model, timer, windows, faults, device
        self._recorder: Any = None  # a StepRecorder, built at the first profiled step
        self.off = False
        self.profiles = 0  # profiles sent to the loggers
        self.last: StepProfile | None = None

    def after_step(self, step: int, tokens: Any) -> None:
        """Called at the end of every optimizer step `step` (its `tokens`: an int or a 0-d tensor),
        after the timer marked it; never raises."""
        if self.off:
            return
        mon = self._mon
        try:
            again = False
            if self._recorder is not None and self._recorder.armed:
                if mon._timer.last_paused:  # paused time is no component's: profile the next step
                    self._recorder.remove()
                    again = True
                else:
                    self._finish(step, tokens)
            if again or (step + 1) % self.every == 0 and step + 1 > mon._windows.first_step + mon._warmup:
                if self._recorder is None:
                    self._recorder = StepRecorder(mon.model, mon.device)
                self._recorder.arm()
                mon._timer.untime_next()
        except Exception as exc:  # a monitor must never stop a training run
            self.remove()
            self.off = True
            mon._faults.fault("profile", exc, "step profiling is switched off, training goes on")

    def _finish(self, step: int, tokens: Any) -> None:
        mon, recorder = self._mon, self._recorder
        by, total = recorder.finish()  # host sync: once, after the profiled step
        count = round(float(tokens))  # a device count is ready: the step's work has been waited for
        peak = mon.peak
        breakdown = mon.flops.breakdown or flop_breakdown(mon.model, mon.flops.seq_len, recompute="none")
        _, bandwidth = ceilings(mon.device, peak.dtype, None, None)
        profile = build_profile(
            recorder,
            by,
            total,
            breakdown=breakdown,
            tokens=count,
            dtype=peak.dtype,
            peak_flops=peak.flops,
            bandwidth=bandwidth,
            device=mon.device_name,
        )
        if mon.flops.breakdown is None:  # flops_per_token= was given: the rows split the model's own count
            note = "FLOPs per row from the model's structure, not the flops_per_token= the monitor was given"
            profile = replace(profile, notes=(*profile.notes, note))
        self.last = profile
        self.profiles += 1
        mon._windows.loggers.call("log_profile", profile, step)

    def remove(self) -> None:
        """Remove any hooks still armed (at close, or after a fault)."""
        if self._recorder is not None:
            self._recorder.remove()


def monitor_profiler(every: int | None, monitor: Any) -> MonitorProfiler | None:
    """The monitor's profiler for `profile_every=every`, or None when off; ConfigError without a model."""
    if every is None:
        return None
    if monitor.model is None:
        raise ConfigError("profile_every needs the model: pass Monitor(model, profile_every=N)")
    if monitor.flops.seq_len is None and monitor.flops.breakdown is None:
        raise ConfigError("profile_every needs seq_len=<tokens per sequence> to split the FLOPs")
    return MonitorProfiler(every, monitor)
