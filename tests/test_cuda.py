"""The CUDA timing path: runs where a GPU is present (skipped on the CPU-only CI)."""

from __future__ import annotations

import time

import pytest
import torch

import mfumon

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FPT = 1_000_000


def _busy(cycles: int = 20_000_000) -> None:
    """Queue GPU work (a spin kernel of `cycles` clock cycles) without the host waiting."""
    torch.cuda._sleep(cycles)


def _event() -> torch.cuda.Event:
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def test_step_never_syncs_the_host_and_times_the_device() -> None:
    tokens = torch.tensor(0, device="cuda")
    mon = mfumon.Monitor(
        flops_per_token=FPT, peak_tflops=100.0, device="cuda", loggers=(), log_every=5, warmup=0
    )
    mon.start()
    marks = [_event()]  # the test's own clock on the device timeline, at the same stream points
    t0 = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            _busy()
            mon.step(tokens=tokens + 1000)  # a device tensor, never read at step time
            marks.append(_event())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host_s = time.perf_counter() - t0
    mon.close()
    device_s = sum(a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)) / 1e3
    s = mon.summary()
    assert s["steps"] == 20 and s["tokens"] == 20 * 1000
    assert host_s < device_s / 2  # the host ran ahead: step() did not wait for the GPU
    assert s["seconds"] == pytest.approx(device_s, rel=0.02)  # the device's timeline, not the host's


def test_log_reads_only_finished_steps_and_does_not_wait() -> None:
    from tests.test_monitor import Recorder

    rec = Recorder()
    mon = mfumon.Monitor(
        flops_per_token=FPT, peak_tflops=100.0, device="cuda", loggers=(rec,), log_every=4, warmup=0
    )
    mon.start()
    marks = [_event()]
    t0 = time.perf_counter()
    for _ in range(8):
        _busy(100_000_000)  # tens of ms each on the GPU; the host runs ahead
        mon.step(tokens=100)
        marks.append(_event())
    host_s = time.perf_counter() - t0
    assert mon._timer.pending > 0  # the logs at steps 4 and 8 left unfinished steps for later
    mon.close()  # resolves everything, once
    device_s = sum(a.elapsed_time(b) for a, b in zip(marks, marks[1:], strict=False)) / 1e3
    assert host_s < device_s / 2  # the logs did not wait for the queued work
    assert mon.summary()["steps"] == 8 and rec.summary is not None and rec.summary["steps"] == 8
    assert mon.summary()["seconds"] == pytest.approx(device_s, rel=0.02)
    # steps carried over past the last log join the totals, not a second window at step 8
    assert [step for step, _ in rec.logs] == sorted({step for step, _ in rec.logs})
