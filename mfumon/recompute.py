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

import functools
import inspect
import math
import numbers
import sys
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mfumon.errors import ConfigError, ConfigTypeError, MfumonWarning
from mfumon.params import HEADS_ATTRS, QK_DIM_ATTRS, _module_int, _named_modules

if TYPE_CHECKING:
    from mfumon.flops import FlopBreakdown

__all__ = [
    "RECOMPUTE_MODES",
    "CheckpointPlan",
    "Checkpointed",
    "ObservedRecompute",
    "RecomputeProbe",
    "Rerun",
    "find_checkpointing",
    "observe_recompute",
    "recompute_flops",
]

RECOMPUTE_MODES = ("auto", "none")
MATMUL, ATTENTION = "matmul", "attention"  # what a selective policy may keep instead of re-running

# FlopBreakdown fields re-run unless a selective policy keeps the category; `other` is always re-run.
_FIELDS = {
    MATMUL: ("attn_proj", "mlp", "router", "lm_head", "embedding"),
    ATTENTION: ("attn_scores", "softmax"),
}
_ALWAYS = ("other",)
_ATTENTION_OPS = frozenset(
    "aten::" + name
    for name in (
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
)
_MM, _ADDMM = frozenset({"aten::mm"}), frozenset({"aten::addmm"})
_STACKED_OPS = frozenset({"aten::mm", "aten::bmm", "aten::_grouped_mm"})  # stacked experts: kernel varies
_WRAPPER_MODULE = "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"
_CHECKPOINT_FUNCTIONS = ("checkpoint", "checkpoint_sequential")
_CHOICES = (
    "'auto', 'none', a fraction in [0, 1] of the model's forward FLOPs that is recomputed, "
    "or the checkpointed modules (a module or an iterable of modules)"
)


@dataclass(frozen=True)
class Checkpointed:
    """One module whose forward runs again in the backward pass."""

    path: str  # its path in the model ("" for the model itself)
    source: str  # "transformers", "checkpoint_wrapper", "composable" or "recompute="
    saves: frozenset[str] = frozenset()  # kept by a selective policy, not re-run: "matmul", "attention"


@dataclass(frozen=True)
class CheckpointPlan:
    """Activation checkpointing found on a model."""

    modules: tuple[Checkpointed, ...]  # each re-runs its forward (less what it saves) once more
    hidden: tuple[str, ...]  # checkpointing that is there but whose recompute cannot be seen


@dataclass(frozen=True)
class Rerun:
    """A module seen running again in the backward pass, `times` per training forward."""

    path: str  # its path in the model
    times: Fraction  # re-runs per forward call (2 when a nested checkpoint re-runs it twice)
    own: bool = False  # only its own work (its parameters, its attention), not its submodules'
    saves: frozenset[str] = frozenset()  # its region's selective policy: "matmul", "attention"


@dataclass(frozen=True)
class ObservedRecompute:
    """What checkpointing re-ran in an observed training step; pass it as `recompute=`."""

    reruns: tuple[Rerun, ...]


# --- formula ----------------------------------------------------------------------------------


def forward_flops(training_flops: int) -> int:
    return (2 * training_flops + 3) // 6  # training = 3 x forward (backward 2x forward), rounded half up


# --- the override -----------------------------------------------------------------------------


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


def recompute_flops(
    model: nn.Module,
    recompute: str | float | tuple[nn.Module, ...] | ObservedRecompute,
    *,
    total: int,
    subtree_flops: Callable[[nn.Module, str], FlopBreakdown],
) -> int:
    """FLOPs per token that checkpointing runs again, for a `check_recompute` value.

    Args:
        total: the model's training FLOPs per token (a fraction is of its forward, total / 3).
        subtree_flops: training FLOPs per token of one module and its submodules, by component.
    """
    if recompute == "none":
        return 0
    if isinstance(recompute, float):
        return round(recompute * forward_flops(total))
    named = _named_modules(model)
    if isinstance(recompute, ObservedRecompute):
        return _observed_flops(dict(named), recompute, subtree_flops)
    if isinstance(recompute, tuple):
        paths = {id(m): path for path, m in named}
        missing = [m for m in recompute if id(m) not in paths]
        if missing:
            raise ConfigError(
                f"recompute= modules must be submodules of the model; {type(missing[0]).__name__} is not"
            )
        regions = [(m, Checkpointed(paths[id(m)], "recompute=")) for m in dict.fromkeys(recompute)]
    else:
        plan = _find(named)
        if plan.hidden:
            warnings.warn(
                "mfumon cannot see what activation checkpointing recomputes in: "
                + "; ".join(plan.hidden)
                + ". Those recomputed FLOPs are not in HFU (HFU = MFU for them); pass recompute= "
                + "(the checkpointed modules, or a fraction of the forward FLOPs) to count them, "
                + "or recompute='none' to silence this.",
                MfumonWarning,
                stacklevel=3,
            )
        by_path = dict(named)
        regions = [(by_path[c.path], c) for c in plan.modules]
    return sum(forward_flops(_rerun(subtree_flops(m, r.path), r.saves)) for m, r in regions)


def _rerun(flops: FlopBreakdown, saves: frozenset[str]) -> int:
    """The training FLOPs of `flops` that a region re-runs, less what its selective policy keeps."""
    kept = {name for category in saves for name in _FIELDS[category]}
    rerun = [n for category in (MATMUL, ATTENTION) for n in _FIELDS[category] if n not in kept]
    return sum(getattr(flops, n) for n in (*rerun, *_ALWAYS))


def _observed_flops(
    by_path: dict[str, nn.Module],
    observed: ObservedRecompute,
    subtree_flops: Callable[[nn.Module, str], FlopBreakdown],
) -> int:
    """FLOPs per token of what an observed step re-ran (module subtrees, or a module's own work)."""
    extra = Fraction(0)
    for rerun in observed.reruns:
        module = by_path.get(rerun.path)
        if module is None:
            raise ConfigError(
                f"recompute= holds an observation of another model: it has no module {rerun.path!r}"
            )
        training = _rerun(subtree_flops(module, rerun.path), rerun.saves)
        if rerun.own:  # less its submodules: what runs in its own forward (attention, own weights)
            for name, child in module._modules.items():
                if child is not None:
                    path = f"{rerun.path}.{name}" if rerun.path else name
                    training -= _rerun(subtree_flops(child, path), rerun.saves)
        extra += rerun.times * forward_flops(max(training, 0))
    return round(extra)


# --- detection --------------------------------------------------------------------------------


def find_checkpointing(model: nn.Module) -> CheckpointPlan:
    """The modules of `model` that activation checkpointing re-runs, and what cannot be seen."""
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _find(_named_modules(model))


def _find(named: list[tuple[str, nn.Module]]) -> CheckpointPlan:
    # A model using one of these has imported its module; isinstance(m, ()) is False.
    layer_cls = _loaded("transformers.modeling_layers", "GradientCheckpointingLayer") or ()
    wrapper_cls = _loaded(_WRAPPER_MODULE, "CheckpointWrapper") or ()
    composable = _loaded("torch.distributed._composable.checkpoint_activation", "checkpoint")
    registry_key = _loaded("torch.distributed._composable.contract", "REGISTRY_KEY")
    found: list[Checkpointed] = []
    hidden: list[str] = []
    for path, m in named:
        if isinstance(m, wrapper_cls):
            region = _region(path, "checkpoint_wrapper", _keyword(m.__dict__.get("checkpoint_fn")), m)
        elif isinstance(m, layer_cls):
            if _flag(m) is not True:
                continue
            region = _region(
                path, "transformers", _keyword(m.__dict__.get("_gradient_checkpointing_func")), m
            )
        elif composable is not None and "checkpoint" in (m.__dict__.get(registry_key) or ()):
            if not composable.state(m).enable_hook:
                continue
            region = _region(path, "composable", _composable_context(m), m)
        else:
            continue
        if isinstance(region, Checkpointed):
            found.append(region)
        else:
            hidden.append(region)
    hidden += _hidden_checkpointing(named, layer_cls, wrapper_cls)
    return CheckpointPlan(tuple(found), tuple(hidden))


def _flag(m: nn.Module) -> Any:
    """A transformers-style `gradient_checkpointing` attribute (instance, else class), else None."""
    return m.__dict__.get("gradient_checkpointing", getattr(type(m), "gradient_checkpointing", None))


def _where(path: str, m: nn.Module) -> str:
    return f"'{path}' ({type(m).__name__})" if path else type(m).__name__


def _loaded(module_name: str, attr: str) -> Any:
    """`attr` of an already-imported module, else None (a model using it has imported it)."""
    module = sys.modules.get(module_name)
    return getattr(module, attr, None) if module is not None else None


def _region(path: str, source: str, context_fn: Any, module: nn.Module) -> Checkpointed | str:
    """The region a checkpoint with this `context_fn` re-runs, or why it cannot be seen."""
    if context_fn is None or context_fn is _loaded("torch.utils.checkpoint", "noop_context_fn"):
        return Checkpointed(path, source)
    ops = _selective_ops(context_fn)
    if ops is None:
        return f"{_where(path, module)}: a selective checkpointing policy that is a function"
    names = {op.name() for op in ops if callable(getattr(op, "name", None))}
    kinds = _matmul_kinds(module)
    saved = {k for k, kernels in kinds.items() if kernels & names}
    if saved and saved != set(kinds):
        kept = ", ".join(sorted(saved))
        return (
            f"{_where(path, module)}: a selective checkpointing op list that keeps only some matmuls ({kept})"
        )
    saves = {MATMUL} if saved else set()
    if names & _ATTENTION_OPS:
        saves.add(ATTENTION)
    return Checkpointed(path, source, frozenset(saves))


def _keyword(fn: Any, name: str = "context_fn") -> Any:
    """Keyword `name` bound to a checkpoint function by a (nested) functools.partial, else None."""
    while isinstance(fn, functools.partial):
        if name in fn.keywords:
            return fn.keywords[name]
        fn = fn.func
    return None


def _selective_ops(context_fn: Any) -> list[Any] | None:
    """The op list of ``partial(create_selective_checkpoint_contexts, [ops])``, else None (opaque)."""
    make = _loaded("torch.utils.checkpoint", "create_selective_checkpoint_contexts")
    if not isinstance(context_fn, functools.partial) or make is None or context_fn.func is not make:
        return None
    policy = context_fn.args[0] if context_fn.args else context_fn.keywords.get("policy_fn_or_list")
    return list(policy) if isinstance(policy, list) else None


def _matmul_kinds(module: nn.Module) -> dict[str, frozenset[str]]:
    """Kinds of weight matmul in `module` and the kernels that run them forward."""
    kinds: dict[str, frozenset[str]] = {}
    for sub in module.modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
            continue
        dims = [p.dim() for p in sub._parameters.values() if p is not None]
        if any(d >= 3 for d in dims):
            kinds["stacked experts"] = _STACKED_OPS
        elif 2 in dims:  # a Linear-like module: with a bias it runs addmm, without one mm
            kinds.update({"with bias": _ADDMM} if 1 in dims else {"without bias": _MM})
    return kinds


def _composable_context(m: nn.Module) -> Any:
    """The context_fn given to the composable checkpoint (its pre-hook closes over it), else None."""
    for hook in m._forward_pre_hooks.values():
        code = getattr(hook, "__code__", None)
        if code is not None and "user_context_fns" in code.co_freevars and hook.__closure__:
            return hook.__closure__[code.co_freevars.index("user_context_fns")].cell_contents
    return None


def _hidden_checkpointing(named: list[tuple[str, nn.Module]], layer_cls: Any, wrapper_cls: Any) -> list[str]:
    """Positive evidence of checkpointing inside a forward, where its region cannot be seen."""
    out: list[str] = []
    seen: set[type] = set()
    for path, m in named:
        cls = type(m)
        flag = _flag(m)
        if isinstance(flag, bool) and not isinstance(m, layer_cls):
            if flag and not any(isinstance(s, layer_cls) for s in m.modules()):
                out.append(f"{_where(path, m)}: gradient_checkpointing=True, applied inside its own forward")
            continue  # a transformers-style flag says whether its forward checkpoints
        if cls in seen:
            continue
        seen.add(cls)
        if cls.__module__.startswith("torch.") or isinstance(m, (layer_cls, wrapper_cls)):
            continue
        called = _calls_checkpoint(cls.forward)
        if called:
            out.append(f"{cls.__name__}.forward (at {repr(path) if path else 'the model'}) calls {called}")
    return out


def _calls_checkpoint(fn: Any) -> str | None:
    """The checkpoint function `fn`'s code refers to (directly or through modules), else None."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    return _code_calls(code, getattr(fn, "__globals__", {})) if code is not None else None


def _code_calls(code: types.CodeType, scope: dict[str, Any]) -> str | None:
    names = code.co_names
    if "torch.utils.checkpoint" in names:  # `import torch.utils.checkpoint` inside the function
        return "torch.utils.checkpoint"
    for name in names:
        found = _checkpoint_function(scope.get(name), names, depth=3)
        if found:
            return found
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions and lambdas
            found = _code_calls(const, scope)
            if found:
                return found
    return None


def _checkpoint_function(obj: Any, names: tuple[str, ...], depth: int) -> str | None:
    """`obj`, or an attribute chain through modules along `names`, as a checkpoint function's name."""
    if isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        name = getattr(obj, "__name__", "")
        return f"{obj.__module__}.{name}" if name in _CHECKPOINT_FUNCTIONS else None
    if inspect.ismodule(obj) and depth > 0:
        attrs = vars(obj)
        for name in names:
            found = _checkpoint_function(attrs.get(name), names, depth - 1)
            if found:
                return found
    return None


# --- observing what re-runs ------------------------------------------------------------------


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # the autograd engine is running a backward pass


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
        named = _named_modules(model)
        self.plan = _find(named) if plan is None else plan
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
        if _in_backward():
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
        if _in_backward():
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
    return any(p is not None for p in m._parameters.values()) or bool(
        _module_int(m, HEADS_ATTRS + QK_DIM_ATTRS)
    )


def _one_matmul(m: nn.Module) -> bool:
    """A Linear-like module: one weight matrix and at most a bias. Its matmul saves its input before
    it runs, so early stop stops before it."""
    dims = sorted(p.dim() for p in m._parameters.values() if p is not None)
    return dims in ([2], [1, 2])


def observe_recompute(model: nn.Module, step_fn: Callable[[], Any]) -> ObservedRecompute:
    """What activation checkpointing re-runs in `step_fn()`, one training step (forward and backward).

    Pass the result as ``flop_breakdown(model, seq_len, recompute=...)``: its ``.recompute`` is then
    what the step re-ran, early stop included (the Monitor does this on its own at the first step).
    """
    if not callable(step_fn):
        raise ConfigTypeError(
            f"step_fn must be a function that runs one training step, got {type(step_fn).__name__}"
        )
    probe = RecomputeProbe(model)
    try:
        step_fn()
    finally:
        probe.remove()
    observed = probe.result()
    if observed is None:
        if probe.plan.modules:
            raise ConfigError(
                "step_fn ran no backward pass through the checkpointed modules; pass a function that "
                "runs one training step of the model (its forward and loss.backward())"
            )
        observed = ObservedRecompute(())
    return observed
