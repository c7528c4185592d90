"""The self-check: one training step traced on fake tensors, counted by FlopCounterMode, set against
the count read from the model's structure; a part the structure misses is named once, at setup.

The trace runs forward and backward on `FakeTensorMode` copies of the parameters and buffers (same
shapes, dtypes, devices, ``requires_grad``) through ``torch.func.functional_call``, one sequence of
`seq_len` token ids: no kernel runs, nothing is written to the parameters or their ``.grad``. Its
count (matmuls and attention kernels, every score) is the ``"palm"`` convention less `other`. Above
`TOLERANCE` one `MfumonWarning` names the modules that differ (from the forward FLOPs per module,
which FlopCounterMode attributes exactly) and what to pass; a model that cannot be traced gets one
info line on the ``mfumon`` logger. See docs/accounting.md, "The self-check at setup".
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mfumon._walk import has_head_attrs
from mfumon.errors import MfumonWarning, log
from mfumon.flops import flop_breakdown
from mfumon.measure import flop_counter

__all__ = ["TOLERANCE", "SelfCheck", "self_check"]

TOLERANCE = 0.02  # relative difference above which the structure's count is called out

# Kernels of activation x activation products (attention scores and weighted sums); every other
# counted op multiplies a weight.
_ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product", "_flash_attention", "_efficient_attention")
_UNTRACEABLE = "MoE routing, values read in forward and custom kernels cannot be traced on fake tensors"
_MORE = (
    "Matmuls not counted, training FLOPs per token beyond the weights each module holds (weights held "
    "elsewhere, e.g. F.linear(x, wte.weight) as the output head, or a module called twice per token): {}. "
    "Pass flops_per_token= with them added."
)
_LESS = (
    "Counted but not run, training FLOPs per token counted for weights the step did not multiply (routed "
    "experts not recognised: mfumon.register_moe(experts, top_k=...); a module the step does not use, or "
    "uses on some tokens only, such as a pooler): {}. Register the experts, or pass flops_per_token=."
)
_QUIET = ("torch._subclasses.fake_tensor", "torch.utils.module_tracker")  # log a failed trace at ERROR


@dataclass(frozen=True)
class SelfCheck:
    """What the self-check found, per token of one training step (forward + backward)."""

    traced: int | None  # FlopCounterMode's count; None when the model could not be traced
    counted: int  # the structure's count in the same convention ("palm" less `other`)
    message: str  # the warning, the reason it was skipped, or "" when they agree

    @property
    def agrees(self) -> bool:
        """True when the trace ran and the counts differ by at most TOLERANCE."""
        return self.traced is not None and not self.message


def self_check(model: nn.Module, seq_len: int, *, recompute: Any = "none", warn: bool = True) -> SelfCheck:
    """Trace one training step of `model` at `seq_len` on fake tensors and compare with the structure.

    With `warn`, a difference above TOLERANCE is one `MfumonWarning` and an untraceable model one info
    line on the ``mfumon`` logger. `recompute` is the monitor's recompute argument: a step that re-runs
    checkpointed modules in its backward agrees with the count plus up to that recompute (early stop
    re-runs less; the monitor's probe refines it at the first step). Never raises, unless a warnings
    filter turns the warning into an error (as for every setup warning).
    """
    try:
        counted = flop_breakdown(model, seq_len, convention="palm", recompute="none")
        expected = counted.total - counted.other
    except Exception as exc:  # the monitor's own count already ran: this only fails on odd models
        return _skipped(0, f"its structure could not be read ({type(exc).__name__}: {exc})", warn)
    target, why = _traceable(model)
    if target is None:
        return _skipped(expected, why, warn)
    try:
        forward, backward = _trace(target, seq_len)
    except Exception as exc:
        why = f"the trace failed ({type(exc).__name__}: {str(exc)[:160]}): {_UNTRACEABLE}"
        return _skipped(expected, why, warn)
    traced = (2 * (_total(forward["Global"]) + backward) + seq_len) // (2 * seq_len)  # rounded half up
    if _agrees(traced, expected, 0) or _agrees(traced, expected, _recompute(model, seq_len, recompute)):
        return SelfCheck(traced, expected, "")
    message = _explain(target, forward, traced, expected, counted, seq_len)
    if warn:
        warnings.warn(message, MfumonWarning, stacklevel=4)  # self_check <- FlopModel <- Monitor <- caller
    return SelfCheck(traced, expected, message)


# --- the trace ----------------------------------------------------------------------------------


def _traceable(model: nn.Module) -> tuple[nn.Module | None, str]:
    """The module to trace (DDP and torch.compile wrappers taken off), or None and why not."""
    target = model
    for _ in range(4):  # DDP(compile(model)) and the like
        inner = getattr(target, "_orig_mod", None)
        if type(target).__name__ == "DistributedDataParallel":
            inner = target.module
        if not isinstance(inner, nn.Module):
            break
        target = inner
    for m in target.modules():
        name = type(m).__name__
        if name.startswith(("FullyShardedDataParallel", "FSDP")) or hasattr(m, "_hf_hook"):
            return None, f"its parameters are sharded or offloaded by a wrapper ({name})"
    for p in target.parameters():
        if hasattr(p, "ds_id") or type(p).__name__ == "DTensor":
            return None, "its parameters are sharded (DeepSpeed ZeRO-3 or DTensor)"
    if not _token_input(target):
        return None, "its forward takes no token ids (input_ids, or one LongTensor)"
    return target, ""


def _token_input(model: nn.Module) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.name == "input_ids" for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return bool(positional) and len(required) <= 1 and positional[0].name != "pixel_values"


def _trace(model: nn.Module, seq_len: int) -> tuple[dict[str, dict[str, int]], int]:
    """Forward FLOPs per module (FlopCounterMode's names) and the backward's total, on fake tensors.

    Gradients are on for the trace, also when the monitor is built under ``torch.no_grad()``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:  # one copy per tensor: tied weights stay tied
        if id(t) not in fakes:
            copy = fake_mode.from_tensor(t)
            fakes[id(t)] = copy.requires_grad_(t.requires_grad) if copy.is_leaf else copy
        return fakes[id(t)]

    state = {name: fake(p) for name, p in model.named_parameters(remove_duplicate=False)}
    state.update({name: fake(b) for name, b in model.named_buffers(remove_duplicate=False)})
    device = next((t.device for t in fakes.values()), torch.device("cpu"))
    forward, backward = flop_counter(), flop_counter(model_flops=True)  # GPU kernels: no recomputed scores
    with _quiet(), _without_hooks(model), torch.inference_mode(False), torch.enable_grad(), fake_mode:
        ids = torch.zeros((1, seq_len), dtype=torch.long, device=device)
        args, kwargs = _inputs(model, ids)
        with forward:
            output = torch.func.functional_call(model, state, args, kwargs)
        loss = _loss(output)
        if loss.requires_grad:
            with backward:  # .grad lands on the fake copies (reentrant checkpointing refuses autograd.grad)
                loss.backward()
    flops = forward.get_flop_counts()
    per_module = {name: {str(op): int(n) for op, n in ops.items()} for name, ops in flops.items()}
    return per_module, int(backward.get_total_flops())


def _loss(output: Any) -> torch.Tensor:
    """``output.loss``, else the sum of every floating-point tensor the model returned (all heads train)."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    values = list(output.values()) if isinstance(output, Mapping) else output
    values = values if isinstance(values, (tuple, list)) else [values]
    found = [t.sum() for t in values if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not found:
        raise TypeError(f"no floating-point tensor in the model's output ({type(output).__name__})")
    return sum(found[1:], found[0])


def _inputs(model: nn.Module, ids: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
    names = inspect.signature(model.forward).parameters
    if "input_ids" not in names:
        return (ids,), {}
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "use_cache" in names:
        kwargs["use_cache"] = False  # training: no KV cache
    return (), kwargs


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


@contextmanager
def _without_hooks(model: nn.Module) -> Iterator[None]:
    """The model's own module hooks off for the trace (the HF callback builds its monitor in one)."""
    saved = [(m, name, m.__dict__[name]) for m in model.modules() for name in _HOOKS if m.__dict__.get(name)]
    try:
        for m, name, _ in saved:
            m.__dict__[name] = OrderedDict()
        yield
    finally:
        for m, name, hooks in saved:
            m.__dict__[name] = hooks


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's own loggers (a failed fake kernel logs a traceback at ERROR) and torch.compile."""
    with ExitStack() as stack:
        for name in _QUIET:
            logger = logging.getLogger(name)
            stack.callback(setattr, logger, "disabled", logger.disabled)
            logger.disabled = True
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:  # compiled functions and modules run their eager code
            stack.enter_context(set_stance("force_eager"))
        yield


def _recompute(model: nn.Module, seq_len: int, recompute: Any) -> int:
    """Training FLOPs per token that activation checkpointing re-runs, in the trace's convention."""
    if isinstance(recompute, str) and recompute == "none":
        return 0
    try:
        return flop_breakdown(model, seq_len, convention="palm", recompute=recompute).recompute
    except Exception:
        return 0


# --- the comparison -----------------------------------------------------------------------------


def _skipped(counted: int, why: str, warn: bool) -> SelfCheck:
    message = f"mfumon: self-check skipped: {why}; the FLOP count comes from the model's structure alone"
    if warn:
        log.info(message)
    return SelfCheck(None, counted, message)


def _agrees(traced: int, expected: int, recompute: int) -> bool:
    """From the count to the count plus what checkpointing re-runs (early stop re-runs less), ±2%."""
    return expected * (1 - TOLERANCE) <= traced <= (expected + recompute) * (1 + TOLERANCE)


def _total(ops: dict[str, int]) -> int:
    return sum(ops.values())


def _attention(ops: dict[str, int]) -> int:
    return sum(n for op, n in ops.items() if any(k in op for k in _ATTENTION_OPS))


def _explain(
    model: nn.Module,
    forward: dict[str, dict[str, int]],
    traced: int,
    expected: int,
    counted: Any,
    seq_len: int,
) -> str:
    """The warning: how far off, which modules differ, and what to pass."""
    pct = 100 * abs(expected - traced) / max(traced, 1)
    lines = [
        f"mfumon: the FLOP count read from the model's structure is {pct:.1f}% "
        f"{'below' if expected < traced else 'above'} a traced training step (FlopCounterMode on fake "
        f"tensors: {expected:,} against {traced:,} FLOPs per token, matmuls and attention scores only)."
    ]
    tree = _Tree(model, forward)
    fwd_attention = _attention(forward["Global"])
    counted_attention = counted.attn_scores * seq_len // 3  # the forward third of the training count
    margin = TOLERANCE / 2 * expected * seq_len / 3  # of the step's forward
    unseen = tree.unseen_attention() if abs(fwd_attention - counted_attention) > margin else []
    if unseen and fwd_attention > counted_attention:
        paths, kinds = _names(unseen)
        lines.append(
            f"Attention not counted: {paths} ({kinds}) run attention kernels but carry no head attributes. "
            "Give them num_heads and head_dim attributes, or pass flops_per_token=mfumon.flops_per_token("
            "model, seq_len, attention=[mfumon.AttentionShape(heads, head_dim, head_dim), ...]) with one "
            "shape per attention layer."
        )
    elif abs(fwd_attention - counted_attention) > margin:
        paths, kinds = _names(tree.attention_modules())
        lines.append(
            f"Attention differs: attention kernels and batched matmuls come to "
            f"{3 * fwd_attention // seq_len:,} training FLOPs per token in the trace, against "
            f"{counted.attn_scores:,} counted for attention "
            f"scores; they run in {paths} ({kinds}). A layer that is no softmax attention (a state-space "
            "scan, linear attention) or heads read wrong: pass flops_per_token= with the count you trust."
        )
    culprits = sorted(tree.weight_culprits(seq_len), key=lambda c: -abs(c[2]))
    for sign, text in ((1, _MORE), (-1, _LESS)):
        found = [
            f"{path or 'own forward'} ({type(m).__name__}) {3 * abs(d) // seq_len:,}"
            for path, m, d in culprits
            if d * sign > 0
        ]
        if found:
            lines.append(text.format("; ".join(found[:4]) + ("; ..." if len(found) > 4 else "")))
    if len(lines) == 1 and abs(3 * _total(forward["Global"]) - expected * seq_len) > 3 * margin:
        lines.append(
            "The forward differs in a way no module accounts for. Pass flops_per_token= if it is wrong."
        )
    elif len(lines) == 1 and 3 * _total(forward["Global"]) > traced * seq_len:  # backward < 2 x forward
        lines.append(
            "The forward matches module by module; the backward runs less than twice the forward: "
            "weights that need no gradient (frozen, LoRA) cost less than counted. Pass flops_per_token= "
            "with the count you trust."
        )
    elif len(lines) == 1:
        lines.append(
            "The forward matches module by module; the backward runs more than twice the forward: "
            "recompute from activation checkpointing the count was not told of (pass recompute=, HFU "
            "only: MFU is unaffected), or kernels whose backward costs more than twice their forward."
        )
    lines.append("Turn this check off with self_check=False.")
    return " ".join(lines)


class _Tree:
    """The trace's forward FLOPs per module (inclusive), against what the structure holds."""

    def __init__(self, model: nn.Module, forward: dict[str, dict[str, int]]) -> None:
        self.model = model
        self.paths: dict[int, str] = {}
        self.total: dict[int, int] = {}  # forward FLOPs inside each module, its submodules included
        self.attention: dict[int, int] = {}  # of which attention kernels
        root = type(model).__name__  # FlopCounterMode's ModuleTracker names modules Root.path.to.it
        for path, m in reversed(list(model.named_modules())):  # children before parents
            self.paths[id(m)] = path
            ops = forward.get(f"{root}.{path}" if path else root)
            if ops is None:  # never called itself (a ModuleList): the sum of its children
                children = [id(c) for c in m.children()]
                self.total[id(m)] = sum(self.total.get(c, 0) for c in children)
                self.attention[id(m)] = sum(self.attention.get(c, 0) for c in children)
            else:
                self.total[id(m)], self.attention[id(m)] = _total(ops), _attention(ops)

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules that ran attention kernels or batched matmuls themselves, the busiest first."""
        own = [
            (self.attention[id(m)] - sum(self.attention[id(c)] for c in m.children()), path, m)
            for path, m in self.model.named_modules()
        ]
        return [(path, m) for flops, path, m in sorted(own, key=lambda x: -x[0]) if flops > 0]

    def unseen_attention(self) -> list[tuple[str, nn.Module]]:
        """Those with no head attributes on them, above them or below them."""
        heads = [path for path, m in self.model.named_modules() if has_head_attrs(m)]
        return [
            (path, m)
            for path, m in self.attention_modules()
            if not any(_related(path, h) or _related(h, path) for h in heads)
        ]

    def weight_culprits(self, s: int) -> list[tuple[str, nn.Module, int]]:
        """Deepest modules whose forward weight-matmul FLOPs differ from 2 x s x the matrices they hold."""
        held: dict[int, int] = {}
        for m in reversed(list(self.model.modules())):  # children first
            own = 0
            if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                own = sum(p.numel() for p in m.parameters(recurse=False) if p.ndim >= 2)
            held[id(m)] = own + sum(held[id(c)] for c in m.children())

        def diff(m: nn.Module) -> int:
            return self.total[id(m)] - self.attention[id(m)] - 2 * s * held[id(m)]

        threshold = TOLERANCE / 2 * max(2 * s * held[id(self.model)], 1)
        out: list[tuple[str, nn.Module, int]] = []

        def descend(m: nn.Module) -> None:
            bad = [c for c in m.children() if abs(diff(c)) > threshold]
            for child in bad:
                descend(child)
            rest = diff(m) - sum(diff(c) for c in bad)
            if not bad or abs(rest) > threshold:
                out.append((self.paths[id(m)], m, rest))

        if abs(diff(self.model)) > threshold:
            descend(self.model)
        return out


def _names(found: list[tuple[str, nn.Module]]) -> tuple[str, str]:
    """The first four paths, and the classes of all, for a message."""
    paths = ", ".join(path or "(root)" for path, _ in found[:4]) + (" ..." if len(found) > 4 else "")
    return paths, ", ".join(sorted({type(m).__name__ for _, m in found}))


def _related(path: str, other: str) -> bool:
    """`other` is `path` or one of its ancestors."""
    return other == path or other == "" or path.startswith(other + ".")
