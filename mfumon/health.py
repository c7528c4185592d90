"""Device health off the step path: SM clock, power, energy and throttling from NVML, sampled on a thread.

Each rank reads its GPU through NVML (driver calls, no CUDA call) on a background thread every
`SAMPLE_PERIOD_S`, and a log reads the newest sample: the energy counter alone takes 3.9 ms a
call on an H200 (the violation counters 0.8 ms each), too long to stall the training thread at
every log. A sample holds the SM clock and the clock event ("throttle") reasons; NVML's energy
counter; and its counters of the time the clocks were held down by the power and the thermal
policy (their share of the time since an earlier log, `capped_frac`, sees a cap the moment
missed). Power is the energy counter's delta over the host seconds since the newest earlier log
at least `MIN_SPAN_S` back (the counter advances in steps: a longer span keeps the rounding
small): the mean power; a window's energy is that mean power times the wall time its steps span.
Power and capped shares thus appear from the first log a second after the first. A device
without the counter (before Volta) gives the power at log time and no energy. A MIG slice reads
the clock of its GPU and no power or energy: those are the whole board's, shared with the other
slices.

Every NVML call goes through an ``nvml`` module parameter (default: ``pynvml``), the one seam
tests replace. A test runs the NVML source on the CPU by binding the seam arguments:
``monkeypatch.setattr(health, "device_sources", partial(health.device_sources, nvml=fake, index=0))``.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from mfumon import metrics as K
from mfumon.devices import cuda_index, nvml_handle, nvml_int
from mfumon.errors import FaultLog
from mfumon.ledger import Field, Source
from mfumon.memory import memory_source
from mfumon.metrics import Window, utilization

__all__ = [
    "CAP_POLICIES",
    "MIN_SPAN_S",
    "THROTTLE_REASONS",
    "SAMPLE_PERIOD_S",
    "NvmlSource",
    "device_sources",
    "nvml_source",
    "reason_names",
]

MIN_SPAN_S = 1.0  # power and capped shares span at least this much counter history (counters step)
SAMPLE_PERIOD_S = 0.5  # the sampling thread's period; None: sample at each log (tests, deterministic)
NVML_CLOCK_SM = 1  # nvml.h nvmlClockType_t; read from the binding when it has it
REASON_BITS = 16  # bits of the reason mask carried across ranks, one "max" slot each (a max ORs 0/1)
#: nvml.h's nvmlClocksEventReason* (formerly nvmlClocksThrottleReason*) bits, by name.
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",  # also "user defined clocks"
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
#: nvml.h's nvmlPerfPolicyType_t: NVML counts the nanoseconds clocks were held down by each policy.
CAP_POLICIES: dict[str, int] = {"power": 0, "thermal": 1}


Reading = tuple[float, float | None, dict[str, int]]  # host seconds, energy mJ, capped ns by policy
#: host seconds, SM clock, reason mask, capped ns by policy, energy mJ, power W (no energy counter)
Sample = tuple[float, float, int | None, dict[str, int], float | None, float | None]


def reason_names(bits: list[float]) -> list[str]:
    """Names of the reason bits set (1.0) in a per-bit list; unknown bits as "bit_<n>"."""
    return [THROTTLE_REASONS.get(1 << n, f"bit_{n}") for n, on in enumerate(bits) if on == 1.0]


class NvmlSource(Source):
    """One rank's GPU through NVML: SM clock, power, energy, clock event reasons and capped time.

    `clock` is the handle clocks are read from (a MIG slice's parent GPU), `board` the handle power
    and energy are read from (None: not measured), `energy`: whether `board` has the energy counter.
    `peak_flops` gives the per-device peak MFU divides by, at log time (None: no `mfu_at_clock`).
    `period`: seconds between samples on a daemon thread; None samples at each `collect()` instead.
    A sampling fault stops the thread and is raised by the next `collect()` (the ledger says it once).
    """

    name = "nvml"
    fields = (
        Field("sm_clock_mhz", "min"),  # the lowest rank's
        Field("clock_share", "min"),  # clock / its max clock: the most throttled rank's
        Field("max_clock_mhz", "max"),
        Field("power_w", "sum"),  # summed, then / ranks that measured it: the mean per device
        Field("power_ranks", "sum"),
        Field("power_at_log", "max"),  # 1.0: some rank read the power at log time (no energy counter)
        Field("reasons", "max", REASON_BITS),  # 1.0 per bit any rank saw: max of 0/1 ORs them
        Field("capped_frac", "max", len(CAP_POLICIES)),  # share of the time between logs held down
    )

    def __init__(
        self,
        nvml: Any,
        clock: Any,
        board: Any | None,
        *,
        energy: bool,
        peak_flops: Callable[[], float | None] | None = None,
        period: float | None = SAMPLE_PERIOD_S,
    ) -> None:
        self._nvml, self._clock, self._board, self._energy = nvml, clock, board, energy
        self._peak = peak_flops
        self._sm = getattr(nvml, "NVML_CLOCK_SM", NVML_CLOCK_SM)
        self._max_clock = float(nvml_int(nvml.nvmlDeviceGetMaxClockInfo(clock, self._sm)))
        self._reasons = _reason_getter(nvml, clock)
        self._policies = {n: p for n, p in CAP_POLICIES.items() if _answers(_capped_ns, nvml, clock, p)}
        self._readings: deque[Reading] = deque()  # the counters at recent logs, oldest first
        self._closed = False
        self._period = period
        self._latest: Sample | None = None
        self._error: Exception | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the sampling thread (the monitor's start(); none when sampling at each log).

        The thread holds the source only weakly: a monitor dropped without close() ends it too.
        """
        if self._period is not None and self._thread is None and not self._closed:
            args = (weakref.ref(self), self._stop, self._period)
            self._thread = threading.Thread(target=_sample_loop, args=args, name="mfumon-nvml", daemon=True)
            self._thread.start()

    def _sample(self) -> Sample:
        """One reading of every counter: (host seconds, clock, reason mask, capped ns, energy mJ, power W)."""
        nvml, handle = self._nvml, self._clock
        clock = float(nvml_int(nvml.nvmlDeviceGetClockInfo(handle, self._sm)))
        mask = nvml_int(self._reasons(handle)) if self._reasons is not None else None
        capped = {name: _capped_ns(nvml, handle, p) for name, p in self._policies.items()}
        mj = watts = None
        if self._board is not None and self._energy:
            mj = float(nvml_int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._board)))
        elif self._board is not None:  # no energy counter: the power now
            watts = nvml_int(nvml.nvmlDeviceGetPowerUsage(self._board)) / 1e3  # mW -> W
        return time.perf_counter(), clock, mask, capped, mj, watts

    def collect(self, final: bool = False) -> list[float]:
        """This rank's clock and reason bits at the newest sample; power and capped shares since the
        newest earlier reading at least MIN_SPAN_S back (NaN until the counters have that history)."""
        if self._error is not None:
            raise self._error
        sample = self._sample() if self._thread is None else self._latest
        if sample is None:  # the thread has not sampled yet: not measured
            return [math.nan] * sum(f.size for f in self.fields)
        now, clock, mask, capped, mj, watts = sample
        last = self._reference(now)
        if not self._readings or self._readings[-1][0] != now:
            self._readings.append((now, mj, capped))
        seconds = now - last[0] if last is not None else math.nan
        power = at_log = math.nan
        if mj is not None and last is not None and last[1] is not None and mj >= last[1] and seconds > 0:
            power, at_log = (mj - last[1]) / 1e3 / seconds, 0.0  # mJ -> J, over s (a smaller count: reset)
        elif watts is not None:
            power, at_log = watts, 1.0
        fracs = [math.nan] * len(CAP_POLICIES)
        if last is not None and seconds > 0:
            for i, name in enumerate(CAP_POLICIES):
                if name in capped and capped[name] >= last[2][name]:  # ns -> s, over s
                    fracs[i] = min((capped[name] - last[2][name]) / 1e9 / seconds, 1.0)
        share = clock / self._max_clock if self._max_clock > 0 else math.nan
        bits = [math.nan if mask is None else float(mask >> n & 1) for n in range(REASON_BITS)]
        ranks = 1.0 if math.isfinite(power) else math.nan
        return [clock, share, self._max_clock, power, ranks, at_log, *bits, *fracs]

    def _reference(self, now: float) -> Reading | None:
        """The newest earlier reading at least MIN_SPAN_S old (None: not yet), older ones dropped.

        NVML's counters advance in steps (the energy counter every 10-100 ms), so a delta over a
        short log interval would be mostly rounding: it spans at least a second instead.
        """
        readings = self._readings
        while len(readings) >= 2 and now - readings[1][0] >= MIN_SPAN_S:
            readings.popleft()
        return readings[0] if readings and now - readings[0][0] >= MIN_SPAN_S else None

    def metrics(
        self, values: dict[str, list[float]], window: Window, world: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """sm_clock_mhz, power_w, joules_per_token; details: throttle_reasons, capped_frac, mfu_at_clock."""
        out: dict[str, float] = {K.SM_CLOCK_MHZ: values["sm_clock_mhz"][0]}
        details: dict[str, Any] = {}
        ranks, power = values["power_ranks"][0], values["power_w"][0]
        if ranks > 0:
            out[K.POWER_W] = power / ranks
            if values["power_at_log"][0] == 1.0:
                details["power_w_at_log"] = True  # read at log time: no energy counter, no energy
            elif ranks == world and window.tokens > 0 and window.wall > 0:  # every rank's energy
                out[K.JOULES_PER_TOKEN] = power * window.wall / window.tokens  # W x s = J
        reasons = values["reasons"]
        if not all(math.isnan(v) for v in reasons):
            details["throttle_reasons"] = reason_names(reasons)
        fracs = dict(zip(CAP_POLICIES, values["capped_frac"], strict=True))
        if any(math.isfinite(v) for v in fracs.values()):  # the most capped rank's, per policy
            details["capped_frac"] = {k: v for k, v in fracs.items() if math.isfinite(v)}
        share, peak = values["clock_share"][0], self._peak() if self._peak is not None else None
        idle = "gpu_idle" in details.get("throttle_reasons", ())  # a clock at rest says nothing of the steps
        if share < 1.0 and share > 0.0 and not idle and peak and window.seconds > 0:
            mfu = utilization(window.model_flops, window.seconds, world, peak)
            details["mfu_at_clock"] = mfu / share  # MFU against the peak scaled to the clock seen
            details["sm_clock_max_mhz"] = values["max_clock_mhz"][0]
        return out, details

    def close(self) -> None:
        """Stop the sampling thread and release NVML (once)."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5.0)  # a driver call in flight finishes first
                if self._thread.is_alive():  # a driver call hung: shutting NVML down under it is worse
                    return
            self._nvml.nvmlShutdown()


def _sample_loop(ref: weakref.ref[NvmlSource], stop: threading.Event, period: float) -> None:
    """The sampling thread: a sample now, then one every period, until close(), a fault, or the
    source is gone (its monitor dropped without close())."""
    while True:
        source = ref()
        if source is None:
            return
        try:
            source._latest = source._sample()  # one reference swap: the log thread reads it whole
        except Exception as exc:  # NVML failing mid-run: collect() raises it once, the keys go
            source._error = exc
            return
        del source  # no strong reference while waiting
        if stop.wait(period):
            return


def _capped_ns(nvml: Any, handle: Any, policy: int) -> int:
    """Nanoseconds NVML has seen the clocks held down by `policy` (a counter since the driver loaded)."""
    return nvml_int(nvml.nvmlDeviceGetViolationStatus(handle, policy).violationTime)


def _answers(getter: Callable[..., Any], *args: Any) -> bool:
    """Whether an NVML getter answers here (a device or driver may lack it)."""
    try:
        getter(*args)
    except Exception:
        return False
    return True


def _reason_getter(nvml: Any, handle: Any) -> Callable[[Any], Any] | None:
    """The binding's clock-event-reasons getter that works here (newer name first), else None."""
    for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
        getter = getattr(nvml, name, None)
        if getter is not None and _answers(getter, handle):  # else: an older binding or driver
            return getter  # type: ignore[no-any-return]
    return None


def nvml_source(
    index: int,
    faults: FaultLog,
    *,
    uuid: str | None = None,
    peak_flops: Callable[[], float | None] | None = None,
    nvml: Any = None,
    period: float | None = SAMPLE_PERIOD_S,
) -> NvmlSource | None:
    """The NVML source of CUDA device `index`, or None (said once in `faults`) when NVML cannot read it."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no type hints
        except ImportError:
            hint = "pip install nvidia-ml-py"
            faults.report("nvml", "mfumon: pynvml is not importable (%s); %s", hint, _LEFT_OUT)
            return None
    try:
        nvml.nvmlInit()
    except Exception as exc:
        faults.fault("nvml", exc, _LEFT_OUT)
        return None
    try:
        handle = nvml_handle(nvml, index, uuid)
        clock, board = handle, handle
        try:
            mig = bool(nvml_int(nvml.nvmlDeviceIsMigDeviceHandle(handle)))
        except Exception:  # pre-MIG drivers and GPUs lack the call: not a MIG device
            mig = False
        if mig:
            clock, board = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle), None
            faults.report(
                "nvml-mig",
                "mfumon: a MIG slice shares its GPU's power and energy with the other slices: power_w "
                "and joules_per_token are left out; sm_clock_mhz is its GPU's",
            )
        energy = False
        if board is not None:
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(board)
                energy = True
            except Exception:  # no energy counter (before Volta): the power at log time instead
                nvml.nvmlDeviceGetPowerUsage(board)
                faults.report(
                    "nvml-energy",
                    "mfumon: this GPU has no NVML energy counter: power_w is read at log time, "
                    "joules_per_token is left out",
                )
        nvml.nvmlDeviceGetClockInfo(clock, getattr(nvml, "NVML_CLOCK_SM", NVML_CLOCK_SM))  # answers here
        return NvmlSource(nvml, clock, board, energy=energy, peak_flops=peak_flops, period=period)
    except Exception as exc:
        faults.fault("nvml", exc, _LEFT_OUT)
        try:
            nvml.nvmlShutdown()
        except Exception:  # shutting down is best effort
            pass
        return None


_LEFT_OUT = "sm_clock_mhz, power_w and joules_per_token are left out"


def device_sources(
    device: torch.device,
    faults: FaultLog,
    peak_flops: Callable[[], float | None] | None = None,
    *,
    nvml: Any = None,
    index: int | None = None,
    period: float | None = SAMPLE_PERIOD_S,
) -> list[Source]:
    """The sources that can measure `device` here: NVML health and allocator memory on a CUDA GPU.

    `peak_flops` gives the per-device peak at log time (for `mfu_at_clock`). `nvml` and `index`
    are the test seam: an NVML module and the CUDA ordinal to read through it, on any device;
    `period` the NVML sampling thread's (None: sample at each log, as the tests do).
    A CPU has none of these figures: no source, nothing said.
    """
    found: list[Source] = []
    cuda = device.type == "cuda"
    if cuda:
        memory = memory_source(device, faults)
        if memory is not None:
            found.append(memory)
    uuid = None
    if index is None and cuda:
        if torch.version.hip:
            faults.report("nvml", "mfumon: NVML reads NVIDIA GPUs only (this is ROCm): %s", _LEFT_OUT)
            return found
        index = cuda_index(device)
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
        except Exception:  # old torch without props.uuid: the index mapping instead
            uuid = None
    if index is not None:
        source = nvml_source(index, faults, uuid=uuid, peak_flops=peak_flops, nvml=nvml, period=period)
        if source is not None:
            found.append(source)
    return found
