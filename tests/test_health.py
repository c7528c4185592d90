"""Device health (NVML clocks, power, energy, throttling) and allocator memory at log time.

NVML is the one stand-in (tests/nvml_fake.py). A CPU has no NVML, so these tests run the real
NVML source on the CPU by binding `device_sources`' seam arguments (`nvml=`, `index=`), the way
mfumon.health documents; everything else is the real Monitor training a tiny model.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import mfumon
from mfumon import health
from mfumon import metrics as K
from mfumon.errors import FaultLog
from mfumon.health import NvmlSource, device_sources, nvml_source, reason_names
from mfumon.ledger import Ledger, combine_stats
from mfumon.metrics import Window, utilization
from tests.conftest import mfumon_records, train_step
from tests.nvml_fake import FakeNVML, NVMLError, a100_with_mig, gpus
from tests.procs import exit_now, spawn

NVML_KEYS = {K.SM_CLOCK_MHZ, K.POWER_W, K.JOULES_PER_TOKEN}
MEM_KEYS = {K.MEM_PEAK_GIB, K.MEM_RESERVED_GIB, K.MEM_ALLOC_RETRIES, K.MEM_OOMS}
TOKENS = 4 * 8  # train_step: batch 4 x seq 8
SLEEP_S = 0.005  # a slow data loader: each window lasts far longer than a log's own host work
GIB = 2**30


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def h100(**state: object) -> FakeNVML:
    nvml = gpus("NVIDIA H100 80GB HBM3")
    for name, value in state.items():
        setattr(nvml.gpus[0], name, value)
    return nvml


def bind(monkeypatch: pytest.MonkeyPatch, nvml: FakeNVML) -> None:
    """The documented way to run the NVML source on the CPU: its seam arguments bound."""
    monkeypatch.setattr(
        health, "device_sources", functools.partial(device_sources, nvml=nvml, index=0, period=None)
    )


def train(
    tiny, tmp_path: Path, steps: int = 12, sleep_s: float = SLEEP_S, **options: object
) -> tuple[list[dict], dict, dict, dict]:
    """A real monitored run, log_every=4, no warm-up; JSONL lines and the host clock around each step."""
    model, opt = tiny
    before: dict[int, float] = {}
    after: dict[int, float] = {}
    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=4,
        warmup=0,
        loggers=("jsonl",),
        peak_tflops=0.5,
        run_name="health",
        log_dir=tmp_path,
        **options,
    ) as mon:
        for i in range(1, steps + 1):
            tokens = train_step(model, opt)
            time.sleep(sleep_s)
            before[i] = time.perf_counter()
            mon.step(tokens=tokens)
            after[i] = time.perf_counter()
    return read_jsonl(tmp_path / "health.jsonl"), before, after, mon.summary()


# --------------------------------------------------------------------------------------------
# NVML through a real Monitor
# --------------------------------------------------------------------------------------------


def test_clock_power_energy_and_throttling_through_a_monitor(tiny, tmp_path: Path, monkeypatch, mfumon_log):
    per_read_j = 500.0  # the fake's energy counter grows 500 J (500,000 mJ) at every read
    nvml = h100(sm_clock_mhz=1755, reasons=0x4, energy_per_read_mj=500_000)  # 0x4: SW power cap
    nvml.gpus[0].capped_per_read_ns = {0: 5_000_000}  # held down by the power policy 5 ms between reads
    bind(monkeypatch, nvml)
    # 0.3 s per step: logs 1.2 s apart, more than the second of counter history power needs, so
    # each log's power spans back to the log before it
    lines, before, after, _ = train(tiny, tmp_path, sleep_s=0.3)
    assert [r["step"] for r in lines] == [4, 8, 12]
    for r in lines:
        assert r[K.SM_CLOCK_MHZ] == 1755
        assert r["throttle_reasons"] == ["sw_power_cap"]
        # MFU against the peak at the clock seen: MFU x max clock / clock (1980 / 1755)
        assert r["mfu_at_clock"] == pytest.approx(r[K.MFU] * 1980 / 1755, rel=1e-12)
        assert r["sm_clock_max_mhz"] == 1980
        assert not MEM_KEYS & r.keys()  # a CPU run has no allocator figures
    assert K.POWER_W not in lines[0] and K.JOULES_PER_TOKEN not in lines[0]  # step 4: no history yet
    assert "capped_frac" not in lines[0]
    for r, (a, b) in zip(lines[1:], [(4, 8), (8, 12)], strict=True):
        # One energy read per log: 500 J between the logs at steps a and b. The source reads it in
        # mon.step(a) and mon.step(b), so its host interval lies in [lo, hi]; the window's wall time
        # (its steps' spans, marked inside the same calls, same clock) lies there too.
        lo, hi = before[b] - after[a], after[b] - before[a]
        assert per_read_j / hi <= r[K.POWER_W] <= per_read_j / lo
        # energy of the window = mean power x wall; per token: 500 J / (4 steps x 32 tokens) = 3.906 J,
        # times wall / interval, a ratio in [lo / hi, hi / lo]
        per_token = per_read_j / (4 * TOKENS)
        assert per_token * lo / hi <= r[K.JOULES_PER_TOKEN] <= per_token * hi / lo
        # 5 ms held down by the power policy over the same interval; none by the thermal one
        assert 0.005 / hi <= r["capped_frac"]["power"] <= 0.005 / lo and r["capped_frac"]["thermal"] == 0
        assert hi / lo < 1.5  # the bounds are tight enough to catch a lost factor
    assert mfumon_records(mfumon_log) == []
    assert nvml.calls.count("init") == nvml.calls.count("shutdown") == 1  # released at close


def test_nvml_lost_mid_run_drops_its_keys_once_and_training_goes_on(
    tiny, tmp_path: Path, monkeypatch, mfumon_log
):
    nvml = h100(energy_per_read_mj=500_000)
    nvml.lost_at_energy_read = 3  # reads: 1 at setup, 2 at the first log, 3 at the second
    bind(monkeypatch, nvml)
    lines, _, _, summary = train(tiny, tmp_path, steps=16)
    assert [r["step"] for r in lines] == [4, 8, 12, 16]
    assert lines[0][K.SM_CLOCK_MHZ] == 1980 and "throttle_reasons" in lines[0]
    for r in lines[1:]:
        assert not NVML_KEYS & r.keys() and "throttle_reasons" not in r
        assert r[K.MFU] > 0  # the window's own metrics go on
    assert summary["steps"] == 16
    (record,) = mfumon_records(mfumon_log)
    assert "nvml fault" in record.getMessage() and "GPU is lost" in record.getMessage()


def test_nvml_failing_at_setup_says_so_once_and_the_run_has_no_device_keys(
    tiny, tmp_path: Path, monkeypatch, mfumon_log
):
    nvml = h100()
    nvml.init_error = True
    bind(monkeypatch, nvml)
    lines, _, _, _ = train(tiny, tmp_path, steps=8)
    assert all(not NVML_KEYS & r.keys() for r in lines)
    (record,) = mfumon_records(mfumon_log)
    assert "NVML Shared Library Not Found" in record.getMessage() and "left out" in record.getMessage()


def test_device_stats_off_asks_nvml_nothing(tiny, tmp_path: Path, monkeypatch) -> None:
    nvml = h100()
    bind(monkeypatch, nvml)
    lines, _, _, _ = train(tiny, tmp_path, steps=8, device_stats=False)
    assert nvml.calls == [] and all(not NVML_KEYS & r.keys() for r in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cpu_has_no_device_keys_and_says_nothing(tiny, tmp_path: Path, mfumon_log) -> None:
    assert device_sources(torch.device("cpu"), FaultLog()) == []
    lines, _, _, _ = train(tiny, tmp_path, steps=8)
    assert len(lines) == 2
    assert all(not (NVML_KEYS | MEM_KEYS) & r.keys() for r in lines)
    assert all("throttle_reasons" not in r and "mfu_at_clock" not in r for r in lines)
    assert mfumon_records(mfumon_log) == []


# --------------------------------------------------------------------------------------------
# the NVML source on its own: ranks, old devices, old bindings, MIG
# --------------------------------------------------------------------------------------------


def test_two_ranks_combine_min_clock_mean_power_summed_energy_and_ored_reasons() -> None:
    # Two ranks' GPUs drawing 300 W and 400 W (the fakes' counters follow the host clock).
    ranks = [
        h100(watts=300.0, sm_clock_mhz=1980, reasons=0x4),  # SW power cap
        h100(watts=400.0, sm_clock_mhz=1600, reasons=0x4 | 0x40),  # and HW thermal slowdown
    ]
    ranks[0].gpus[0].capped_per_read_ns = {0: 10_000_000}  # 10 ms power-capped between reads
    ranks[1].gpus[0].capped_per_read_ns = {0: 2_000_000, 1: 20_000_000}  # 2 ms power, 20 ms thermal
    peak = 989.5e12
    ledgers = [
        Ledger([nvml_source(0, FaultLog(), nvml=n, peak_flops=lambda: peak, period=None)], FaultLog())
        for n in ranks
    ]
    first = time.perf_counter()
    for ledger in ledgers:
        ledger.collect()  # the baseline
    mid = time.perf_counter()
    time.sleep(health.MIN_SPAN_S)
    second = time.perf_counter()
    rows = [ledger.collect() for ledger in ledgers]
    lo, hi = second - mid, time.perf_counter() - first  # bounds of each rank's interval between reads
    combined = combine_stats(ledgers[0].ops, rows)  # what the reducer does with every rank's row
    window = Window(steps=10, tokens=1000.0, model_flops=4e15, hardware_flops=4e15, seconds=2.0, wall=2.5)
    metrics, details = ledgers[0].metrics(combined, window, 2)
    assert metrics[K.SM_CLOCK_MHZ] == 1600  # the lowest rank's
    assert metrics[K.POWER_W] == pytest.approx((300 + 400) / 2, rel=1e-2)  # mean per device
    # all ranks' energy over the window: (300 + 400) W x 2.5 s wall = 1750 J, / 1000 tokens
    assert metrics[K.JOULES_PER_TOKEN] == pytest.approx(1.75, rel=1e-2)
    assert details["throttle_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]  # OR over ranks
    capped = details["capped_frac"]  # the most capped rank's share, per policy
    assert 0.010 / hi <= capped["power"] <= 0.010 / lo and 0.020 / hi <= capped["thermal"] <= 0.020 / lo
    mfu = 4e15 / (2.0 * 2 * peak)  # FLOPs / (seconds x devices x peak) = 0.00101
    assert utilization(4e15, 2.0, 2, peak) == pytest.approx(mfu)
    assert details["mfu_at_clock"] == pytest.approx(mfu * 1980 / 1600, rel=1e-12)  # the slowest clock
    # a rank that measured no power: the mean of the others, and no energy (it would miss one)
    rows[1][3:5] = [math.nan, math.nan]
    metrics, _ = ledgers[0].metrics(combine_stats(ledgers[0].ops, rows), window, 2)
    assert metrics[K.POWER_W] == pytest.approx(300, rel=1e-2) and K.JOULES_PER_TOKEN not in metrics


def test_no_energy_counter_reads_the_power_at_log_time_and_gives_no_energy(mfumon_log) -> None:
    nvml = h100(energy_counter=False, power_mw=612_345)  # a Pascal-era GPU
    faults = FaultLog()
    ledger = Ledger([nvml_source(0, faults, nvml=nvml, period=None)], faults)
    window = Window(steps=4, tokens=128.0, model_flops=1e12, hardware_flops=1e12, seconds=1.0, wall=1.0)
    metrics, details = ledger.metrics(ledger.collect(), window, 1)
    assert metrics[K.POWER_W] == 612.345  # mW -> W, no baseline needed
    assert K.JOULES_PER_TOKEN not in metrics and details["power_w_at_log"] is True
    (record,) = mfumon_records(mfumon_log)
    assert "no NVML energy counter" in record.getMessage()


def test_older_binding_reads_throttle_reasons() -> None:
    nvml = h100(reasons=0x1 | 0x8)
    nvml.event_reasons = False  # nvidia-ml-py before 12.535: ...ClocksThrottleReasons only
    source = nvml_source(0, FaultLog(), nvml=nvml, period=None)
    assert source is not None
    at = [f.name for f in source.fields].index("reasons")  # the fields before it are 1 value each
    bits = source.collect()[at : at + 16]
    assert reason_names(bits) == ["gpu_idle", "hw_slowdown"]


def test_power_waits_for_a_second_of_counter_history_and_no_capped_counters_give_none() -> None:
    nvml = h100(watts=250.0, capped_ns=None)  # a driver without violation counters
    ledger = Ledger([nvml_source(0, FaultLog(), nvml=nvml, period=None)], FaultLog())
    window = Window(steps=4, tokens=128.0, model_flops=1e12, hardware_flops=1e12, seconds=0.4, wall=0.4)
    seen = []
    for pause in (0.3, 0.3, 0.6, 0.0):  # logs at 0, 0.3, 0.6 and 1.2 s: a second of history at the 4th
        seen.append(ledger.metrics(ledger.collect(), window, 1))
        time.sleep(pause)
    assert [K.POWER_W in m for m, _ in seen] == [False, False, False, True]
    metrics, details = seen[-1]
    assert metrics[K.POWER_W] == pytest.approx(250.0, rel=1e-2)  # over the 1.2 s since the first log
    assert metrics[K.JOULES_PER_TOKEN] == pytest.approx(250.0 * 0.4 / 128, rel=1e-2)  # x this window's wall
    assert all("capped_frac" not in d and d["throttle_reasons"] == [] for _, d in seen)
    assert all(m[K.SM_CLOCK_MHZ] == 1980 for m, _ in seen)


def test_an_idle_clock_gives_no_mfu_at_clock() -> None:
    nvml = h100(sm_clock_mhz=345, reasons=0x1)  # clocks down because the GPU idles at log time
    ledger = Ledger([nvml_source(0, FaultLog(), nvml=nvml, peak_flops=lambda: 1e15, period=None)], FaultLog())
    window = Window(steps=4, tokens=128.0, model_flops=1e12, hardware_flops=1e12, seconds=1.0, wall=1.0)
    metrics, details = ledger.metrics(ledger.collect(), window, 1)
    assert metrics[K.SM_CLOCK_MHZ] == 345 and details["throttle_reasons"] == ["gpu_idle"]
    assert "mfu_at_clock" not in details


def test_unknown_reason_bits_keep_their_number() -> None:
    assert reason_names([1.0, 0.0, 0.0, 1.0] + [0.0] * 7 + [1.0] + [0.0] * 4) == [
        "gpu_idle",
        "hw_slowdown",
        "bit_11",
    ]


def test_mig_slice_reads_its_gpus_clock_and_no_power(monkeypatch: pytest.MonkeyPatch, mfumon_log) -> None:
    nvml = a100_with_mig()
    nvml.gpus[0].sm_clock_mhz, nvml.gpus[0].max_sm_clock_mhz = 1275, 1410  # A100's boost clock
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", nvml.migs[0].uuid)
    faults = FaultLog()
    source = nvml_source(0, faults, nvml=nvml, period=None)
    assert isinstance(source, NvmlSource)
    ledger = Ledger([source], faults)
    ledger.collect()
    window = Window(steps=4, tokens=128.0, model_flops=1e12, hardware_flops=1e12, seconds=1.0, wall=1.0)
    metrics, _ = ledger.metrics(ledger.collect(), window, 1)
    assert metrics == {K.SM_CLOCK_MHZ: 1275}  # the parent GPU's clock; power is the whole board's
    (record,) = mfumon_records(mfumon_log)
    assert "MIG slice" in record.getMessage()


# --------------------------------------------------------------------------------------------
# memory (a GPU only)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_memory_and_nvml_keys_on_a_gpu_with_no_host_sync(tmp_path: Path) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    model = torch.nn.Linear(64, 64, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    big = 256 * 2**20  # bytes: a 256 MiB tensor allocated (and freed) inside the second window only
    with mfumon.monitor(
        model,
        seq_len=8,
        log_every=4,
        warmup=0,
        loggers=("jsonl",),
        peak_tflops=100.0,  # the device's table peak is not the point here
        run_name="mem",
        log_dir=tmp_path,
    ) as mon:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a log (or a step) that synced would raise here
        try:
            for step in range(1, 13):
                x = torch.randn(32, 64, device=device)
                model(x).sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step == 6:
                    held = torch.empty(big, dtype=torch.uint8, device=device)
                    del held  # the allocator's peak keeps it; the cache keeps the block reserved
                time.sleep(0.15)  # logs 0.6 s apart: the log at step 12 has a second of energy history
                mon.step(tokens=32)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    by_step = {r["step"]: r for r in read_jsonl(tmp_path / "mem.jsonl")}
    # The allocator's figures are host-side: a window's line shows its own peak whatever steps the
    # device had finished (a log without a finished step has no line, its reset still happens).
    assert by_step[8][K.MEM_PEAK_GIB] >= 0.25  # 256 MiB = 0.25 GiB lived in steps 5..8
    assert by_step[8][K.MEM_RESERVED_GIB] >= 0.25
    assert by_step[12][K.MEM_PEAK_GIB] < 0.25  # reset at the log of step 8
    assert all(r[K.MEM_OOMS] == 0 and r[K.MEM_ALLOC_RETRIES] == 0 for r in by_step.values())
    if not torch.version.hip:  # NVML: an NVIDIA GPU
        assert by_step[12][K.SM_CLOCK_MHZ] > 0 and "throttle_reasons" in by_step[12]
        assert by_step[12][K.POWER_W] > 0 and by_step[12][K.JOULES_PER_TOKEN] > 0


def test_the_default_samples_on_a_thread_and_a_log_reads_the_newest_sample(
    tiny, tmp_path: Path, monkeypatch
) -> None:
    """Real NVML calls take milliseconds (3.9 ms for the energy counter on an H200): by default a
    daemon thread samples every SAMPLE_PERIOD_S and a log only reads the newest sample."""
    nvml = h100(watts=300.0)  # a device drawing 300 W, on the host clock
    monkeypatch.setattr(
        health, "device_sources", functools.partial(device_sources, nvml=nvml, index=0, period=0.02)
    )
    lines, _, _, _ = train(tiny, tmp_path, steps=12, sleep_s=0.15)  # logs over 0.6 s apart: power by the 3rd
    powered = [r for r in lines if K.POWER_W in r]
    assert powered  # a second of samples by the last log
    assert all(r[K.POWER_W] == pytest.approx(300.0, rel=0.02) for r in powered)
    assert all(r[K.SM_CLOCK_MHZ] == 1980 for r in lines)
    assert not [t for t in threading.enumerate() if t.name == "mfumon-nvml"]  # close() stopped it


def test_nvml_lost_on_the_sampling_thread_is_said_once_at_a_log(
    tiny, tmp_path: Path, monkeypatch, mfumon_log
):
    nvml = h100(energy_per_read_mj=1000)
    monkeypatch.setattr(
        health, "device_sources", functools.partial(device_sources, nvml=nvml, index=0, period=0.01)
    )
    original = nvml.nvmlDeviceGetClockInfo
    calls = []

    def lost_after_five(handle, kind):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 5:
            raise NVMLError("GPU is lost")
        return original(handle, kind)

    nvml.nvmlDeviceGetClockInfo = lost_after_five
    lines, _, _, summary = train(tiny, tmp_path, steps=12, sleep_s=0.03)
    assert summary["steps"] == 12  # training went on
    assert K.SM_CLOCK_MHZ not in lines[-1]  # the keys are gone
    said = [r for r in mfumon_records(mfumon_log) if "nvml" in r.getMessage()]
    assert len(said) == 1 and "GPU is lost" in said[0].getMessage()


def test_the_sampling_thread_starts_with_the_monitor_and_ends_with_it_even_unclosed(
    tiny, monkeypatch
) -> None:
    import gc

    nvml = h100(watts=300.0)
    monkeypatch.setattr(
        health, "device_sources", functools.partial(device_sources, nvml=nvml, index=0, period=0.01)
    )
    model, opt = tiny

    def sampling() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "mfumon-nvml" and t.is_alive()]

    mon = mfumon.Monitor(model, seq_len=8, loggers=(), peak_tflops=0.5, log_every=2)
    assert not sampling()  # built, not started: no thread yet
    mon.start()
    assert len(sampling()) == 1
    mon.step(tokens=train_step(model, opt))
    del mon  # dropped without close(): the thread holds its source only weakly
    gc.collect()
    deadline = time.perf_counter() + 2.0
    while sampling() and time.perf_counter() < deadline:
        time.sleep(0.02)
    assert not sampling()


def _mismatch_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from tests.conftest import TinyLM

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if rank == 0:  # NVML answers on rank 0 only: its rows are longer than rank 1's
        health.device_sources = functools.partial(device_sources, nvml=h100(), index=0, period=None)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with mfumon.monitor(
        model, seq_len=8, log_every=4, warmup=0, peak_tflops=0.5, loggers=("jsonl",), run_name="mix",
        log_dir=out_dir,
    ) as mon:  # fmt: skip
        for _ in range(8):
            mon.step(tokens=train_step(model, opt))
    Path(out_dir, f"done{rank}").write_text(json.dumps(mon.summary()["world_size"]))
    dist.destroy_process_group()
    exit_now()


def test_ranks_whose_ledgers_differ_reduce_nothing_together_instead_of_aborting(tmp_path: Path) -> None:
    """gloo aborts the process when gathered rows differ in length: the layout is in the monitor's tag."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    spawn(_mismatch_worker, (2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"done{r}").read_text()) for r in (0, 1)] == [1, 1]  # each its own
    lines = read_jsonl(tmp_path / "mix.jsonl")
    assert [r["step"] for r in lines] == [4, 8] and all(K.SM_CLOCK_MHZ in r for r in lines)
