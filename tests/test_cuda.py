"""The CUDA timing path: runs where a GPU is present (skipped on the CPU-only CI)."""

from __future__ import annotations

import time

import pytest
import torch

import mfumon
from mfumon import metrics as K

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FPT = 1_000_000


def _busy(ms: float) -> None:
    """Keep the GPU busy for about `ms` milliseconds without the host waiting."""
    torch.cuda._sleep(int(ms * 1e-3 * _cycles_per_s()))


_CYCLES: list[float] = []


def _cycles_per_s() -> float:
    """GPU clock cycles per second of `torch.cuda._sleep`, measured once the clocks have ramped up."""
    if not _CYCLES:
        rates = []
        for _ in range(3):  # the first runs on a cold GPU are at a lower clock: keep the last
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(100_000_000)
            end.record()
            end.synchronize()
            rates.append(100_000_000 / (start.elapsed_time(end) / 1e3))
        _CYCLES.append(rates[-1])
    return _CYCLES[0]


def test_step_never_syncs_the_host_and_times_the_device() -> None:
    tokens = torch.tensor(0, device="cuda")
    mon = mfumon.Monitor(
        flops_per_token=FPT, peak_tflops=100.0, device="cuda", loggers=(), log_every=5, warmup=0
    )
    mon.start()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            _busy(20)  # each step: 20 ms of GPU work, queued without waiting
            mon.step(tokens=tokens + 1000)  # a device tensor, never read at step time
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mon.close()
    s = mon.summary()
    assert s["steps"] == 20 and s["tokens"] == 20 * 1000
    assert s[K.STEP_TIME_MS] == pytest.approx(20.0, rel=0.15)  # the device's timeline, not the host's


def test_log_reads_only_finished_steps_and_does_not_wait() -> None:
    from tests.test_monitor import Recorder

    rec = Recorder()
    mon = mfumon.Monitor(
        flops_per_token=FPT, peak_tflops=100.0, device="cuda", loggers=(rec,), log_every=4, warmup=0
    )
    mon.start()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(8):
        _busy(50)  # 8 x 50 ms queued; the host runs ahead
        mon.step(tokens=100)
    host_s = time.perf_counter() - t0
    assert host_s < 0.2  # the logs at steps 4 and 8 did not wait for 400 ms of queued work
    assert mon._timer.pending > 0  # unfinished steps carried over
    mon.close()  # resolves everything, once
    assert mon.summary()["steps"] == 8 and rec.summary is not None and rec.summary["steps"] == 8
    # steps carried over past the last log join the totals, not a second window at step 8
    assert [step for step, _ in rec.logs] == sorted({step for step, _ in rec.logs})
    assert mon.summary()[K.STEP_TIME_MS] == pytest.approx(50.0, rel=0.15)
