"""Step timing on the device's own timeline, with no host synchronization per step.

On CUDA every optimizer step records one event on the current stream; on the CPU it takes
`time.perf_counter()`. Nothing is read back at step time. At log time `resolve()` walks the
recorded steps in order and stops at the first one the device has not finished yet
(`Event.query()` does not block), so a log never waits for the GPU queue to drain; unfinished
steps are carried over to the next log.

Token counts may be 0-d device tensors (e.g. `attention_mask.sum()`), and so may a step's extra
FLOPs (its own attention shapes, see `mfumon.steps`). They are copied asynchronously into pinned
host memory before the step's event is recorded, so by the time the event has completed the
values are on the host and can be read without a sync.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, NamedTuple

import torch

__all__ = ["StepRecord", "StepTimer"]


class StepRecord(NamedTuple):
    """One resolved optimizer step: its 1-based index, device seconds (None if untimed) and tokens.

    `extra_flops`: model FLOPs beyond tokens x flops_per_token, from the step's own shapes (0: none).
    `span`: seconds from the end of the previous step (or `start()`) to its end, paused time
    included (None when unknown). `input_wait`: seconds from its start to its first forward (data
    loading, host work), None when not measured (no forward seen, or a pause inside the step).
    """

    index: int
    seconds: float | None
    tokens: float
    extra_flops: float = 0.0
    span: float | None = None
    input_wait: float | None = None


class _Recorded:
    """One recorded step, waiting for the device to finish it."""

    __slots__ = ("banked", "end", "extra", "forward", "index", "previous", "start", "tokens")

    def __init__(
        self,
        index: int,
        start: Any,
        end: Any,
        tokens: Any,
        banked: Any,
        extra: Any,
        previous: Any,
        forward: Any,
    ) -> None:
        self.index = index
        self.start = start  # mark at which it began or last resumed; None when it ended while paused
        self.end = end
        self.tokens = tokens  # int/float, or a pinned 0-d CPU tensor filled asynchronously
        self.banked = banked  # (start, pause) spans it ran before pauses, usually none
        self.extra = extra  # None, a number, or a pinned 0-d CPU tensor, like tokens
        self.previous = previous  # the previous step's end (or the first start()): its span starts here
        self.forward = forward  # mark at its first forward, None if none was seen


class StepTimer:
    """Records a mark per step and resolves finished steps lazily.

    `device` selects the clock: CUDA events for a CUDA device, `time.perf_counter` otherwise.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._pending: deque[_Recorded] = deque()
        self._last: Any = None  # mark the next step starts from; None while paused
        self._previous: Any = None  # the last step's end (or the first start()): spans chain from it
        self._forward: Any = None  # mark at the first forward of the step in progress
        self._untimed = False  # the next step is profiled: no time, no span (untime_next)
        self.last_paused = False  # whether the last marked step held a pause
        self._banked: list[tuple[Any, Any]] = []  # spans of the step in progress before a pause
        self._free_events: list[torch.cuda.Event] = []
        self._free_slots: list[torch.Tensor] = []

    # -- marks ---------------------------------------------------------------------------------
    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _ready(self, mark: Any) -> bool:
        return True if not self.cuda else bool(mark.query())

    def _elapsed_s(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        return start.elapsed_time(end) / 1e3  # both events have completed: no host sync

    def _release(self, mark: Any) -> None:
        if self.cuda and mark is not None and mark is not self._last and mark is not self._previous:
            self._free_events.append(mark)

    # -- public --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or resume) timing: the next step is measured from here."""
        if self._last is None:
            self._last = self._mark()
            if self._previous is None:
                self._previous = self._last

    def forward_pre_hook(self, module: Any, args: Any) -> None:
        """`mark_forward` as a forward pre-hook (the monitor puts it on the model's root and children).

        Evaluation forwards (the module in eval mode) are no step's first forward. Under
        torch.compile the hook is traced to nothing (no graph break, `fullgraph=True` works): a
        compiled model's steps have no input wait measured, and the key is left out.
        """
        if torch.compiler.is_compiling() or not module.training:
            return
        self.mark_forward()

    def mark_forward(self) -> None:
        """Mark the first forward of the step in progress (a forward pre-hook calls it); the time
        from the step's start to here is its input wait. Later forwards, and forwards while paused
        (evaluation), record nothing: a flag check and no mark."""
        if self._forward is None and self._last is not None and not self._banked:
            self._forward = self._mark()

    def restart(self) -> None:
        """The step in progress starts now, not at the last step's end: the time in between (the
        monitor's own log work, its wait for other ranks) belongs to no step; spans keep it (wall
        time). One mark, once per log; nothing when paused or once the step's forward has begun."""
        if self._last is not None and self._forward is None and not self._banked:
            self._last = self._mark()

    def pause(self) -> None:
        """Stop timing until `start()`; time in between (e.g. evaluation) belongs to no step.

        The step in progress keeps the time it ran before the pause (one mark more, per pause), unless
        it also ends while paused: then it is not timed at all.
        """
        if self._last is not None:
            self._banked.append((self._last, self._mark()))
        self._last = None

    @property
    def paused(self) -> bool:
        """True between `pause()` and the next `start()`."""
        return self._last is None

    def mark_step(self, index: int, tokens: int | float | torch.Tensor, extra: Any = None) -> None:
        """Mark the end of step `index`, which processed `tokens` (a number or a 0-d tensor).

        `extra`: its model FLOPs beyond tokens x flops_per_token (None, a number or a 0-d tensor).
        """
        if isinstance(tokens, torch.Tensor):
            tokens = self._stage(tokens)
        if extra is not None and isinstance(extra, torch.Tensor):
            extra = self._stage(extra)
        end = self._mark()
        banked: Any = ()  # no pause in this step: the common case, nothing allocated
        if self._banked:
            banked, self._banked = self._banked, []
        forward, self._forward = self._forward, None
        self.last_paused = bool(banked) or self._last is None  # a pause inside it (its profile is void)
        start, previous = self._last, self._previous
        if self._untimed:  # profiled: its hooks slowed it, and its time is the profile's
            start = previous = None
            self._untimed = False
        self._pending.append(_Recorded(index, start, end, tokens, banked, extra, previous, forward))
        self._previous = end
        if self._last is not None:  # a step that ends while paused leaves the timer paused
            self._last = end

    def untime_next(self) -> None:
        """Leave the next step out of every window and the wall time (no time, no span): a profiled step."""
        self._untimed = True

    def _stage(self, tokens: torch.Tensor) -> Any:
        if tokens.device.type == "cpu":
            return tokens.detach().to(torch.float64, copy=True).reshape(())  # a copy: the caller may reuse it
        slot = (
            self._free_slots.pop()
            if self._free_slots
            else torch.empty((), dtype=torch.float64, pin_memory=self.cuda)
        )
        slot.copy_(tokens.detach().reshape(()), non_blocking=True)  # lands before the event completes
        return slot

    def finished_through(self, default: int) -> int:
        """Index of the last step that, with every step before it, the device has finished.

        `default` when nothing is pending. Never blocks.
        """
        last = default
        for rec in self._pending:
            if not self._ready(rec.end):
                return rec.index - 1
            last = rec.index
        return last

    def resolve(self, *, wait: bool = False, upto: int | None = None) -> list[StepRecord]:
        """Finished steps since the last call, in order, up to step index `upto` when given.

        With `wait`, block until all recorded steps are done first (used once, at close).
        """
        if wait and self.cuda and self._pending:
            self._pending[-1].end.synchronize()  # host sync: only at close(), once
        out: list[StepRecord] = []
        pending, cuda = self._pending, self.cuda  # the loop runs once per step: no needless calls
        while pending and (upto is None or pending[0].index <= upto) and (not cuda or pending[0].end.query()):
            rec = pending.popleft()
            seconds = None if rec.start is None else self._elapsed_s(rec.start, rec.end)
            if seconds is not None and rec.banked:  # the time it ran before each pause
                seconds += sum(self._elapsed_s(start, paused) for start, paused in rec.banked)
            span = None if rec.previous is None else self._elapsed_s(rec.previous, rec.end)
            wait = None
            if rec.forward is not None and rec.start is not None and not rec.banked:
                wait = min(max(self._elapsed_s(rec.start, rec.forward), 0.0), seconds or 0.0)
            tokens, extra = rec.tokens, rec.extra
            if isinstance(tokens, torch.Tensor):
                tokens = self._read(tokens)
            extra = 0.0 if extra is None else self._read(extra)
            out.append(StepRecord(rec.index, seconds, float(tokens), extra, span, wait))
            if cuda:  # CPU marks are floats: nothing to release
                # Its end is the next step's start and span start: released with that one. The
                # previous end may also open a banked span: each event goes back once.
                self._release(rec.previous)
                if rec.start is not rec.previous:
                    self._release(rec.start)
                self._release(rec.forward)
                if rec.start is not None:
                    for start, paused in rec.banked:
                        if start is not rec.previous:
                            self._release(start)
                        self._release(paused)
        return out

    def _read(self, value: Any) -> float:
        """A staged value as a float; a tensor is a CPU tensor already written: no device sync."""
        out = float(value)
        if isinstance(value, torch.Tensor) and value.is_pinned():
            self._free_slots.append(value)  # the slot is free for a later step
        return out

    @property
    def pending(self) -> int:
        """Steps recorded but not yet resolved."""
        return len(self._pending)
