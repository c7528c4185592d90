"""What activation checkpointing runs again in the backward pass (the HFU extra), found on the model.

A checkpointed module keeps only its inputs in the forward pass and runs its forward again in the
backward, so each one adds its forward FLOPs once more: 2 per matmul weight per token plus its
attention forward (8N instead of 6N for a fully checkpointed layer). Found by structure:

- transformers layers (``GradientCheckpointingLayer``, what ``gradient_checkpointing_enable()`` and
  ``activation_checkpointing_enable()`` switch on, ``every_n_layers`` included) whose
  ``gradient_checkpointing`` flag is set;
- torch's ``CheckpointWrapper`` (``checkpoint_wrapper``, ``apply_activation_checkpointing``, Lightning's
  FSDP ``activation_checkpointing_policy``, torchtitan) and the composable
  ``torch.distributed._composable.checkpoint``;
- selective (per-op) checkpointing whose ``context_fn`` is
  ``functools.partial(create_selective_checkpoint_contexts, [ops])``: the region's matmuls are not re-run
  when the list holds their kernels (``aten.mm`` for weights without bias, ``aten.addmm`` with one,
  ``aten.mm``/``bmm``/``_grouped_mm`` for stacked experts), its attention when the list holds an
  attention kernel (an SDPA kernel or ``aten.bmm``). A policy function is opaque.

Not visible: ``torch.utils.checkpoint`` called inside a custom ``forward``, models that checkpoint their
layers from the parent's forward (old transformers style), selective policy functions. Where there is
evidence of one of these, a single MfumonWarning says so and it counts 0 (HFU = MFU for that part);
``recompute=`` says what it re-runs. Modules are found at setup: enable checkpointing before the
monitor is built.

This count is structural: each region re-runs its whole forward. PyTorch's non-reentrant checkpoint
stops early, skipping ops at the end of a region whose outputs nothing saves, and which ops those are
depends on the architecture. So the Monitor watches the first training step with a
:class:`RecomputeProbe` and replaces the structural count with what it saw re-running;
:func:`observe_recompute` does the same for one step outside the monitor, and its result is a
``recompute=`` value.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from fractions import Fraction
from typing import Any

from torch import nn

from mfumon._checkpoints import (
    ATTENTION,
    MATMUL,
    Checkpointed,
    CheckpointPlan,
    ObservedRecompute,
    Rerun,
    find_plan,
)
from mfumon._probe import RecomputeProbe, run_probed
from mfumon._walk import named_modules
from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning

__all__ = [
    "ATTENTION",
    "MATMUL",
    "RECOMPUTE_MODES",
    "CheckpointPlan",
    "Checkpointed",
    "ObservedRecompute",
    "RecomputeProbe",
    "Rerun",
    "check_recompute",
    "find_checkpointing",
    "observe_recompute",
    "reruns",
]

RECOMPUTE_MODES = ("auto", "none")
_CHOICES = (
    "'auto', 'none', a fraction in [0, 1] of the model's forward FLOPs that is recomputed, "
    "or the checkpointed modules (a module or an iterable of modules)"
)


def check_recompute(recompute: Any) -> str | float | tuple[nn.Module, ...] | ObservedRecompute:
    """`recompute=` validated: "auto", "none", a fraction in [0, 1], modules, or an observation."""
    if isinstance(recompute, ObservedRecompute):
        return recompute
    if isinstance(recompute, str):
        if recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"recompute must be {_CHOICES}; got {recompute!r}")
        return recompute
    if isinstance(recompute, nn.Module):
        return (recompute,)
    if isinstance(recompute, numbers.Real) and not isinstance(recompute, bool):
        value = float(recompute)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"recompute must be {_CHOICES}; got the number {recompute!r}")
        return value
    if isinstance(recompute, Iterable) and not isinstance(recompute, (bytes, dict)):
        modules = tuple(recompute)
        bad = [m for m in modules if not isinstance(m, nn.Module)]
        if bad:
            raise ConfigTypeError(
                "recompute= takes nn.Module instances as the checkpointed modules, "
                f"got {type(bad[0]).__name__}"
            )
        return modules
    raise ConfigTypeError(f"recompute must be {_CHOICES}; got {type(recompute).__name__} {recompute!r}")


def reruns(model: nn.Module, recompute: tuple[nn.Module, ...] | ObservedRecompute | str) -> tuple[Rerun, ...]:
    """The modules that re-run, per training forward, for a `check_recompute` value.

    "auto": the checkpointed modules found on the model (one MfumonWarning for checkpointing it
    cannot see); modules: each once; an observation: what it saw, checked against the model.
    """
    named = named_modules(model)
    if isinstance(recompute, ObservedRecompute):
        paths = {path for path, _ in named}
        for rerun in recompute.reruns:
            if rerun.path not in paths:
                raise ConfigError(
                    f"recompute= holds an observation of another model: it has no module {rerun.path!r}"
                )
        return recompute.reruns
    if isinstance(recompute, tuple):
        paths_of = {id(m): path for path, m in named}
        missing = [m for m in recompute if id(m) not in paths_of]
        if missing:
            raise ConfigError(
                f"recompute= modules must be submodules of the model; {type(missing[0]).__name__} is not"
            )
        return tuple(Rerun(paths_of[id(m)], Fraction(1)) for m in dict.fromkeys(recompute))
    plan = find_plan(named)
    if plan.hidden:
        warnings.warn(
            "mfumon cannot see what activation checkpointing recomputes in: "
            + "; ".join(plan.hidden)
            + ". Those recomputed FLOPs are not in HFU (HFU = MFU for them); pass recompute= "
            + "(the checkpointed modules, or a fraction of the forward FLOPs) to count them, "
            + "or recompute='none' to silence this.",
            MfumonWarning,
            stacklevel=3,  # reruns <- flop_breakdown <- its caller
        )
    return tuple(Rerun(c.path, Fraction(1), saves=c.saves) for c in plan.modules)


def find_checkpointing(model: nn.Module) -> CheckpointPlan:
    """The modules of `model` that activation checkpointing re-runs, and what cannot be seen."""
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return find_plan(named_modules(model))


def observe_recompute(model: nn.Module, step_fn: Callable[[], Any]) -> ObservedRecompute:
    """What activation checkpointing re-runs in `step_fn()`, one training step (forward and backward).

    Pass the result as ``flop_breakdown(model, seq_len, recompute=...)``: its ``.recompute`` is then
    what the step re-ran, early stop included (the Monitor does this on its own at the first step).
    """
    probe = run_probed(lambda: RecomputeProbe(model), step_fn)
    observed = probe.result()
    if observed is None:
        if probe.plan.modules:
            raise ConfigError(
                "step_fn ran no backward pass through the checkpointed modules; pass a function that "
                "runs one training step of the model (its forward and loss.backward())"
            )
        observed = ObservedRecompute(())
    return observed
