"""MoE expert load: tokens per expert per layer from the routers' own top-k, counted on the device.

The MoE blocks are the ones `count_params` finds (`mfumon._experts`). Each block's routing is
read where the model hands the chosen experts on, in this order:

1. the routed-expert container's forward takes the chosen indices as an argument (transformers
   5.x ``experts(hidden_states, top_k_index, top_k_weights)`` in every MoE family, DeepSeek-V3's
   bias-corrected, group-limited choice included; GPT-OSS's ``router_indices``): a forward
   pre-hook reads that argument;
2. the block's class is one whose transformers 4.57 forward is exactly
   ``torch.topk(F.softmax(self.gate(x), dim=1, dtype=torch.float), self.top_k, dim=-1)`` with
   ``gate`` an ``nn.Linear`` (`SOFTMAX_TOPK_BLOCKS`: Mixtral, Qwen2/3-MoE, OLMoE, ...): a forward
   hook on the gate recomputes that same expression on the gate's output, the very ops on the
   very logits the block uses, so it reproduces the block's choice exactly;
3. the router module returns the indices with its output (an integer tensor whose last dimension
   is top_k, e.g. transformers 4.57 DeepSeek-V3, hand-written routers): a forward hook takes it.

A model whose routing none of these reads (the top-k taken inside an unknown block's forward) is
said once at setup and gets no expert-load keys; nothing is guessed.

Per forward, in training mode and outside the backward (an activation-checkpointing recompute is
not counted twice), each block adds its chosen indices into a device buffer with one
``index_add_`` (no host sync: ``bincount`` would read the largest index on the host). At each
log the buffer is copied to the host without a wait, summed over ranks by the ledger and zeroed:
counts per window (on a GPU, of the steps enqueued before the previous log: `ExpertLoad.collect`).
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from mfumon import metrics as K
from mfumon._experts import MoEParts, moe_parts
from mfumon._probe import in_backward
from mfumon.errors import FaultLog
from mfumon.ledger import Field, Source

if TYPE_CHECKING:
    from mfumon.metrics import Window

__all__ = ["INDEX_ARGS", "SOFTMAX_TOPK_BLOCKS", "TOKENS_DETAIL_MAX", "ExpertLoad", "expert_load_source"]

# Names of an expert container's forward argument that carries the chosen experts, [tokens, top_k].
INDEX_ARGS = ("top_k_index", "router_indices", "selected_experts", "topk_indices", "topk_idx", "topk_ids")

# transformers 4.57.6 blocks whose forward is, verbatim: router_logits = self.gate(hidden_states);
# routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float);
# routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
# with self.gate an nn.Linear (in 5.x the same classes hand the indices to their experts: rule 1).
SOFTMAX_TOPK_BLOCKS = frozenset(
    {
        ("mixtral", "MixtralSparseMoeBlock"),
        ("qwen2_moe", "Qwen2MoeSparseMoeBlock"),
        ("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
        ("qwen3_next", "Qwen3NextSparseMoeBlock"),
        ("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextSparseMoeBlock"),
        ("qwen3_omni_moe", "Qwen3OmniMoeTalkerTextSparseMoeBlock"),
        ("olmoe", "OlmoeSparseMoeBlock"),
        ("flex_olmo", "FlexOlmoSparseMoeBlock"),
        ("minimax", "MiniMaxSparseMoeBlock"),
    }
)

TOKENS_DETAIL_MAX = 1024  # expert slots up to which JSONL carries every count (`expert_tokens`)


class _Reader:
    """How one MoE layer's chosen experts are read: the hooked module and what the hook does."""

    def __init__(self, part: MoEParts, module: nn.Module, kind: str, arg: tuple[str, int] | None = None):
        self.path, self.num_experts, self.top_k = part.found.path, part.found.num_experts, part.found.top_k
        self.module, self.kind, self.arg = module, kind, arg


def _plan(part: MoEParts) -> _Reader | str:
    """The reader for one MoE block, or why its routing cannot be read."""
    for container in part.containers:
        if getattr(container, "_is_expert_parallel", False):
            return "its experts are split over ranks (expert parallel): a rank's indices are not global"
        arg = _index_arg(container)
        if arg is not None:
            return _Reader(part, container, "argument", arg)
    block = part.block
    gate = block._modules.get("gate")
    family = type(block).__module__.rsplit(".", 2)
    known = len(family) == 3 and family[0] == "transformers.models"
    if known and (family[1], type(block).__name__) in SOFTMAX_TOPK_BLOCKS and type(gate) is nn.Linear:
        if getattr(block, "top_k", None) == part.found.top_k:
            return _Reader(part, gate, "softmax_topk")
    if len(part.routers) == 1 and type(part.routers[0]) is not nn.Linear:
        return _Reader(part, part.routers[0], "output")
    if part.routers:
        return "its router returns logits only and the top-k is taken inside the block's forward"
    return "no router module or expert argument carries the chosen experts"


def _index_arg(container: nn.Module) -> tuple[str, int] | None:
    """(name, position after self) of the container's forward argument carrying the chosen experts."""
    try:
        params = list(inspect.signature(type(container).forward).parameters)
    except (TypeError, ValueError):
        return None
    for name in INDEX_ARGS:
        if name in params:
            return name, params.index(name) - 1
    return None


def _in_backward() -> bool:
    """True while autograd runs a backward on this thread (an activation-checkpointing recompute)."""
    if torch.compiler.is_compiling():  # compiled: the backward never re-runs Python hooks
        return False
    return in_backward()


class ExpertLoad(Source):
    """Tokens per routed expert per MoE layer, counted on the device; keys per window (see module)."""

    name = "expert_load"

    def __init__(self, readers: list[_Reader], faults: FaultLog) -> None:
        self.readers = readers
        self.fields = (
            Field("tokens_per_expert", "sum", sum(r.num_experts for r in readers)),
            Field("ranks_read", "sum"),  # ranks whose counts reached the host at this log
        )
        self._faults = faults
        spans = [r.num_experts + 1 for r in readers]  # + 1: a spare slot for indices out of range
        self._offsets = [sum(spans[:i]) for i in range(len(spans))]
        self._slots = sum(spans)
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._ones: dict[torch.device, torch.Tensor] = {}
        self._error: Exception | None = None  # a hook's fault, raised by collect() (reported once there)
        self._copies: deque[tuple[Any, torch.Tensor]] = deque()  # device counts on their way to the host
        self._paths_sent = False
        self._handles = [self._attach(i, r) for i, r in enumerate(readers)]

    def _attach(self, layer: int, reader: _Reader) -> Any:
        if reader.kind == "argument":

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                self._count(layer, module, (args, kwargs))

            return reader.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._count(layer, module, output)

        return reader.module.register_forward_hook(hook)

    def _count(self, layer: int, module: nn.Module, got: Any) -> None:
        """Add one forward's chosen experts of `layer` to the device buffer; never raises, never syncs."""
        if self._error is not None or not module.training:
            return
        try:
            if _in_backward():
                return
            with torch.no_grad():  # nothing saved for backward: a checkpoint's recompute must match it
                self._add(layer, got)
        except Exception as exc:  # a monitor never stops training: said once at the next log
            self._error = exc

    def _add(self, layer: int, got: Any) -> None:
        reader = self.readers[layer]
        indices = self._indices(reader, got)
        if isinstance(indices, FakeTensor) or indices.device.type == "meta":
            return  # a trace on fake tensors (no kernel runs): nothing was routed
        flat = indices.reshape(-1)
        if flat.dtype not in (torch.int64, torch.int32):
            flat = flat.long()
        e = reader.num_experts
        # -1 and below, and e and above (dropped, or another rank's experts) go to the spare slot e
        flat = torch.remainder(flat.clamp(-1, e), e + 1)
        device = flat.device
        buf = self._buffers.get(device)
        if buf is None:
            buf = self._buffers[device] = torch.zeros(self._slots, dtype=torch.int64, device=device)
        ones = self._ones.get(device)
        if ones is None or ones.numel() < flat.numel():
            size = max(flat.numel(), 2 * (0 if ones is None else ones.numel()))
            ones = self._ones[device] = torch.ones(size, dtype=torch.int64, device=device)
        buf.narrow(0, self._offsets[layer], e + 1).index_add_(0, flat, ones[: flat.numel()])

    @staticmethod
    def _indices(reader: _Reader, got: Any) -> torch.Tensor:
        """The chosen experts, [..., top_k], from what the hook saw."""
        k = reader.top_k
        if reader.kind == "softmax_topk":  # the block's own expression on its own logits (rule 2)
            if not (isinstance(got, torch.Tensor) and got.dim() == 2 and got.shape[-1] == reader.num_experts):
                raise TypeError(
                    f"the gate of '{reader.path}' returned {_what(got)}, not [tokens, experts] logits"
                )
            return torch.topk(F.softmax(got, dim=1, dtype=torch.float), k, dim=-1).indices
        if reader.kind == "argument":  # (args, kwargs) of the experts' forward
            (args, kwargs), (name, pos) = got, reader.arg
            got = kwargs[name] if name in kwargs else args[pos] if pos < len(args) else None
        items = got if isinstance(got, (tuple, list)) else (got,)
        found = [t for t in items if _is_index(t, k)]
        if len(found) != 1:
            where = "the router's output" if reader.kind == "output" else f"argument '{reader.arg[0]}'"  # type: ignore[index]
            raise TypeError(
                f"'{reader.path}': {where} holds {len(found)} integer tensors of top_k={k} chosen experts "
                f"({_what(got)}); expert load cannot be read"
            )
        return found[0]

    def collect(self, final: bool = False) -> list[float]:
        """This rank's tokens per expert in the copies the device has finished (NaN: none yet).

        A CPU buffer is read and zeroed at once. A device buffer is copied into pinned host memory
        asynchronously and zeroed on its stream, with an event after the copy; the copies whose
        events have completed are read (never waiting, as the step clock reads its events), so on
        a GPU the counts lag the step windows by about one log. `final` (close) waits for all.
        """
        if self._error is not None:
            raise self._error
        total = torch.zeros(self._slots, dtype=torch.int64)
        ready = False
        for buf in self._buffers.values():
            if buf.device.type != "cuda":
                total += buf  # a host buffer: read now
                buf.zero_()
                ready = True
                continue
            slot = torch.empty(self._slots, dtype=torch.int64, pin_memory=True)
            slot.copy_(buf, non_blocking=True)
            buf.zero_()  # after the copy, on the same stream
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(buf.device))
            self._copies.append((event, slot))
        # One copy per log (all at close): two finished copies are two windows, never summed as one.
        while self._copies and (final or (not ready and self._copies[0][0].query())):
            event, slot = self._copies.popleft()
            if final:
                event.synchronize()  # host sync: once, at close, as the step clock's
            total += slot
            ready = True
        if not ready:
            return [math.nan] * (self.fields[0].size + 1)  # nothing finished yet: not measured, not zero
        counts = total.tolist()  # `total` is a host tensor: no sync
        out = [
            float(v)
            for offset, r in zip(self._offsets, self.readers, strict=True)
            for v in counts[offset : offset + r.num_experts]
        ]
        return [*out, 1.0]

    def metrics(
        self, values: dict[str, list[float]], window: Window, world: int
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """expert_load_max and experts_idle over the layers that routed tokens; per-layer details."""
        counts = values["tokens_per_expert"]
        if not counts or any(math.isnan(v) for v in counts) or values["ranks_read"][0] != world:
            return {}, {}  # a rank's counts still on their way: a part of the ranks is no window's load
        at, layers = 0, []
        for reader in self.readers:
            layers.append([int(v) for v in counts[at : at + reader.num_experts]])
            at += reader.num_experts
        seen = [c for c in layers if sum(c) > 0]
        unseen = [r.path for r, c in zip(self.readers, layers, strict=True) if sum(c) == 0]
        if unseen:
            self._faults.report(
                "expert_load_unseen",
                "mfumon: expert load: MoE layer(s) %s routed no token in a window (eval mode, or a "
                "forward not through the module's __call__); left out of that window's expert keys",
                ", ".join(unseen[:4]) + (" ..." if len(unseen) > 4 else ""),
            )
        if not seen:
            return {}, {}
        ratios = [max(c) * len(c) / sum(c) if sum(c) else None for c in layers]
        details: dict[str, Any] = {
            "expert_load_layers": [None if r is None else round(r, 4) for r in ratios],
            "experts_idle_layers": [c.count(0) if sum(c) else None for c in layers],
        }
        if len(counts) <= TOKENS_DETAIL_MAX:
            details["expert_tokens"] = layers
        if not self._paths_sent:
            self._paths_sent = True
            details["expert_layers"] = [r.path for r in self.readers]
        out = {
            K.EXPERT_LOAD_MAX: max(r for r in ratios if r is not None),
            K.EXPERTS_IDLE: float(sum(c.count(0) for c in seen)),
        }
        return out, details

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _is_index(t: object, k: int) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and not t.is_floating_point()
        and not t.is_complex()
        and t.dtype is not torch.bool
        and t.dim() >= 1
        and t.shape[-1] == k
    )


def _what(got: object) -> str:
    items = got if isinstance(got, (tuple, list)) else (got,)
    return ", ".join(
        f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in items
    )


def expert_load_source(model: nn.Module, faults: FaultLog) -> Source | None:
    """A source counting `model`'s expert load; None for a dense model or routing it cannot read
    (then said once, naming the layer and why). Never raises: expert load is no reason to stop a run."""
    try:
        parts = moe_parts(model)
        readers = []
        for part in parts:
            plan = _plan(part)
            if isinstance(plan, str):
                faults.report(
                    "expert_load",
                    "mfumon: expert load left out: the routing of MoE layer '%s' (%s) cannot be read: %s. "
                    "It is read from an experts forward argument named one of %s, or from a router "
                    "module that returns its chosen indices",
                    part.found.path,
                    type(part.block).__name__,
                    plan,
                    "/".join(INDEX_ARGS),
                )
                return None
            readers.append(plan)
        return ExpertLoad(readers, faults) if readers else None
    except Exception as exc:  # e.g. routed experts without a top_k: count_params says what to pass
        faults.fault("expert_load", exc, "expert load is left out")
        return None
