"""Times one training step per component on the device timeline: `StepRecorder` (see `mfumon.profiling`).

Marks are CUDA events on the current stream (the CPU: `time.perf_counter()`), recorded by hooks that
live only between `arm()` and `finish()`; `finish()` reads them with one sync and gives each slice
between two marks to the component of the innermost module then open (`mfumon.roofline` labels them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from mfumon._probe import in_backward
from mfumon.roofline import COMPONENTS, OPTIMIZER, OTHER, ComponentMap, component_map

__all__ = ["StepRecorder"]

_OPEN_F, _CLOSE_F, _OPEN_B, _CLOSE_B, _TICK = range(5)  # mark kinds
_OPT = -1  # the optimizer's unit index


class StepRecorder:
    """Times one step per component: `arm()` before it, `finish()` after (one sync); hooks only between."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device, self.cuda = model, device, device.type == "cuda"
        self.map: ComponentMap = component_map(model)
        self.units = self.map.units
        index = {id(m): i for i, (_, m, _) in enumerate(self.units)}
        self._ancestors: list[set[int]] = []
        for path, m, _ in self.units:
            up = {
                index[id(a)] for p, a, _ in self.units if a is not m and (p == "" or path.startswith(p + "."))
            }
            self._ancestors.append(up)
        self._handles: list[Any] = []
        self._marks: list[tuple[Any, int, int, bool]] = []  # (clock, kind, unit, inside backward)
        self.optimizers: list[torch.optim.Optimizer] = []
        self._waiting: dict[int, set[int]] = {}  # unit -> parameter ids whose gradient ends its backward
        self.failed: BaseException | None = None
        self.armed = False
        self.unit_seconds: dict[int, float] = {}  # seconds of each unit's own time (finish() fills it)

    # -- marks ---------------------------------------------------------------------------------
    def _mark(self, kind: int, unit: int) -> None:
        if self.cuda:
            clock: Any = torch.cuda.Event(enable_timing=True)
            clock.record(torch.cuda.current_stream(self.device))
        else:
            clock = time.perf_counter()
        # inside the autograd engine (backward hooks, and forwards re-run by activation checkpointing)
        self._marks.append((clock, kind, unit, in_backward()))

    def _safe(self, fn: Callable[..., None]) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # a hook must never break the training step
                self.failed = self.failed or exc

        return hook

    def arm(self) -> None:
        """Install the hooks and mark the step's start."""
        self._marks, self.optimizers, self._waiting, self.failed = [], [], {}, None
        for i, (_, m, _) in enumerate(self.units):
            self._handles.append(m.register_forward_pre_hook(self._safe(self._pre(i)), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._safe(self._post(i)), with_kwargs=True))
        seen: set[int] = set()
        for p in self.map.root.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._safe(self._accumulated)))
        self._handles.append(register_optimizer_step_pre_hook(self._safe(self._opt_pre)))
        self._handles.append(register_optimizer_step_post_hook(self._safe(self._opt_post)))
        self.armed = True
        self._mark(_OPEN_F, _OPT - 1)  # the start: no unit

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.armed = [], False

    def _pre(self, unit: int) -> Callable[..., None]:
        def pre(module: nn.Module, args: Any, kwargs: Any) -> None:
            self._mark(_OPEN_F, unit)

        return pre

    def _post(self, unit: int) -> Callable[..., None]:
        params = {id(p) for p in self.units[unit][1].parameters() if p.requires_grad}

        def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            self._mark(_CLOSE_F, unit)
            if not torch.is_grad_enabled():
                return
            outs = _grad_tensors(output)
            if not outs:
                return
            graph = torch.autograd.graph
            self._handles.append(
                graph.register_multi_grad_hook(
                    outs, self._safe(lambda _: self._mark(_OPEN_B, unit)), mode="any"
                )
            )
            ins = _grad_tensors((args, kwargs))
            if ins:
                done = self._safe(lambda _: self._mark(_CLOSE_B, unit))
                self._handles.append(graph.register_multi_grad_hook(ins, done, mode="all"))
            elif params:
                self._waiting[unit] = set(params)

        return post

    def _accumulated(self, p: torch.Tensor) -> None:
        self._mark(_TICK, 0)
        for unit, waits in list(self._waiting.items()):
            waits.discard(id(p))
            if not waits:
                del self._waiting[unit]
                self._mark(_CLOSE_B, unit)

    def _opt_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if all(o is not optimizer for o in self.optimizers):
            self.optimizers.append(optimizer)
        self._mark(_OPEN_F, _OPT)

    def _opt_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._mark(_CLOSE_F, _OPT)

    # -- reading -------------------------------------------------------------------------------
    def finish(self) -> tuple[dict[str, float], float]:
        """Mark the end, remove the hooks, read the marks (one sync): seconds per component, step seconds."""
        self._mark(_CLOSE_F, _OPT - 1)
        self.remove()
        if self.failed is not None:
            raise RuntimeError(f"a profiling hook failed: {self.failed!r}") from self.failed
        marks = self._marks
        if self.cuda:
            marks[-1][0].synchronize()  # host sync: once per profiled step, after it
            start = marks[0][0]
            times = [0.0] + [start.elapsed_time(m[0]) / 1e3 for m in marks[1:]]
        else:
            times = [m[0] - marks[0][0] for m in marks]
        times = [max(t, times[i - 1]) if i else t for i, t in enumerate(times)]  # clocks never run back
        return self._attribute(times), times[-1]

    def _attribute(self, times: list[float]) -> dict[str, float]:
        """Each slice between two marks to the owner then open (see the module docstring)."""
        seconds = dict.fromkeys(COMPONENTS, 0.0)
        seconds["compiled"] = 0.0
        open_at: dict[int, list[int]] = {}  # unit -> order numbers of its open calls
        from_backward: set[int] = set()
        marks = self._marks
        for i, (_, kind, unit, backward) in enumerate(marks[:-1]):
            if kind in (_OPEN_F, _OPEN_B) and unit >= _OPT:
                open_at.setdefault(unit, []).append(i)
                if kind == _OPEN_B:
                    from_backward.add(unit)
            elif kind in (_CLOSE_F, _CLOSE_B) and open_at.get(unit):
                open_at[unit].pop()
                if not open_at[unit]:
                    del open_at[unit]
            if (
                backward and not marks[i + 1][3]
            ):  # the backward pass ended: what it opened and left open closes
                for u in from_backward:
                    open_at.pop(u, None)
                from_backward.clear()
            unit, dt = self._owner(open_at), times[i + 1] - times[i]
            seconds[OTHER if unit is None else OPTIMIZER if unit == _OPT else self.units[unit][2]] += dt
            if unit is not None and unit >= 0:  # per unit too: MoE layers get a row each
                self.unit_seconds[unit] = self.unit_seconds.get(unit, 0.0) + dt
        return seconds

    def _owner(self, open_at: Mapping[int, list[int]]) -> int | None:
        """The unit whose own time this slice is (the optimizer: -1; None: no module open, other)."""
        if not open_at:
            return None
        inner = [
            u for u in open_at if u == _OPT or not any(u in self._ancestors[v] for v in open_at if v >= 0)
        ]
        return max(inner, key=lambda u: open_at[u][-1])


def _grad_tensors(value: Any) -> list[torch.Tensor]:
    """Tensors in a (nested) output or argument structure that need a gradient."""
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
    return found
