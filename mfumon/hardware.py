"""What is this device's dense peak for the dtype its matmuls run in?

The peak is an exact lookup of the device's driver name (`mfumon.devices`) in
``mfumon._peaks.PEAKS``, scaled by its MIG share; a user-given peak overrides it, and
`measure_peak_flops` (`mfumon.ceiling`, re-exported here) times the achievable ceiling. A model
whose matmuls run in more than one dtype (FP8 linears, found by `mfumon.precision`) gets the
FLOP-weighted peak (`mixed_peak`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from mfumon._peaks import DevicePeak, lookup, lookup_bandwidth
from mfumon.ceiling import measure_bandwidth, measure_peak_flops
from mfumon.devices import DeviceIdentity, device_name, identify_device
from mfumon.dtypes import matmul_dtype, normalize_dtype
from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning, log
from mfumon.precision import Precision, find_precision

if TYPE_CHECKING:
    from mfumon.flop_model import FlopModel

__all__ = [  # device naming and dtypes live in mfumon.devices and mfumon.dtypes; 0.1 had them here
    "DeviceIdentity",
    "device_name",
    "identify_device",
    "matmul_dtype",
    "normalize_dtype",
    "ENV_PEAK_TFLOPS",
    "TERA",
    "PeakInfo",
    "autocast_peak",
    "measure_bandwidth",
    "measure_peak_flops",
    "memory_bandwidth",
    "mixed_peak",
    "peak_flops",
    "peak_override_flops",
    "resolve_peak",
]

ENV_PEAK_TFLOPS = "MFUMON_PEAK_TFLOPS"
TERA = 1e12
_OVERRIDES = ("peak_tflops argument", ENV_PEAK_TFLOPS)  # PeakInfo.source of a user-given peak


def _table_flops(row: DevicePeak | None, dtype: str) -> float | None:
    if row is None or dtype not in row.tflops:
        return None
    return row.tflops[dtype] * TERA


def peak_flops(
    device_name: str | None = None,
    dtype: str | torch.dtype = "bf16",
    *,
    device: torch.device | int | str | None = None,
    nvml: Any = None,
) -> float | None:
    """Dense peak FLOP/s for matmuls in `dtype`; None for an unknown device or a dtype it lacks.

    With no `device_name`, the device behind `device` (default: the current one), scaled by its
    MIG share of the full GPU.
    """
    canonical = normalize_dtype(dtype)
    if device_name is not None:
        if not isinstance(device_name, str):
            raise ConfigTypeError(
                f"device_name must be a str such as 'NVIDIA H100 80GB HBM3', got {device_name!r}"
            )
        return _table_flops(lookup(device_name), canonical)
    ident = identify_device(device, nvml=nvml)
    if ident.name is None or ident.share is None:
        return None
    flops = _table_flops(lookup(ident.name), canonical)
    return None if flops is None else flops * ident.share


def memory_bandwidth(
    device_name: str | None = None, *, device: torch.device | int | str | None = None, nvml: Any = None
) -> float | None:
    """Datasheet memory bandwidth of one device in bytes/s; None when unknown, and for a MIG slice or
    partition (its share of the memory system is not its share of the SMs).

    With no `device_name`, the device behind `device` (default: the current one).
    """
    if device_name is not None:
        if not isinstance(device_name, str):
            raise ConfigTypeError(
                f"device_name must be a str such as 'NVIDIA H100 80GB HBM3', got {device_name!r}"
            )
        row = lookup_bandwidth(device_name)
        return None if row is None else row.gbs * 1e9
    ident = identify_device(device, nvml=nvml)
    if ident.name is None or (ident.reported is not None and ident.reported != ident.name):
        return None
    row = lookup_bandwidth(ident.name)
    return None if row is None else row.gbs * 1e9


@dataclass(frozen=True)
class PeakInfo:
    """The per-device peak the monitor divides by, and where it came from.

    With matmuls in more than one dtype (FP8 linears beside bf16 attention), `flops` is weighted by
    the FLOPs each runs, sum(flops) / sum(flops_i / peak_i); `mix` holds the shares and `dtype`
    the dtype with the largest one. A user-given peak is never weighted (`weighted` is False).
    """

    device: str | None  # the name the device reports (a MIG slice's own name); None on CPU
    dtype: str  # canonical matmul dtype (with a mix: the one running the most FLOPs)
    flops: float | None  # dense peak FLOP/s per device; None: unknown, no MFU
    source: str  # "peak_tflops argument", "MFUMON_PEAK_TFLOPS", a datasheet URL, or "" when unknown
    scale: float = 1.0  # MIG share applied to the table peak
    product: str | None = None  # table row's product name when the table was used
    mix: tuple[tuple[str, float], ...] = ()  # (dtype, share of model FLOPs), largest first; () for one dtype
    fallback: str = ""  # a dtype the device has no peak for, and the peak that stood in for it
    plan: Precision | None = field(default=None, compare=False, repr=False)  # FLOPs per dtype found

    @property
    def tflops(self) -> float | None:
        """The peak in TFLOP/s per device; None when unknown."""
        return None if self.flops is None else self.flops / TERA

    @property
    def weighted(self) -> bool:
        """True when `flops` is weighted over more than one dtype's table peak."""
        return bool(self.mix) and self.flops is not None and self.source not in _OVERRIDES

    @property
    def pending(self) -> bool:
        """True while the first forward decides part of it (autocast dtype, Transformer Engine FP8)."""
        return self.plan is not None and self.plan.pending

    @property
    def label(self) -> str:
        """The dtype, or the mix as people read it: "fp8 83% / bf16 17%"."""
        if not self.mix:
            return self.dtype
        return " / ".join(f"{dtype} {share * 100:.0f}%" for dtype, share in self.mix)

    def mix_facts(self) -> dict[str, Any]:
        """Run facts of a mix ({} for one dtype): peak_mix (dtype -> FLOP share), peak_weighted, ..."""
        if not self.mix:
            return {}
        facts: dict[str, Any] = {"peak_mix": dict(self.mix), "peak_weighted": self.weighted}
        return {**facts, "peak_fallback": self.fallback} if self.fallback else facts


def _positive_tflops(value: object, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"{what} must be a positive number of TFLOP/s per device (e.g. 989.5), got {value!r}"
        )
    return float(value)


def peak_override_flops(peak_tflops: float | None) -> tuple[float, str] | None:
    """A user-given peak in FLOP/s and its origin: `peak_tflops`, else MFUMON_PEAK_TFLOPS; else None.

    Raises ConfigError for a value that is not a positive number (call it at setup).
    """
    if peak_tflops is not None:
        return _positive_tflops(peak_tflops, "peak_tflops") * TERA, "peak_tflops argument"
    env = os.environ.get(ENV_PEAK_TFLOPS)
    if env is None or not env.strip():
        return None
    try:
        value: object = float(env)
    except ValueError:
        value = env
    return _positive_tflops(value, f"environment variable {ENV_PEAK_TFLOPS}") * TERA, ENV_PEAK_TFLOPS


def resolve_peak(
    *,
    peak_tflops: float | None,
    dtype: str | torch.dtype,
    device: torch.device | int | str | None,
    nvml: Any = None,
    stacklevel: int = 2,
    measured: bool = False,
) -> PeakInfo:
    """Peak to divide by: `peak_tflops` > MFUMON_PEAK_TFLOPS > table peak of the device (x MIG share).

    Bad `peak_tflops`, env value or dtype raise ConfigError. An unknown device or dtype gives
    flops=None and one MfumonWarning (`measured`: saying MFU is against the measured GEMM ceiling
    instead); NVML faults are logged once, never raised.
    """
    canonical = normalize_dtype(dtype)
    override = peak_override_flops(peak_tflops)
    ident = identify_device(device, nvml=nvml)
    if override is not None:
        return PeakInfo(device=ident.reported, dtype=canonical, flops=override[0], source=override[1])
    hint = f"pass peak_tflops=<dense {canonical} TFLOP/s per device> or set {ENV_PEAK_TFLOPS}"
    no_mfu = "no datasheet MFU (MFU against the measured GEMM ceiling instead)" if measured else "no MFU"
    if ident.name is None:
        if ident.problem is None:
            message = f"mfumon: device {str(device)!r} is not a GPU, so no peak and {no_mfu}; {hint}"
        else:
            message = f"mfumon: could not name device {device!r}: {ident.problem}; {no_mfu}; {hint}"
        warnings.warn(message, MfumonWarning, stacklevel=stacklevel)
        return PeakInfo(device=None, dtype=canonical, flops=None, source="")
    row = lookup(ident.name)
    if row is not None and canonical == "tf32" and "tf32" not in row.tflops and "fp32" in row.tflops:
        canonical = (
            "fp32"  # no TF32 tensor cores (Volta, Turing): allowing TF32 leaves fp32 matmuls as they are
        )
    seen = repr(ident.name) if ident.reported == ident.name else f"{ident.reported!r} (on {ident.name!r})"
    if row is None:
        message = f"mfumon: unknown device {seen}: no peak, {no_mfu} (mfumon never guesses); {hint}"
    elif canonical not in row.tflops:
        have = ", ".join(row.tflops)
        message = f"mfumon: {row.product} has no published {canonical} peak (it has {have}); {no_mfu}; {hint}"
    elif ident.share is None:
        message = f"mfumon: MIG device {seen}: unknown SM share of the full GPU, {no_mfu}; {hint}"
    else:
        flops = row.tflops[canonical] * TERA * ident.share
        return PeakInfo(ident.reported, canonical, flops, row.source, scale=ident.share, product=row.product)
    warnings.warn(message, MfumonWarning, stacklevel=stacklevel)
    return PeakInfo(device=ident.reported, dtype=canonical, flops=None, source="")


def autocast_peak(
    peak: PeakInfo, *, peak_tflops: float | None, device: torch.device, nvml: Any = None
) -> PeakInfo:
    """`peak` as the first forward shows it: the autocast dtype when followed, Transformer Engine's FP8.

    Called inside the first forward, so it warns nothing (a missing fp8 peak goes to the log once):
    the device was reported at setup. Without a plan, `peak` for the autocast dtype when autocast is
    on for `device` and differs.
    """
    plan = peak.plan
    if plan is not None:
        seen = plan.at_first_forward(device.type)
        if (seen.base, seen.te) == (plan.base, plan.te):
            return replace(peak, plan=seen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = resolve_peak(peak_tflops=peak_tflops, dtype=seen.base, device=device, nvml=nvml)
        return _weigh(base, seen, device=device, nvml=nvml, stacklevel=0)
    if not torch.is_autocast_enabled(device.type):
        return peak
    dtype = normalize_dtype(torch.get_autocast_dtype(device.type))
    if dtype == peak.dtype:
        return peak
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_peak(peak_tflops=peak_tflops, dtype=dtype, device=device)


def mixed_peak(
    peak: PeakInfo, flops: FlopModel, *, device: torch.device, follow_autocast: bool, nvml: Any = None
) -> PeakInfo:
    """`peak` weighted by the FLOPs each dtype runs in `flops.model` (FP8 linears beside bf16 matmuls).

    `peak` is the base dtype's (from `resolve_peak`); `follow_autocast`: the base dtype is read
    again at the first forward (`autocast_peak`). Warns once for a dtype the device has no peak
    for (its FLOPs then count at the base peak) and for low-precision modules it cannot read.
    """
    if flops.model is None:
        return peak
    total = flops.breakdown.total if flops.breakdown is not None else None
    try:
        plan = find_precision(
            flops.model, base=peak.dtype, total=total, seq_len=flops.seq_len, follow_autocast=follow_autocast
        )
    except Exception as exc:  # an odd model must not stop the run: say what the peak is instead
        message = f"mfumon: cannot tell which matmuls run in fp8 ({exc!r}); the peak is the {peak.dtype} one"
        warnings.warn(message, MfumonWarning, stacklevel=3)
        plan = Precision(total=0, fixed={}, base=peak.dtype, follow_autocast=follow_autocast)
        return replace(peak, plan=plan)
    if plan.uncounted:
        names = ", ".join(plan.uncounted[:3]) + (", ..." if len(plan.uncounted) > 3 else "")
        warnings.warn(
            f"mfumon: {len(plan.uncounted)} module(s) ({names}) hold torchao low-precision tensors "
            f"mfumon cannot read (MX formats, float8 grouped experts): their FLOPs count at the "
            f"{peak.dtype} peak; pass peak_tflops=<your weighted peak> if they run faster",
            MfumonWarning,
            stacklevel=3,
        )
    return _weigh(peak, plan, device=device, nvml=nvml, stacklevel=4)


def _weigh(base: PeakInfo, plan: Precision, *, device: torch.device, nvml: Any, stacklevel: int) -> PeakInfo:
    """`base` (the base dtype's peak) weighted over `plan`'s dtypes; stacklevel 0 logs, never warns."""
    by_dtype = plan.flops_by_dtype()
    total = sum(by_dtype.values())
    if len(by_dtype) < 2 or total <= 0:
        return replace(base, plan=plan)
    mix = tuple(sorted(((d, f / total) for d, f in by_dtype.items()), key=lambda x: -x[1]))
    out = replace(base, dtype=mix[0][0], mix=mix, plan=plan)
    if base.flops is None or base.source in _OVERRIDES:
        return out  # no peak to weigh, or the user's own: the mix is reported, never applied
    seconds, missing = 0.0, []
    for dtype, flops in by_dtype.items():
        peak = base.flops if dtype == plan.base else peak_flops(dtype=dtype, device=device, nvml=nvml)
        if peak is None:
            missing.append(dtype)
            peak = base.flops  # no published rate: the base dtype's stands in, and says so
        seconds += flops / peak
    fallback = ""
    if missing:
        who, dtypes = base.product or base.device, "/".join(missing)
        fallback = f"{dtypes} at the {plan.base} peak ({who} has no published {dtypes} peak)"
        message = f"mfumon: {fallback}; the {out.label} mix is weighted with that"
        if stacklevel:
            warnings.warn(message, MfumonWarning, stacklevel=stacklevel)
        else:
            log.warning(message)
    return replace(out, flops=total / seconds, fallback=fallback)
