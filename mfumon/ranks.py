"""The per-rank view of a window: slowest and fastest rank, largest input wait, straggler notices.

Computed from the rows every rank already exchanges once per log (`mfumon.distributed`): no
collective of its own, nothing per step. A rank's step time here is its mean step time over the
window (its device seconds / its steps); its input wait is its input-wait seconds over the step
seconds they were measured in.

Under synchronous data parallelism the gradient all-reduce holds every rank's step to the
slowest one's, so the ranks' step times come out nearly equal: a rank that is slow in its
compute shows as the others waiting inside their steps, not as its own longer step. The
step-time view names a slow rank where ranks do not wait for each other every step; a rank slow
to get its data shows in either case as the largest input wait (the others wait after their
forward, in the all-reduce, not before it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mfumon import metrics as K
from mfumon.errors import FaultLog
from mfumon.metrics import Window

__all__ = ["STRAGGLER_GAP", "STRAGGLER_WINDOWS", "RankView", "Stragglers", "rank_view"]

STRAGGLER_GAP = 0.05  # slowest rank's mean step time over the fastest's, minus 1, above which it straggles
STRAGGLER_WINDOWS = 3  # windows running before stdout says so (once per episode)


@dataclass(frozen=True)
class RankView:
    """The ranks' spread in one measured window (times in seconds; -1: no rank)."""

    step_time_max: float  # the slowest rank's mean step time
    step_time_min: float  # the fastest rank's mean step time
    slowest_rank: int
    input_wait_max: float  # the largest input-wait fraction of any rank; NaN when no rank measured it
    input_wait_max_rank: int  # -1 when no rank measured it

    def metrics(self) -> dict[str, float]:
        """Its metric keys (step times in ms); input-wait keys left out when no rank measured one."""
        out = {
            K.STEP_TIME_MAX_MS: self.step_time_max * 1e3,
            K.STEP_TIME_MIN_MS: self.step_time_min * 1e3,
            K.SLOWEST_RANK: float(self.slowest_rank),
        }
        if self.input_wait_max_rank >= 0:
            out[K.INPUT_WAIT_MAX_FRAC] = self.input_wait_max
            out[K.INPUT_WAIT_MAX_RANK] = float(self.input_wait_max_rank)
        return out

    @property
    def gap(self) -> float:
        """The slowest rank's mean step time over the fastest's, minus 1 (0.08: 8% slower)."""
        return self.step_time_max / self.step_time_min - 1.0


def rank_view(windows: Sequence[Window]) -> RankView | None:
    """The per-rank view of each rank's measured window (index = rank); None with fewer than 2
    ranks that timed a step. Ties go to the lowest rank."""
    times = [(w.seconds / w.steps, r) for r, w in enumerate(windows) if w.steps > 0 and w.seconds > 0.0]
    if len(times) < 2:
        return None
    slowest = max(times, key=lambda t: (t[0], -t[1]))
    fastest = min(times, key=lambda t: (t[0], t[1]))
    waits = [(w.input_wait / w.waited, r) for r, w in enumerate(windows) if w.steps > 0 and w.waited > 0.0]
    wait, wait_rank = max(waits, key=lambda t: (t[0], -t[1])) if waits else (math.nan, -1)
    return RankView(slowest[0], fastest[0], slowest[1], wait, wait_rank)


class Stragglers:
    """Says once per episode, through `faults`, when one rank has been the slowest by more than
    `STRAGGLER_GAP` for `STRAGGLER_WINDOWS` windows running.

    The gap is the slowest rank's mean step time against the fastest rank's, not the median's:
    both extremes come out of any reduction of the ranks' rows (a max and a min), while a median
    needs every rank's value in one place. One unusually fast rank widens the gap too; the notice
    names the two times, so a reader can tell. An episode ends at the first window in which the
    gap is 5% or less, or another rank is the slowest; the next one is reported again.
    """

    def __init__(self, faults: FaultLog) -> None:
        self._faults = faults
        self._rank = -1  # the rank of the episode in progress (-1: none)
        self._windows = 0  # windows it has been the slowest by more than the gap
        self._episodes = 0

    def observe(self, view: RankView | None, step: int, *, report: bool = True) -> None:
        """Count one measured window; `report`: this rank is the one that speaks (rank 0)."""
        if view is None or not (view.gap > STRAGGLER_GAP):
            self._rank, self._windows = -1, 0
            return
        if view.slowest_rank != self._rank:
            self._rank, self._windows = view.slowest_rank, 0
            self._episodes += 1
        self._windows += 1
        if self._windows == STRAGGLER_WINDOWS and report:
            wait = (
                f", its input wait {view.input_wait_max * 100:.0f}% of its step time"
                if view.input_wait_max_rank == view.slowest_rank and view.input_wait_max > STRAGGLER_GAP
                else ""  # its data loading, when that is its own and notable
            )
            self._faults.report(
                f"straggler/{self._episodes}",
                "mfumon: rank %d has been the slowest rank for %d windows (+%.0f%% step time vs the "
                "fastest rank: %.1f vs %.1f ms at step %d%s); said once until it catches up",
                view.slowest_rank,
                STRAGGLER_WINDOWS,
                view.gap * 100,
                view.step_time_max * 1e3,
                view.step_time_min * 1e3,
                step,
                wait,
            )
