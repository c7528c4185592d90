"""Which physical device a torch device is: its driver name, and its share of the GPU (MIG).

The device name comes from NVML (``pynvml``, from ``nvidia-ml-py``) for the physical GPU behind
a CUDA device, or from torch on ROCm. Every NVML call goes through an ``nvml`` module parameter
(default: ``pynvml``), the one seam tests replace. NVML faults are logged once per process to
the ``mfumon`` logger (`faults`) and never raised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from mfumon._peaks import lookup
from mfumon.errors import FaultLog

__all__ = [
    "DeviceIdentity",
    "cuda_index",
    "device_name",
    "faults",
    "identify_device",
    "model_device",
    "nvml_handle",
    "nvml_int",
]

faults = FaultLog()  # device-naming faults: one record per kind per process


def model_device(
    model: torch.nn.Module | None, device: torch.device | str | None = None
) -> torch.device | None:
    """`device`, else the device of `model`'s first parameter not on meta; a CUDA device without an
    index gets the current one. None when neither is given (the caller picks its default)."""
    if device is not None:
        found: torch.device | None = torch.device(device)
    else:
        params = model.parameters() if model is not None else ()
        found = next((p.device for p in params if p.device.type != "meta"), None)
    if found is not None and found.type == "cuda" and found.index is None:
        found = torch.device("cuda", torch.cuda.current_device())
    return found


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


def nvml_int(value: Any) -> int:
    """An NVML getter's result as an int (pynvml returns ctypes ints from some getters)."""
    return int(getattr(value, "value", value))


def cuda_index(device: torch.device | int | str | None) -> int | None:
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
        faults.report(
            "nvml-import", f"mfumon: pynvml is not importable ({hint}); device names come from torch"
        )
        return None
    return pynvml


def nvml_handle(nvml: Any, index: int, uuid: str | None = None) -> Any:
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
        handle = nvml_handle(nvml, index, uuid)
        reported = _as_str(nvml.nvmlDeviceGetName(handle))
        try:
            is_mig = bool(nvml_int(nvml.nvmlDeviceIsMigDeviceHandle(handle)))
        except Exception:  # pre-MIG drivers and GPUs lack the call: not a MIG device
            is_mig = False
        if not is_mig:
            return DeviceIdentity(name=reported, reported=reported)
        parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        name = _as_str(nvml.nvmlDeviceGetName(parent))
        sms = nvml_int(nvml.nvmlDeviceGetAttributes(handle).multiprocessorCount)
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
        index = cuda_index(device)
    except Exception as exc:  # e.g. a CUDA runtime error while asking for the current device
        faults.report("device-index", f"mfumon: cannot tell the current CUDA device ({exc!r})")
        return DeviceIdentity(name=None, reported=None, problem=f"no current CUDA device ({exc!r})")
    if index is None:
        return DeviceIdentity(name=None, reported=None)
    cuda = torch.cuda.is_available()
    if cuda and torch.version.hip:  # ROCm: torch names the device ("AMD Instinct MI300X")
        try:
            return _torch_identity(index)
        except Exception as exc:
            faults.report("torch-device", f"mfumon: torch could not name ROCm device {index} ({exc!r})")
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
            faults.report("nvml", message)
    if cuda:
        try:
            return _torch_identity(index)
        except Exception as exc:
            problem += f"; torch failed ({exc!r})"
            faults.report("torch-device", f"mfumon: torch could not name CUDA device {index} ({exc!r})")
    return DeviceIdentity(name=None, reported=None, problem=problem)


def device_name(device: torch.device | int | str | None = None, *, nvml: Any = None) -> str | None:
    """Driver name of the physical device behind `device` (a MIG slice's parent GPU); None on CPU."""
    return identify_device(device, nvml=nvml).name
