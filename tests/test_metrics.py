from __future__ import annotations

import pytest

from mfumon import metrics as K
from mfumon.metrics import EMPTY_WINDOW, Window, combine_ranks, window_metrics


def test_window_metrics_arithmetic() -> None:
    # 10 steps, 40,960 tokens on 2 devices in 2 s; 6e9 model FLOPs/token, 8e9 with recompute
    w = Window(steps=10, tokens=40_960, model_flops=40_960 * 6e9, hardware_flops=40_960 * 8e9, seconds=2.0)
    m = window_metrics(w, world_size=2, peak_flops=100e12)
    assert m[K.TOKENS_PER_S] == 20_480  # 40,960 / 2 s
    assert m[K.TOKENS_PER_S_PER_DEVICE] == 10_240  # / 2 devices
    assert m[K.STEP_TIME_MS] == 200  # 2 s / 10 steps
    assert m[K.TFLOPS_PER_DEVICE] == pytest.approx(61.44)  # 40,960 * 6e9 / 2 s / 2 / 1e12
    assert m[K.HW_TFLOPS_PER_DEVICE] == pytest.approx(81.92)  # with 8e9
    assert m[K.MFU] == pytest.approx(0.6144)  # 61.44 / 100
    assert m[K.HFU] == pytest.approx(0.8192)
    assert m[K.PEAK_TFLOPS] == 100


def test_no_peak_means_no_utilization_keys() -> None:
    m = window_metrics(Window(1, 10.0, 10.0, 10.0, 1.0), world_size=1, peak_flops=None)
    assert K.MFU not in m and K.HFU not in m and K.PEAK_TFLOPS not in m
    assert window_metrics(EMPTY_WINDOW, world_size=1, peak_flops=1e12) == {}
    assert window_metrics(Window(1, 1.0, 1.0, 1.0, 0.0), world_size=1, peak_flops=1e12) == {}


def test_combine_ranks_sums_work_and_takes_the_slowest_time() -> None:
    fast = Window(5, 500.0, 5e9, 5e9, 1.0)  # 100 tokens/step, 0.2 s/step
    slow = Window(5, 1500.0, 15e9, 15e9, 3.0)  # 300 tokens/step, 0.6 s/step
    g = combine_ranks([fast, slow], world_size=2)
    assert g == Window(5, 2000.0, 20e9, 20e9, 3.0)


def test_combine_ranks_with_uneven_resolution() -> None:
    # rank 1 had resolved only 4 of 5 steps at log time: compare per step
    a = Window(5, 500.0, 5.0, 5.0, 1.0)  # 100 tok/step, 0.2 s/step
    b = Window(4, 400.0, 4.0, 4.0, 1.2)  # 100 tok/step, 0.3 s/step
    g = combine_ranks([a, b], world_size=2)
    assert g.steps == 5 and g.tokens == pytest.approx(1000.0) and g.seconds == pytest.approx(1.5)
    # a rank with nothing resolved counts as the mean of the others
    g = combine_ranks([a, EMPTY_WINDOW], world_size=2)
    assert g.tokens == pytest.approx(1000.0) and g.seconds == pytest.approx(1.0)
    assert combine_ranks([EMPTY_WINDOW, EMPTY_WINDOW], world_size=2) == EMPTY_WINDOW
