"""The one stand-in of the test suite: an NVML module with the calls mfumon makes.

It returns real driver strings (device names) and the units NVML uses (MHz, mW, mJ, reason
bitmasks), over a list of physical GPUs and MIG slices. Like real NVML, a MIG handle answers no
clock, power or energy query ("Not Supported"): those belong to the physical GPU.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

NVML_CLOCK_SM = 1  # nvml.h: nvmlClockType_t NVML_CLOCK_SM


class NVMLError(Exception):
    pass


@dataclass
class Handle:
    name: str
    uuid: str
    parent: Handle | None = None  # set for a MIG device
    sms: int = 0  # SMs a MIG device holds
    sm_clock_mhz: int = 1980
    max_sm_clock_mhz: int = 1980
    power_mw: int = 700_000
    energy_mj: int = 1_000_000_000  # NVML's counter since the driver loaded
    energy_per_read_mj: int = 0  # the counter grows by this much at each read ...
    watts: float | None = None  # ... or like a device drawing this power (host clock), when set
    energy_counter: bool = True  # Volta and newer have one
    reasons: int = 0  # clock event (throttle) reason bits
    capped_ns: dict[int, int] | None = field(default_factory=lambda: {0: 0, 1: 0})  # by policy; None: no
    capped_per_read_ns: dict[int, int] = field(default_factory=dict)  # added at each read
    _since: float = field(default_factory=time.perf_counter)


@dataclass
class FakeNVML:
    """pynvml's surface as mfumon uses it (devices.py, health.py)."""

    gpus: list[Handle]
    migs: list[Handle] = field(default_factory=list)
    init_error: bool = False
    name_error: bool = False
    bytes_names: bool = False  # nvidia-ml-py < 11.515 returned bytes
    event_reasons: bool = True  # nvidia-ml-py < 12.535 has only nvmlDeviceGetCurrentClocksThrottleReasons
    lost_at_energy_read: int | None = None  # the n-th energy read and every call after it: "GPU is lost"
    calls: list[str] = field(default_factory=list)
    energy_reads: int = 0

    NVMLError = NVMLError
    NVML_CLOCK_SM = NVML_CLOCK_SM

    def __getattr__(self, name: str) -> object:
        if name == "nvmlDeviceGetCurrentClocksEventReasons" and self.event_reasons:
            return self._reasons
        raise AttributeError(name)  # an older binding lacks the newer name

    def _live(self) -> None:
        if self.lost_at_energy_read is not None and self.energy_reads >= self.lost_at_energy_read:
            raise NVMLError("GPU is lost")

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error:
            raise NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        if index >= len(self.gpus):
            raise NVMLError("Invalid Argument")
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> Handle:
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for handle in self.gpus + self.migs:
            if handle.uuid == text:
                return handle
        raise NVMLError("Not Found")

    def nvmlDeviceGetName(self, handle: Handle) -> str | bytes:
        if self.name_error:
            raise NVMLError("GPU is lost")
        return handle.name.encode() if self.bytes_names else handle.name

    def nvmlDeviceIsMigDeviceHandle(self, handle: Handle) -> ctypes.c_uint:
        return ctypes.c_uint(int(handle.parent is not None))  # pynvml returns the ctypes int

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Handle) -> Handle:
        assert handle.parent is not None
        return handle.parent

    def nvmlDeviceGetAttributes(self, handle: Handle) -> object:
        if handle.parent is None:
            raise NVMLError("Not Supported")  # NVML answers this for MIG handles only
        return type("Attributes", (), {"multiprocessorCount": handle.sms})()

    # -- health: clocks, power, energy, reasons ------------------------------------------------
    def _physical(self, handle: Handle) -> Handle:
        self._live()
        if handle.parent is not None:
            raise NVMLError("Not Supported")
        return handle

    def nvmlDeviceGetClockInfo(self, handle: Handle, clock: int) -> int:
        assert clock == NVML_CLOCK_SM
        self.calls.append("clock")
        return self._physical(handle).sm_clock_mhz

    def nvmlDeviceGetMaxClockInfo(self, handle: Handle, clock: int) -> int:
        assert clock == NVML_CLOCK_SM
        return self._physical(handle).max_sm_clock_mhz

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:
        self.calls.append("power")
        return self._physical(handle).power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Handle) -> int:
        gpu = self._physical(handle)
        if not gpu.energy_counter:
            raise NVMLError("Not Supported")
        self.energy_reads += 1
        self._live()
        gpu.energy_mj += gpu.energy_per_read_mj
        if gpu.watts is not None:
            now = time.perf_counter()
            gpu.energy_mj += round(gpu.watts * 1e3 * (now - gpu._since))  # W x s = J; x 1e3: mJ
            gpu._since = now
        return gpu.energy_mj

    def _reasons(self, handle: Handle) -> int:
        self.calls.append("reasons")
        return self._physical(handle).reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Handle) -> int:
        return self._reasons(handle)

    def nvmlDeviceGetViolationStatus(self, handle: Handle, policy: int) -> object:
        gpu = self._physical(handle)
        if gpu.capped_ns is None or policy not in gpu.capped_ns:
            raise NVMLError("Not Supported")
        gpu.capped_ns[policy] += gpu.capped_per_read_ns.get(policy, 0)
        return SimpleNamespace(referenceTime=0, violationTime=gpu.capped_ns[policy])  # ns held down so far


def gpus(*names: str) -> FakeNVML:
    return FakeNVML(
        [Handle(name, f"GPU-{i:08x}-0000-0000-0000-000000000000") for i, name in enumerate(names)]
    )


def a100_with_mig(sms: int = 14, parent: str = "NVIDIA A100-SXM4-40GB") -> FakeNVML:
    full = Handle(parent, "GPU-5c89852c-d268-c3f3-1b07-005d5ae1dc3f")
    mig = Handle(f"{parent} MIG 1g.5gb", "MIG-1baf66e9-5d3c-5d0b-a25c-e67952fe3a14", parent=full, sms=sms)
    return FakeNVML([full], migs=[mig])
