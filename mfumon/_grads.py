"""Which tensors of a training step need a gradient: the frozen-weight rule and the first-step probe.

A weight matrix costs 2 FLOPs per weight per token for each pass over it: the forward, its own gradient
when it requires one, and its input's gradient when that input requires one. Inside attention,
Q@K^T's backward computes dQ and dK only for the one that needs it, A@V's computes dA when Q or K
needs a gradient and dV when V does. This module says which needs one; `mfumon.params` counts the
passes and `mfumon.flops` turns them into FLOPs.

Where the parameters require grad is read off them. Whether an input requires grad is seen in a
training step (:class:`GradProbe`, :func:`observe_grads`); before any step it is taken by model order:
an input needs a gradient when a trainable parameter is registered before its module, or a trainable
norm anywhere else in its layer (see `_by_order`). That is exact for frozen embeddings, frozen lower
layers and a trained head alone, and counts too much where a trainable branch runs beside a frozen one
(LoRA on q and v: the first layer's k and v get an input gradient they do not run). A
model with no frozen parameter counts every pass (6 per weight, the 6N convention), also for a first
layer whose input is raw data, and is not watched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mfumon._probe import run_probed
from mfumon._structure import attention_shape
from mfumon._walk import all_params, full_shape, has_head_attrs, named_modules, own_params
from mfumon.errors import ConfigError, ConfigTypeError

__all__ = [
    "ALL_QKV",
    "GRADS_MODES",
    "QKV",
    "GradFlow",
    "GradProbe",
    "ObservedGrads",
    "check_grads",
    "grad_flow",
    "observe_grads",
]

QKV = tuple[bool, bool, bool]  # whether Q, K and V of one attention layer need a gradient
ALL_QKV: QKV = (True, True, True)
GRADS_MODES = ("auto", "all")
_CHOICES = "'auto' (read off the model), 'all' (every weight trained: 6 per weight) or an ObservedGrads"
_PRODUCTS = {"matmul", "__matmul__", "bmm", "baddbmm", "einsum"}  # torch functions of two activations


@dataclass(frozen=True)
class ObservedGrads:
    """What needed a gradient in an observed training step; pass it as ``grads=``."""

    ran: frozenset[str]  # paths of the watched modules that ran in a training forward
    inputs: frozenset[str]  # of those, the ones called with an input that requires grad
    attention: tuple[tuple[str, QKV], ...] = ()  # attention module path, whether its Q, K, V needed one


def check_grads(grads: Any) -> str | ObservedGrads:
    """`grads=` validated: "auto", "all" or an ObservedGrads."""
    if isinstance(grads, ObservedGrads):
        return grads
    if isinstance(grads, str):
        if grads not in GRADS_MODES:
            raise ConfigError(f"grads must be {_CHOICES}; got {grads!r}")
        return grads
    raise ConfigTypeError(f"grads must be {_CHOICES}; got {type(grads).__name__}")


class GradFlow:
    """Per parameter: its passes (1 + [it requires grad] + [its input does]); per attention module: QKV."""

    def __init__(self, inputs: Mapping[int, bool] | None, qkv: Mapping[str, QKV], end: bool) -> None:
        self._inputs = inputs  # param id -> its input needs a gradient; None: every pass counts
        self._qkv = qkv
        self._end = end  # a trainable parameter is registered anywhere: a head used functionally

    def passes(self, pid: int, p: nn.Parameter) -> int:
        """Passes over weight `p` per token: 3 when it and its input need a gradient, 1 when neither."""
        if self._inputs is None:
            return 3
        return 1 + p.requires_grad + self._inputs.get(pid, self._end)

    def table_passes(self, p: nn.Parameter) -> int:
        """An embedding table as a one-hot matmul (chinchilla): 3 passes when trained, 1 when frozen."""
        return 3 if self._inputs is None or p.requires_grad else 1

    def qkv(self, path: str) -> QKV:
        """Whether Q, K, V of the attention module at `path` need a gradient."""
        return self._qkv.get(path, ALL_QKV)


def grad_flow(
    named: list[tuple[str, nn.Module]], grads: str | ObservedGrads, attention: Iterable[str]
) -> GradFlow:
    """What needs a gradient in `named` (the model's modules, parents first), under `grads`."""
    if grads == "all" or all(p.requires_grad for _, m in named for p in own_params(m)):
        return GradFlow(None, {}, True)
    observed = grads if isinstance(grads, ObservedGrads) else None
    modules = dict(named)
    if observed is not None and not observed.ran <= modules.keys():
        raise ConfigError(
            "grads= holds an observation of another model: its module paths are not this model's"
        )
    by_order, anywhere = _by_order(named)
    module_input: dict[str, bool] = {}
    inputs: dict[int, bool] = {}
    for path, m in named:
        needs = path in observed.inputs if observed is not None and path in observed.ran else by_order[path]
        module_input[path] = needs
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            continue  # a lookup's input is indices
        earlier = False  # a weight applied after another of the module's trainable weights
        for p in own_params(m):
            matrix = len(full_shape(p)) >= 2
            inputs[id(p)] = inputs.get(id(p), False) or needs or (matrix and earlier)
            earlier |= matrix and p.requires_grad
    seen_qkv = dict(observed.attention) if observed is not None else {}
    qkv: dict[str, QKV] = {}
    for path in attention:
        if path in seen_qkv:
            qkv[path] = seen_qkv[path]
        else:  # not seen (a kernel the probe cannot see): Q, K, V as the module's input and weights
            needs = module_input.get(path, True) or any(p.requires_grad for p in all_params(modules[path]))
            qkv[path] = (needs, needs, needs)
    return GradFlow(inputs, qkv, anywhere)


def _by_order(named: list[tuple[str, nn.Module]]) -> tuple[dict[str, bool], bool]:
    """Whether each module's input needs a gradient by model order, and whether any parameter is trained.

    A module's input needs one when a trainable parameter is registered before it (its ancestors' own
    parameters not counted: a parent's often run after its children), or when a trainable norm (a
    module of vectors only) is anywhere else in its layer, an entry of a ModuleList: transformers
    registers a layer's norms after its attention and MLP, though they run before them.
    """
    n = len(named)
    index = {path: i for i, (path, _) in enumerate(named)}
    parent = [index.get(path.rpartition(".")[0], -1) if path else -1 for path, _ in named]
    own = [[p for p in own_params(m) if p.requires_grad] for _, m in named]  # trainable own tensors
    norms = [
        len(ps) if all(len(full_shape(p)) < 2 for p in own_params(m)) else 0
        for ps, (_, m) in zip(own, named, strict=True)
    ]
    for i in reversed(range(n)):  # children come after their parents: subtree sums
        if parent[i] >= 0:
            norms[parent[i]] += norms[i]
    layer = [-1] * n  # the outermost ModuleList entry holding i (itself included)
    for i, p in enumerate(parent):
        if p >= 0:
            layer[i] = layer[p] if layer[p] >= 0 else (i if isinstance(named[p][1], nn.ModuleList) else -1)
    needs: dict[str, bool] = {}
    seen, open_ = False, []  # seen: a trainable parameter in a module whose subtree ended; open_: ancestors
    for i, (path, _) in enumerate(named):
        while open_ and not _inside(path, named[open_[-1]][0]):
            seen |= bool(own[open_.pop()])
        needs[path] = seen or (layer[i] >= 0 and norms[layer[i]] > norms[i])
        open_.append(i)
    return needs, any(own)


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path.startswith(ancestor + ".")


# --- the probe --------------------------------------------------------------------------------


class GradProbe:
    """Hooks that see, in training forwards, which modules get an input that requires grad, and
    which Q, K and V reach each attention module's score kernel needing one.

    Watched: every module owning parameters (its input), and every module with head attributes, inside
    whose forward a torch-function mode reads the operands of ``scaled_dot_product_attention`` or the
    first two activation products (Q@K^T, then A@V). Only ``requires_grad`` flags are kept (no
    tensors, no host sync); forwards without grad are skipped (a reentrant checkpoint's forward; its
    re-run in the backward is seen), and so is anything under ``torch.compile``. `remove()` takes the
    hooks off.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.error: Exception | None = None  # first fault inside a hook; result() raises it
        self._ran: set[str] = set()
        self._inputs: set[str] = set()
        self._qkv: dict[str, QKV] = {}
        self._open: list[tuple[str, list[tuple[str, tuple[bool, ...]]]]] = []  # attention calls under way
        self._mode = _Recorder(self._record)
        self._handles: list[Any] = []
        for path, m in named_modules(model):
            attention = has_head_attrs(m)
            if not (attention or own_params(m)):
                continue
            pre = functools.partial(self._guard, self._pre, path, attention)
            self._handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            if attention:
                shape = attention_shape(m)
                dims = (shape.qk_head_dim, shape.v_head_dim) if shape is not None else None
                post = functools.partial(self._post, path, dims)  # always: it takes the mode off
                self._handles.append(m.register_forward_hook(post, always_call=True))

    def result(self) -> ObservedGrads | None:
        """What needed a gradient in the training forwards seen so far; None before the first."""
        if self.error is not None:
            raise RuntimeError(f"the gradient probe failed in a hook: {self.error!r}") from self.error
        if not self._ran:
            return None
        return ObservedGrads(frozenset(self._ran), frozenset(self._inputs), tuple(sorted(self._qkv.items())))

    def remove(self) -> None:
        """Take the hooks off the model (and the recording mode, if a forward was cut short)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._open:
            self._open.clear()
            self._mode.__exit__(None, None, None)

    def _guard(self, hook: Callable[..., None], *args: Any) -> None:
        if self.error is None and not torch.compiler.is_compiling():
            try:
                hook(*args)
            except Exception as exc:  # a hook runs inside the user's forward: never raise there
                self.error = exc

    def _pre(
        self, path: str, attention: bool, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if torch.is_grad_enabled():
            self._ran.add(path)
            if _needs_grad(args) or _needs_grad(kwargs.values()):
                self._inputs.add(path)
        if attention:
            if not self._open:
                self._mode.__enter__()
            self._open.append((path, []))

    def _post(self, path: str, dims: tuple[int, int] | None, *_: Any) -> None:
        if not self._open or self._open[-1][0] != path:
            return
        _, calls = self._open.pop()
        try:
            if not self._open:
                self._mode.__exit__(None, None, None)
            qkv = _qkv_of(calls, dims)
            if qkv is not None:
                old = self._qkv.get(path, (False, False, False))
                self._qkv[path] = (old[0] or qkv[0], old[1] or qkv[1], old[2] or qkv[2])
        except Exception as exc:  # a hook runs inside the user's forward: never raise there
            self.error = self.error or exc

    def _record(self, name: str, args: tuple[Any, ...]) -> None:
        if not torch.is_grad_enabled():
            return
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name == "baddbmm":
            tensors = tensors[1:]
        if name == "scaled_dot_product_attention":
            entry = ("sdpa", tuple(t.requires_grad for t in tensors[:3]))
        elif len(tensors) == 2 and all(t.dim() >= 3 and not _is_weight(t) for t in tensors):
            entry = (
                name,
                (
                    tensors[0].requires_grad,
                    tensors[1].requires_grad,
                    *tensors[0].shape[-1:],
                    *tensors[1].shape[-2:],
                ),
            )
        else:
            return
        for _, calls in self._open:  # a core-attention child's kernel is its parent's too
            calls.append(entry)


class _Recorder(TorchFunctionMode):
    """Passes every torch function through, telling `record` about attention kernels and products."""

    def __init__(self, record: Callable[[str, tuple[Any, ...]], None]) -> None:
        super().__init__()
        self._record = record

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in _PRODUCTS or name == "scaled_dot_product_attention":
            try:
                self._record(name, tuple(args) if name != "einsum" else _einsum_operands(args))
            except Exception:  # noqa: S110 - never fail the user's op; the module's rule covers it
                pass
        return func(*args, **(kwargs or {}))


def _einsum_operands(args: tuple[Any, ...]) -> tuple[Any, ...]:
    rest = args[1:]
    return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else tuple(rest)


def _qkv_of(calls: list[tuple[str, tuple[Any, ...]]], dims: tuple[int, int] | None) -> QKV | None:
    """Q, K, V needing a gradient, from one attention forward's recorded calls; None if not seen."""
    kernels = [flags for name, flags in calls if name == "sdpa" and len(flags) == 3]
    if kernels:
        return (any(f[0] for f in kernels), any(f[1] for f in kernels), any(f[2] for f in kernels))
    products = []
    for name, (a_grad, b_grad, a_last, b_rows, b_last) in calls:
        if dims is not None:
            qk, v = dims  # Q@K^T: Q (.., s, dqk) @ K^T (.., dqk, s), or einsum on K (.., s, dqk)
            inner, last = (b_last, b_last) if name == "einsum" else (b_rows, b_last)
            if not products and not (a_last == qk and inner == qk):
                continue  # not the score product (e.g. a rotary table), look further
            if products and last != v:
                continue
        products.append((a_grad, b_grad))
        if len(products) == 2:
            (q, k), (_, v_grad) = products
            return (q, k, v_grad)
    return None


def _is_weight(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)  # a weight or its view (w.T)


def _needs_grad(values: Iterable[Any]) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                return True
        elif isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in v):
            return True
    return False


def observe_grads(model: nn.Module, step_fn: Callable[[], Any]) -> ObservedGrads:
    """What needs a gradient in `step_fn()`, one training step of `model` (forward and backward).

    Pass the result as ``flop_breakdown(model, seq_len, grads=...)`` (the Monitor does this on its own
    at the first step of a model with frozen parameters).
    """
    probe = run_probed(lambda: GradProbe(model), step_fn)
    observed = probe.result()
    if observed is None:
        raise ConfigError(
            "step_fn ran no training forward of the model (with grad enabled); pass a function that runs "
            "one training step (its forward and loss.backward())"
        )
    return observed
