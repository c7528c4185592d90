"""What is this device's dense peak for the dtype its matmuls run in?

The device name comes from NVML (``pynvml``, from ``nvidia-ml-py``) for the physical GPU behind
a CUDA device, or from torch on ROCm; the peak is an exact lookup in ``mfumon._peaks.PEAKS``.
Every NVML call goes through an ``nvml`` module parameter (default: ``pynvml``), the one seam
tests replace. NVML faults are logged once to the ``mfumon`` logger and never raised.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from mfumon._peaks import DTYPES, DevicePeak, lookup
from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning

__all__ = [
    "DeviceIdentity",
    "PeakInfo",
    "device_name",
    "identify_device",
    "matmul_dtype",
    "measure_peak_flops",
    "normalize_dtype",
    "peak_flops",
    "peak_override_flops",
    "resolve_peak",
]

ENV_PEAK_TFLOPS = "MFUMON_PEAK_TFLOPS"
TERA = 1e12

logger = logging.getLogger("mfumon")
_reported: set[str] = set()  # fault kinds already logged (one record per kind per process)


def _report_once(kind: str, message: str) -> None:
    if kind not in _reported:
        _reported.add(kind)
        logger.warning(message)


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

_TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "int8",
    **{
        getattr(torch, n): "fp8"
        for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    },
    **{getattr(torch, n): "fp4" for n in ("float4_e2m1fn_x2",) if hasattr(torch, n)},
}

# spellings people (and Lightning / HF precision flags) use, lower case
_ALIASES: dict[str, str] = {
    **{d: d for d in DTYPES},
    "float64": "fp64", "double": "fp64", "64": "fp64", "64-true": "fp64",
    "float32": "fp32", "float": "fp32", "32": "fp32", "32-true": "fp32", "ieee": "fp32",
    "tensorfloat32": "tf32", "tensorfloat-32": "tf32",
    "bfloat16": "bf16", "bf16-mixed": "bf16", "bf16-true": "bf16",
    "float16": "fp16", "half": "fp16", "16": "fp16", "16-mixed": "fp16", "16-true": "fp16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "e4m3": "fp8", "e5m2": "fp8",
    "transformer-engine": "fp8", "transformer-engine-float16": "fp8",
    "float4": "fp4", "nvfp4": "fp4", "mxfp4": "fp4", "float4_e2m1fn_x2": "fp4",
    "i8": "int8",
}  # fmt: skip


def normalize_dtype(dtype: str | torch.dtype) -> str:
    """Canonical matmul dtype name ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")."""
    if isinstance(dtype, torch.dtype):
        if dtype in _TORCH_DTYPES:
            return _TORCH_DTYPES[dtype]
        raise ConfigError(f"dtype {dtype} has no matmul peak; pass one of {', '.join(DTYPES)}")
    if not isinstance(dtype, str):
        raise ConfigTypeError(
            f"dtype must be a str or torch.dtype such as 'bf16', got {type(dtype).__name__}"
        )
    key = dtype.strip().lower().removeprefix("torch.")
    if key in _ALIASES:
        return _ALIASES[key]
    raise ConfigError(f"unknown dtype {dtype!r}; pass one of {', '.join(DTYPES)} (or a torch.dtype)")


def _fp32_matmul_dtype() -> str:
    """'tf32' when fp32 matmuls may run on TF32 tensor cores, else 'fp32'."""
    try:
        new_api = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")  # torch >= 2.9
        if new_api in ("tf32", "ieee"):
            return "tf32" if new_api == "tf32" else "fp32"
        return "tf32" if torch.get_float32_matmul_precision() in ("high", "medium") else "fp32"
    except RuntimeError:  # torch raises when the legacy and new precision APIs were mixed
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def matmul_dtype(model: nn.Module | None = None, *, autocast_dtype: str | torch.dtype | None = None) -> str:
    """Canonical dtype the matmuls run in: explicit autocast dtype, active autocast, else parameters."""
    if autocast_dtype is not None:
        found = normalize_dtype(autocast_dtype)
    elif torch.is_autocast_enabled("cuda"):
        found = normalize_dtype(torch.get_autocast_dtype("cuda"))
    elif torch.is_autocast_enabled("cpu"):
        found = normalize_dtype(torch.get_autocast_dtype("cpu"))
    else:
        found = _parameter_dtype(model) if model is not None else "fp32"
    return _fp32_matmul_dtype() if found == "fp32" else found


def _parameter_dtype(model: nn.Module) -> str:
    """Floating dtype holding the most parameter elements (fp32 when there is none)."""
    elements: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            elements[p.dtype] = elements.get(p.dtype, 0) + p.numel()
    if not elements:
        return "fp32"
    return _TORCH_DTYPES.get(max(elements, key=lambda d: elements[d]), "fp32")


# ---------------------------------------------------------------------------------------------
# device identity
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    """Which physical device a torch device is, as the table needs it."""

    name: str | None  # driver name of the full physical device (a MIG instance's parent GPU); None on CPU
    reported: str | None  # the name the device reports for itself (a MIG instance's own name)
    share: float | None = 1.0  # fraction of the full device's SMs it holds (MIG / partition); None: unknown
    mig: bool = False
    sm_count: int | None = None  # SMs (AMD: CUs) this device holds, when known
    problem: str | None = None  # why the device could not be named, when it could not


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # older bindings return bytes


def _as_int(value: Any) -> int:
    return int(getattr(value, "value", value))  # pynvml returns ctypes ints from some getters


def _cuda_index(device: torch.device | int | str | None) -> int | None:
    """CUDA ordinal of `device` (None for CPU, meta and other non-CUDA devices)."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if dev.index is not None:
        return dev.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _load_nvml(nvml: ModuleType | Any | None) -> Any | None:
    if nvml is not None:
        return nvml
    try:
        import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no type hints
    except ImportError:
        hint = "pip install nvidia-ml-py"
        _report_once(
            "nvml-import", f"mfumon: pynvml is not importable ({hint}); device names come from torch"
        )
        return None
    return pynvml


def _nvml_handle(nvml: Any, index: int, uuid: str | None) -> Any:
    """NVML handle of CUDA device `index` (its UUID when torch gives one, else CUDA_VISIBLE_DEVICES)."""
    if uuid:
        for prefix in ("GPU-", "MIG-"):  # torch prints the bare UUID; NVML wants the prefix
            try:
                return nvml.nvmlDeviceGetHandleByUUID(prefix + uuid)
            except Exception:  # not this kind of device: try the other prefix, then the index
                continue
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index >= len(entries):
            raise LookupError(f"CUDA device {index} is not in CUDA_VISIBLE_DEVICES={visible!r}")
        entry = entries[index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry)  # "GPU-..." / "MIG-..." entries
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _nvml_identity(nvml: Any, index: int, uuid: str | None) -> DeviceIdentity:
    nvml.nvmlInit()
    try:
        handle = _nvml_handle(nvml, index, uuid)
        reported = _as_str(nvml.nvmlDeviceGetName(handle))
        try:
            is_mig = bool(_as_int(nvml.nvmlDeviceIsMigDeviceHandle(handle)))
        except Exception:  # pre-MIG drivers and GPUs lack the call: not a MIG device
            is_mig = False
        if not is_mig:
            return DeviceIdentity(name=reported, reported=reported)
        parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        name = _as_str(nvml.nvmlDeviceGetName(parent))
        sms = _as_int(nvml.nvmlDeviceGetAttributes(handle).multiprocessorCount)
        return DeviceIdentity(
            name=name, reported=reported, share=_partition_share(name, sms), mig=True, sm_count=sms
        )
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # shutting down is best effort
            pass


def _partition_share(name: str, sms: int | None) -> float | None:
    """Fraction of the full device a partition holds: its SMs / the full part's SMs; None if unknown."""
    row = lookup(name)
    if row is None or row.sm_count is None or not sms:
        return None
    return min(1.0, sms / row.sm_count)  # MIG slice: SMs it holds / SMs of the whole GPU


def _torch_identity(index: int) -> DeviceIdentity:
    """Identity from torch alone: ROCm, or NVIDIA when NVML failed (scaled by SM count if smaller)."""
    props = torch.cuda.get_device_properties(index)
    name = torch.cuda.get_device_name(index)
    row = lookup(name)
    sms = int(props.multi_processor_count)
    if row is not None and row.sm_count is not None and sms < row.sm_count:
        return DeviceIdentity(name=name, reported=name, share=sms / row.sm_count, mig=True, sm_count=sms)
    return DeviceIdentity(name=name, reported=name, sm_count=sms)


def identify_device(device: torch.device | int | str | None = None, *, nvml: Any = None) -> DeviceIdentity:
    """Name and MIG share of the physical device behind `device` (current device if None); never raises.

    An int or "cuda:N" device is named through NVML even when this torch has no CUDA (a CPU
    build on a GPU machine); None, "cpu" and "meta" devices on such a torch have no name.
    """
    try:
        index = _cuda_index(device)
    except Exception as exc:  # e.g. a CUDA runtime error while asking for the current device
        _report_once("device-index", f"mfumon: cannot tell the current CUDA device ({exc!r})")
        return DeviceIdentity(name=None, reported=None, problem=f"no current CUDA device ({exc!r})")
    if index is None:
        return DeviceIdentity(name=None, reported=None)
    cuda = torch.cuda.is_available()
    if cuda and torch.version.hip:  # ROCm: torch names the device ("AMD Instinct MI300X")
        try:
            return _torch_identity(index)
        except Exception as exc:
            _report_once("torch-device", f"mfumon: torch could not name ROCm device {index} ({exc!r})")
            return DeviceIdentity(name=None, reported=None, problem=f"torch failed ({exc!r})")
    uuid = None
    if cuda:
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
        except Exception:  # old torch without props.uuid: fall back to the index mapping
            uuid = None
    problem = "NVML is not importable"
    module = _load_nvml(nvml)
    if module is not None:
        try:
            return _nvml_identity(module, index, uuid)
        except Exception as exc:  # NVML missing, failing at init or mid-run: report once, carry on
            problem = f"NVML failed ({exc!r})"
            message = (
                f"mfumon: NVML could not name CUDA device {index} ({exc!r}); device names come from torch"
            )
            _report_once("nvml", message)
    if cuda:
        try:
            return _torch_identity(index)
        except Exception as exc:
            problem += f"; torch failed ({exc!r})"
            _report_once("torch-device", f"mfumon: torch could not name CUDA device {index} ({exc!r})")
    return DeviceIdentity(name=None, reported=None, problem=problem)


def device_name(device: torch.device | int | str | None = None, *, nvml: Any = None) -> str | None:
    """Driver name of the physical device behind `device` (a MIG slice's parent GPU); None on CPU."""
    return identify_device(device, nvml=nvml).name


# ---------------------------------------------------------------------------------------------
# peaks
# ---------------------------------------------------------------------------------------------


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
    if size <= 0 or iters <= 0 or warmup < 0:
        raise ConfigError(
            f"size and iters must be positive and warmup >= 0, got {size=}, {iters=}, {warmup=}"
        )
    if not torch.cuda.is_available():
        raise ConfigError("measure_peak_flops needs a CUDA (or ROCm) device; this torch sees none")
    index = _cuda_index(device)
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
    return _gemm_flops(size) * iters / seconds


def _gemm_flops(size: int) -> int:
    return 2 * size**3  # (n x n) @ (n x n): one multiply and one add per term


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
