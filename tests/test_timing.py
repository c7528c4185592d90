from __future__ import annotations

import time

import torch

from mfumon.timing import StepTimer


def test_cpu_timer_resolves_steps_in_order_with_their_tokens() -> None:
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    for i in range(1, 4):
        time.sleep(0.01 * i)
        timer.mark_step(i, tokens=10 * i)
    recs = timer.resolve()
    assert [r.index for r in recs] == [1, 2, 3]
    assert [r.tokens for r in recs] == [10, 20, 30]
    for r, expected in zip(recs, (0.01, 0.02, 0.03), strict=True):
        assert expected <= r.seconds < expected + 0.05  # sleep is a lower bound
    assert timer.resolve() == [] and timer.pending == 0


def test_paused_time_belongs_to_no_step() -> None:
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    timer.mark_step(1, tokens=1)
    timer.pause()
    time.sleep(0.05)
    timer.mark_step(2, tokens=1)  # started while paused: untimed
    timer.start()
    time.sleep(0.01)
    timer.mark_step(3, tokens=1)
    recs = timer.resolve()
    assert recs[1].seconds is None
    assert 0.01 <= recs[2].seconds < 0.05


def test_tensor_tokens_are_read_at_resolve_time() -> None:
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    timer.mark_step(1, tokens=torch.tensor(7))
    assert timer.resolve()[0].tokens == 7.0
