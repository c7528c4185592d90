"""Where activation checkpointing is on a model, found by structure (see `mfumon.recompute`).

Finds transformers ``GradientCheckpointingLayer``s with their flag set, torch's ``CheckpointWrapper``
and the composable ``checkpoint``, with what a selective op list keeps; and positive evidence of
checkpointing that cannot be seen (a ``forward`` that calls ``torch.utils.checkpoint``).
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from torch import nn

from mfumon._walk import full_shape, own_params

__all__ = ["ATTENTION", "MATMUL", "CheckpointPlan", "Checkpointed", "ObservedRecompute", "Rerun", "find_plan"]

MATMUL, ATTENTION = "matmul", "attention"  # what a selective policy may keep instead of re-running
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


def find_plan(named: list[tuple[str, nn.Module]]) -> CheckpointPlan:
    """The checkpointed modules among `named` (path, module) pairs, and what cannot be seen."""
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
        dims = [len(full_shape(p)) for p in own_params(sub)]
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
