"""What is this device's dense peak for the dtype its matmuls run in?

The peak is an exact lookup of the device's driver name (`mfumon.devices`) in
``mfumon._peaks.PEAKS``, scaled by its MIG share; a user-given peak overrides it, and
`measure_peak_flops` times the achievable ceiling.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mfumon._peaks import DevicePeak, lookup
from mfumon.devices import DeviceIdentity, cuda_index, device_name, identify_device
from mfumon.dtypes import matmul_dtype, normalize_dtype
from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning, check_int
from mfumon.flops import matmul_flops

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
    "measure_peak_flops",
    "peak_flops",
    "peak_override_flops",
    "resolve_peak",
]

ENV_PEAK_TFLOPS = "MFUMON_PEAK_TFLOPS"
TERA = 1e12


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


@dataclass(frozen=True)
class PeakInfo:
    """The per-device peak the monitor divides by, and where it came from."""

    device: str | None  # the name the device reports (a MIG slice's own name); None on CPU
    dtype: str  # canonical matmul dtype
    flops: float | None  # dense peak FLOP/s per device; None: unknown, no MFU
    source: str  # "peak_tflops argument", "MFUMON_PEAK_TFLOPS", a datasheet URL, or "" when unknown
    scale: float = 1.0  # MIG share applied to the table peak
    product: str | None = None  # table row's product name when the table was used

    @property
    def tflops(self) -> float | None:
        """The peak in TFLOP/s per device; None when unknown."""
        return None if self.flops is None else self.flops / TERA


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
) -> PeakInfo:
    """Peak to divide by: `peak_tflops` > MFUMON_PEAK_TFLOPS > table peak of the device (x MIG share).

    Bad `peak_tflops`, env value or dtype raise ConfigError. An unknown device or dtype gives
    flops=None and one MfumonWarning; NVML faults are logged once, never raised.
    """
    canonical = normalize_dtype(dtype)
    override = peak_override_flops(peak_tflops)
    ident = identify_device(device, nvml=nvml)
    if override is not None:
        return PeakInfo(device=ident.reported, dtype=canonical, flops=override[0], source=override[1])
    hint = f"pass peak_tflops=<dense {canonical} TFLOP/s per device> or set {ENV_PEAK_TFLOPS}"
    if ident.name is None:
        if ident.problem is None:
            message = f"mfumon: device {str(device)!r} is not a GPU, so no peak and no MFU; {hint}"
        else:
            message = f"mfumon: could not name device {device!r}: {ident.problem}; no MFU; {hint}"
        warnings.warn(message, MfumonWarning, stacklevel=stacklevel)
        return PeakInfo(device=None, dtype=canonical, flops=None, source="")
    row = lookup(ident.name)
    if row is not None and canonical == "tf32" and "tf32" not in row.tflops and "fp32" in row.tflops:
        canonical = (
            "fp32"  # no TF32 tensor cores (Volta, Turing): allowing TF32 leaves fp32 matmuls as they are
        )
    seen = repr(ident.name) if ident.reported == ident.name else f"{ident.reported!r} (on {ident.name!r})"
    if row is None:
        message = f"mfumon: unknown device {seen}: no peak, no MFU (mfumon never guesses); {hint}"
    elif canonical not in row.tflops:
        have = ", ".join(row.tflops)
        message = f"mfumon: {row.product} has no published {canonical} peak (it has {have}); no MFU; {hint}"
    elif ident.share is None:
        message = f"mfumon: MIG device {seen}: unknown SM share of the full GPU, no MFU; {hint}"
    else:
        flops = row.tflops[canonical] * TERA * ident.share
        return PeakInfo(ident.reported, canonical, flops, row.source, scale=ident.share, product=row.product)
    warnings.warn(message, MfumonWarning, stacklevel=stacklevel)
    return PeakInfo(device=ident.reported, dtype=canonical, flops=None, source="")


def autocast_peak(peak: PeakInfo, *, peak_tflops: float | None, device: torch.device) -> PeakInfo:
    """`peak` for the autocast dtype when autocast is on for `device` and differs; else `peak` itself.

    Called inside the first forward, so it warns nothing: the device was reported at setup.
    """
    if not torch.is_autocast_enabled(device.type):
        return peak
    dtype = normalize_dtype(torch.get_autocast_dtype(device.type))
    if dtype == peak.dtype:
        return peak
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_peak(peak_tflops=peak_tflops, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# measured ceiling
# ---------------------------------------------------------------------------------------------


def measure_peak_flops(
    dtype: str | torch.dtype,
    *,
    device: torch.device | int | str | None = None,
    size: int = 8192,
    iters: int = 20,
    warmup: int = 5,
) -> float:
    """Achieved FLOP/s of back-to-back (size x size) @ (size x size) GEMMs in `dtype` on a CUDA device.

    Raises ConfigError without CUDA or for a dtype torch cannot multiply on this device.
    """
    canonical = normalize_dtype(dtype)
    size = check_int("size", size, "rows and columns of the square GEMM")
    iters = check_int("iters", iters, "timed GEMMs")
    warmup = check_int("warmup", warmup, "untimed GEMMs first", minimum=0)
    if not torch.cuda.is_available():
        raise ConfigError("measure_peak_flops needs a CUDA (or ROCm) device; this torch sees none")
    index = cuda_index(device)
    if index is None:
        raise ConfigError(f"measure_peak_flops needs a CUDA device, got device={device!r}")
    dev = torch.device("cuda", index)
    matmul = _gemm(canonical, size, dev)
    with _fp32_precision(canonical == "tf32"):
        for _ in range(warmup):
            matmul()
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        for _ in range(iters):
            matmul()
        end.record()
        end.synchronize()  # host sync: once, after the timed loop
    seconds = float(start.elapsed_time(end)) / 1e3
    return matmul_flops(size, size, size) * iters / seconds


def _gemm(dtype: str, size: int, dev: torch.device) -> Any:
    """A zero-argument callable running one (size x size) GEMM in `dtype`, output preallocated."""
    gen = torch.Generator(device=dev).manual_seed(0)
    if dtype in ("fp64", "fp32", "tf32", "bf16", "fp16"):
        torch_dtype = {"fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
            dtype, torch.float32
        )
        a = torch.randn(size, size, device=dev, dtype=torch_dtype, generator=gen)
        b = torch.randn(size, size, device=dev, dtype=torch_dtype, generator=gen)
        out = torch.empty(size, size, device=dev, dtype=torch_dtype)
        return lambda: torch.mm(a, b, out=out)
    if dtype == "int8":
        a8 = torch.randint(-8, 8, (size, size), device=dev, dtype=torch.int8, generator=gen)
        b8 = torch.randint(-8, 8, (size, size), device=dev, dtype=torch.int8, generator=gen).t()
        return lambda: torch._int_mm(a8, b8)
    if dtype == "fp8":
        e4m3 = torch.float8_e4m3fn
        a_f8 = torch.randn(size, size, device=dev, generator=gen).to(e4m3)
        b_f8 = (
            torch.randn(size, size, device=dev, generator=gen).to(e4m3).t()
        )  # column-major, as cuBLASLt wants
        one = torch.ones((), device=dev)
        return lambda: torch._scaled_mm(a_f8, b_f8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    timeable = "fp64, fp32, tf32, bf16, fp16, fp8, int8"
    raise ConfigError(f"measure_peak_flops cannot time {dtype} GEMMs; measure one of {timeable}")


@contextlib.contextmanager
def _fp32_precision(tf32: bool) -> Iterator[None]:
    """Let fp32 matmuls use TF32 (or not) inside the block; restore the setting after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 API; mixing it with allow_tf32 makes torch raise
        saved = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:
        saved_allow = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = saved_allow
