"""Watching one training step to see what activation checkpointing really re-runs (early stop).

See :class:`RecomputeProbe`; `mfumon.recompute.observe_recompute` is its one-step front end.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from mfumon._checkpoints import CheckpointPlan, ObservedRecompute, Rerun, find_plan
from mfumon._walk import full_shape, has_head_attrs, named_modules, own_params
from mfumon.errors import ConfigTypeError

__all__ = ["RecomputeProbe", "in_backward", "run_probed"]


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (a hook called from a
    gradient, or a forward that activation checkpointing re-runs)."""
    return torch._C._current_graph_task_id() != -1


class RecomputeProbe:
    """Hooks on the checkpointed regions that see which of their modules run again in the backward.

    Non-reentrant checkpoint stops re-running a region once every tensor its backward needs is back
    (early stop), so ops at its end whose outputs nothing saves are skipped: a pre-norm layer's last
    projection, but not an MoE output scaled by routing weights, nor a post-norm layer. Watching one
    training step, a module that finishes while autograd runs a backward was re-run and counts with
    its submodules. Of a module stopped part-way, the own work (its weights, its attention) counts
    when the submodule that started last in its forward starts again, since that input came from
    that work; a leaf counts when it starts (early stop stops at a saved tensor, after its work),
    except a Linear-like one, whose matmul saves its input before it runs. Counts are per training
    forward call: gradient accumulation divides out, and a module that a nested checkpoint re-runs
    twice counts twice. The hooks keep counters only (no tensors, no host sync) and do nothing under
    ``torch.compile``; `remove()` takes them off.
    """

    def __init__(self, model: nn.Module, plan: CheckpointPlan | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = named_modules(model)
        self.plan = find_plan(named) if plan is None else plan
        self.forward_seen = False  # a training forward ran through a region
        self.backward_seen = False  # a backward re-ran part of a region
        regions = {c.path: i for i, c in enumerate(self.plan.modules)}
        self._regions = self.plan.modules
        self._paths: list[str] = []
        self._region: list[int] = []  # innermost region of each hooked module
        index: dict[str, int] = {}
        modules: list[nn.Module] = []
        for path, m in named:
            region = _innermost(path, regions)
            if region is not None:
                index[path] = len(modules)
                self._paths.append(path)
                self._region.append(region)
                modules.append(m)
        n = len(modules)
        parent = [index.get(path.rpartition(".")[0], -1) if path else -1 for path in self._paths]
        self._children: list[list[int]] = [[] for _ in range(n)]
        for i, p in enumerate(parent):
            if p >= 0:
                self._children[p].append(i)
        self._has_own = [_has_own_work(m) for m in modules]
        self._flops = list(self._has_own)  # its subtree has parameters or attention
        for i in reversed(range(n)):  # children come after their parents
            if self._flops[i] and parent[i] >= 0:
                self._flops[parent[i]] = True
        # Own work seen when it starts: a leaf that is not one matmul (stacked experts, norms, core
        # attention) can only be stopped at its last saved tensor, after that work.
        self._on_start = [
            own and not any(self._flops[c] for c in self._children[i]) and not _one_matmul(m)
            for i, (own, m) in enumerate(zip(self._has_own, modules, strict=True))
        ]
        self._owner = [-1] * n  # nearest ancestor with own work: it finished that work before i started
        for i, p in enumerate(parent):
            if p >= 0:
                self._owner[i] = p if self._has_own[p] else self._owner[p]
        self._root_of = {index[c.path]: r for r, c in enumerate(self._regions) if c.path in index}
        self._top = [i if parent[i] < 0 else -1 for i in range(n)]  # outermost region root above i
        for i, p in enumerate(parent):
            if p >= 0:
                self._top[i] = self._top[p]
        self._training = [False] * len(self._regions)  # the region's current forward is a training one
        self._runs, self._reruns, self._own = [0] * n, [0] * n, [0] * n
        self._armed = [False] * n  # re-running, own work not yet counted
        self._last_child = [-1] * n  # the descendant that started last in i's forward
        self._active = [False] * n  # an outermost region ran something in a backward
        self.error: Exception | None = None  # first fault inside a hook; result() raises it
        self._handles = [
            h
            for i, m in enumerate(modules)
            for h in (
                m.register_forward_pre_hook(functools.partial(self._pre, i)),
                m.register_forward_hook(functools.partial(self._post, i)),
            )
        ]

    def _pre(self, i: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.error is None:
            try:
                self._pre_hook(i, module, args)
            except Exception as exc:  # a hook runs inside the user's forward: never raise there
                self.error = exc

    def _post(self, i: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.error is None:
            try:
                self._post_hook(i, module, args, output)
            except Exception as exc:  # a hook runs inside the user's forward: never raise there
                self.error = exc

    def _pre_hook(self, i: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling():
            return
        if in_backward():
            self.backward_seen = True
            self._active[self._top[i]] = True
            self._armed[i] = not self._on_start[i]
            self._own[i] += self._on_start[i]
            owner = self._owner[i]
            if owner >= 0 and self._armed[owner] and self._last_child[owner] == i:
                self._own[owner] += 1
                self._armed[owner] = False
            return
        region = self._root_of.get(i)
        if region is not None:  # a reentrant checkpoint runs the region without grad, on inputs that need it
            self._training[region] = module.training and (
                torch.is_grad_enabled() or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            )
        if self._training[self._region[i]] and self._flops[i] and self._owner[i] >= 0:
            self._last_child[self._owner[i]] = i

    def _post_hook(self, i: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if in_backward():
            self._reruns[i] += 1
            if self._armed[i]:
                self._own[i] += 1
                self._armed[i] = False
        elif self._training[self._region[i]]:
            self._runs[i] += 1
            self.forward_seen = True

    def result(self) -> ObservedRecompute | None:
        """What re-ran, per training forward; None until a backward has re-run part of a region.

        A region of which nothing ran in a backward counts whole, as the structure says.
        """
        if self.error is not None:
            raise RuntimeError(f"the recompute probe failed in a hook: {self.error!r}") from self.error
        if not self.backward_seen:
            return None
        memo: dict[int, Fraction | None] = {}
        reruns: list[Rerun] = []
        for top in sorted(set(self._top)):
            if self._active[top]:
                reruns += self._reruns_below(top, Fraction(0), memo)
            else:
                top_path = self._paths[top]
                reruns += [
                    Rerun(c.path, Fraction(1), saves=c.saves)
                    for c in self._regions
                    if c.path == top_path or c.path.startswith(top_path + ".")
                ]
        return ObservedRecompute(tuple(reruns))

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _full(self, i: int, memo: dict[int, Fraction | None]) -> Fraction | None:
        """Times per forward call that module i's whole subtree ran again; None if it never ran."""
        if i in memo:
            return memo[i]
        parts = [f for c in self._children[i] if self._flops[c] and (f := self._full(c, memo)) is not None]
        runs = self._runs[i]
        if runs and self._has_own[i]:
            parts.append(Fraction(self._own[i], runs))
        full = min(parts) if parts else None
        if runs:  # finished again, or all its work was seen re-running
            finished = Fraction(self._reruns[i], runs)
            full = finished if full is None else max(finished, full)
        memo[i] = full
        return full

    def _reruns_below(self, i: int, done: Fraction, memo: dict[int, Fraction | None]) -> list[Rerun]:
        """What re-ran in module i's subtree beyond `done` whole re-runs of it."""
        saves = self._regions[self._region[i]].saves
        out: list[Rerun] = []
        full = self._full(i, memo)
        if full is not None and full > done:
            out.append(Rerun(self._paths[i], full - done, saves=saves))
            done = full
        if self._has_own[i] and self._runs[i]:
            own = Fraction(self._own[i], self._runs[i])
            if own > done:
                out.append(Rerun(self._paths[i], own - done, own=True, saves=saves))
        for c in self._children[i]:
            if self._flops[c]:
                out += self._reruns_below(c, done, memo)
        return out


def _innermost(path: str, regions: dict[str, int]) -> int | None:
    """The innermost region (index) whose module is `path` or contains it."""
    while True:
        if path in regions:
            return regions[path]
        if not path:
            return None
        path = path.rpartition(".")[0]


def _has_own_work(m: nn.Module) -> bool:
    """Whether `m`'s own forward does counted work: its own parameters, or attention (head attributes)."""
    return bool(own_params(m)) or has_head_attrs(m)


def _one_matmul(m: nn.Module) -> bool:
    """A Linear-like module: one weight matrix and at most a bias. Its matmul saves its input before
    it runs, so early stop stops before it."""
    dims = sorted(len(full_shape(p)) for p in own_params(m))
    return dims in ([2], [1, 2])


def run_probed(make_probe: Any, step_fn: Any) -> Any:
    """Build a probe (`make_probe()`), run one training step (`step_fn()`) under it, take its hooks off."""
    if not callable(step_fn):
        raise ConfigTypeError(
            f"step_fn must be a function that runs one training step, got {type(step_fn).__name__}"
        )
    probe = make_probe()
    try:
        step_fn()
    finally:
        probe.remove()
    return probe
