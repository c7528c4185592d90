"""Parameter counts of the live module: total, active (MoE-aware), embedding, lm_head, matmul, trainable.

What counts as what is found by structure (see `mfumon._structure` and `mfumon._experts`); this
module counts it. Custom MoE layouts get an explicit way in: ``count_params(model, experts=...,
top_k=...)`` or :func:`register_moe`. Which weights and inputs need a gradient (frozen weights, LoRA)
is found by `mfumon._grads`: the layout counts each weight's passes per token (forward, its gradient,
its input's gradient); :func:`observe_grads` watches one training step for the ``grads=`` argument.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from torch import nn

from mfumon._experts import Registration, explicit_registrations, find_moe, register
from mfumon._grads import QKV, GradFlow, ObservedGrads, check_grads, grad_flow, observe_grads
from mfumon._structure import AttentionShape, Structure, attention_shape, find_structure
from mfumon._walk import all_params, full_numel, full_shape, has_head_attrs, named_modules
from mfumon.errors import ConfigTypeError, check_int

__all__ = [
    "EMPTY_LAYOUT",
    "Layout",
    "MoELayer",
    "ObservedGrads",
    "ParamCounts",
    "WeightPasses",
    "count_params",
    "layout",
    "observe_grads",
    "region_layout",
    "register_moe",
]


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model; sharded parameters at full size."""

    total: int  # every distinct parameter once (tied weights once)
    active: int  # touched by one token: routed experts scaled by top_k / num_experts
    embedding: int  # input token and learned position tables: lookups, 0 FLOPs
    lm_head: int  # output projection, a matmul, counted even when tied to the embedding
    matmul_active: int  # active - embedding, plus the tied lm_head weight (multiplied as the head)
    moe_layers: int = 0  # layers with routed experts (0 for a dense model)
    num_experts: int | None = None  # routed experts per MoE layer (the largest if layers differ)
    top_k: int | None = None  # experts each token is routed to (the largest if layers differ)
    # parameters that require grad, counted like total (routed experts in full); the training setup's
    # state, not the model's shape, so left out of == (two counts of one model compare equal)
    trainable: int = field(default=0, compare=False)


@dataclass(frozen=True)
class MoELayer:
    """One MoE block found in the model."""

    path: str  # module path of the block (the parent of the routed experts)
    num_experts: int
    top_k: int
    routed: int  # routed-expert parameters of all experts of this block


@dataclass(frozen=True)
class WeightPasses:
    """Per category: parameters x passes over them per token (1 forward, +1 for their own gradient,
    +1 for their input's); 3 x the parameters when all are trained. 2 FLOPs per pass (`mfumon.flops`)."""

    attn: int
    mlp: int  # routed experts scaled by top_k / num_experts
    router: int
    lm_head: int
    vector: int  # norm scales, biases: the same rule, by the project's 6-per-parameter convention
    embedding: int  # the tables as one-hot matmuls (chinchilla): 3 passes when trained, 1 when frozen


@dataclass(frozen=True)
class Layout:
    """Everything the FLOP model needs, counted once per model."""

    counts: ParamCounts
    attn_weights: int  # weight matrices in attention modules
    mlp_weights: int  # other weight matrices, routed experts scaled by top_k / num_experts
    router_weights: int  # routers and shared-expert gates
    lm_head_weights: int  # the output projection's weight matrix
    vector_params: int  # active non-embedding parameters that are no weight matrix: norms, biases
    embedding: int  # same as counts.embedding
    attention: tuple[AttentionShape, ...]  # one per attention module, in model order
    moe: tuple[MoELayer, ...]
    passes: WeightPasses  # the weight counts above times the passes the training step makes over them
    attention_grads: tuple[QKV, ...]  # per attention module: whether its Q, K, V need a gradient
    cross_attention: tuple[str, ...] = ()  # paths of cross-attention modules: scores not counted
    recurrent: tuple[str, ...] = ()  # paths of state-space / linear-attention mixers: no scores


EMPTY_LAYOUT = Layout(  # a region without parameters
    ParamCounts(0, 0, 0, 0, 0), 0, 0, 0, 0, 0, 0, (), (), WeightPasses(0, 0, 0, 0, 0, 0), ()
)
_EVERY_PASS = GradFlow(None, {}, True)  # every weight and input needs a gradient: 6 FLOPs per weight

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Layout]] = weakref.WeakKeyDictionary()


def register_moe(experts: nn.Module | type[nn.Module], *, top_k: int, num_experts: int | None = None) -> None:
    """Declare a routed-expert container (an instance, or a class for every instance) and its top_k.

    The container is an ``nn.ModuleList``-like module whose children are the experts, or a module
    holding stacked per-expert parameters with the expert index as the leading dimension. Its
    parent module is taken as the MoE block; the block's other parameters (router, shared
    experts) count in full.
    """
    if not (isinstance(experts, nn.Module) or (isinstance(experts, type) and issubclass(experts, nn.Module))):
        raise ConfigTypeError(
            f"register_moe(experts=...) takes an nn.Module or nn.Module subclass, got {experts!r}"
        )
    top_k = check_int("top_k", top_k, "experts per token")
    if num_experts is not None:
        num_experts = check_int("num_experts", num_experts, "routed experts in the container")
    register(experts, Registration(top_k, num_experts))
    _CACHE.clear()  # a registration can change any model's count


def count_params(
    model: nn.Module,
    *,
    experts: nn.Module | type[nn.Module] | Iterable[nn.Module] | None = None,
    top_k: int | None = None,
    cache: bool = True,
) -> ParamCounts:
    """Total, active, embedding, lm_head, matmul and trainable parameters of `model`, counted and cached.

    Found by structure (see `mfumon._structure`); sharded parameters count at full size without
    communication (FSDP1 from each FlatParameter's metadata, FSDP2 DTensors' global shape, ZeRO-3
    ``ds_numel``). Routed experts found with no ``top_k`` on the block, its router or the config
    raise ConfigError: pass ``top_k=``.

    Args:
        experts: routed-expert containers the structural search would miss: a module, a module
            class (every instance), or an iterable of modules. Same meaning as :func:`register_moe`.
        top_k: experts per token for every MoE layer; overrides what the model says.
        cache: reuse the count from an earlier call on this model (pass False after changing its
            structure; freezing or unfreezing parameters is seen without it).
    """
    return layout(model, experts=experts, top_k=top_k, cache=cache).counts


def layout(
    model: nn.Module,
    *,
    experts: nn.Module | type[nn.Module] | Iterable[nn.Module] | None = None,
    top_k: int | None = None,
    cache: bool = True,
    grads: str | ObservedGrads = "auto",
) -> Layout:
    """The counted layout of `model` (what `count_params` and the FLOP model read), cached per model.

    `grads` says which inputs need a gradient: "auto" (by model order, see `mfumon._grads`), "all"
    (every weight counted trained, 3 passes) or an observation (:func:`observe_grads`).
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if top_k is not None:
        top_k = check_int("top_k", top_k, "experts per token")
    grads = check_grads(grads)
    explicit = explicit_registrations(experts, top_k)
    frozen = frozenset(id(p) for p in all_params(model) if not p.requires_grad)  # in the key: freezing
    key = (tuple(sorted(id(e) for e in explicit)), top_k, grads, frozen)
    if cache:
        hit = _CACHE.get(model, {}).get(key)
        if hit is not None:
            return hit
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the walk allocates many small objects; on a 45k-module model GC passes dominate
    try:
        found = find_structure(model, explicit, top_k)
        every = grads == "all" or not frozen
        flow = _EVERY_PASS if every else grad_flow(named_modules(model), grads, found.attention_paths)
        counted = _count(found, flow)
    finally:
        if gc_was_enabled:
            gc.enable()
    if cache:
        _CACHE.setdefault(model, {})[key] = counted
    return counted


def _count(found: Structure, flow: GradFlow) -> Layout:
    """Sum the parameters the walk classified, and their passes; routed experts at top_k / num_experts."""
    sums = {"attn": 0, "mlp": 0, "router": 0, "lm": 0, "vector": 0}
    passes = dict.fromkeys(sums, 0)  # the same, each parameter times its passes (see mfumon._grads)
    total = embedding = lm_params = tied = trainable = table_passes = 0
    routed_full: dict[int, int] = {}  # per MoE layer index: weights+vectors before scaling
    routed: dict[tuple[int, bool, int], int] = {}  # (MoE layer index, is weight matrix, passes) -> params
    emb_ids, lm_ids, lm_weight = found.embedding_ids, found.lm_head_ids, found.lm_head_weight
    for pid, p in found.params.items():
        n = full_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
        embedding += n if pid in emb_ids else 0
        table_passes += n * flow.table_passes(p) if pid in emb_ids else 0
        lm_params += n if pid in lm_ids else 0
        tied += n if pid in emb_ids and pid in lm_ids else 0
        if pid in found.routed:
            index, is_weight = found.routed[pid]
            routed_full[index] = routed_full.get(index, 0) + n
            bucket = (index, is_weight, flow.passes(pid, p))
            routed[bucket] = routed.get(bucket, 0) + n
            continue
        if lm_weight is not None and p is lm_weight:
            kind = "lm"
        elif pid in emb_ids:
            continue  # a lookup: 0 FLOPs
        elif len(full_shape(p)) < 2 or pid in found.elementwise_ids:  # (A_log of Mamba is 2-D)
            kind = "vector"
        elif pid in found.router_ids:
            kind = "router"
        elif pid in found.attention_ids:
            kind = "attn"
        else:
            kind = "mlp"
        sums[kind] += n
        passes[kind] += n * flow.passes(pid, p)
    inactive = 0
    for (index, is_weight, times), n in routed.items():
        layer = found.moe[index]
        active_n = n * layer.top_k // layer.num_experts  # each expert equal-sized: exact
        kind = "mlp" if is_weight else "vector"
        sums[kind] += active_n
        passes[kind] += times * active_n
        inactive += n - active_n
    moe = tuple(
        MoELayer(layer.path, layer.num_experts, layer.top_k, routed_full.get(i, 0))
        for i, layer in enumerate(found.moe)
    )
    active = total - inactive
    counts = ParamCounts(
        total=total,
        active=active,
        embedding=embedding,
        lm_head=lm_params,
        matmul_active=active - embedding + tied,
        moe_layers=len(moe),
        num_experts=max((m.num_experts for m in moe), default=None),
        top_k=max((m.top_k for m in moe), default=None),
        trainable=trainable,
    )
    return Layout(
        counts=counts,
        attn_weights=sums["attn"],
        mlp_weights=sums["mlp"],
        router_weights=sums["router"],
        lm_head_weights=sums["lm"],
        vector_params=sums["vector"],
        embedding=embedding,
        attention=found.attention,
        moe=moe,
        cross_attention=found.cross_attention,
        recurrent=found.recurrent,
        passes=WeightPasses(
            passes["attn"], passes["mlp"], passes["router"], passes["lm"], passes["vector"], table_passes
        ),
        attention_grads=tuple(flow.qkv(path) for path in found.attention_paths),
    )


def region_layout(
    model: nn.Module, module: nn.Module, path: str, root: Layout, *, experts: object, top_k: int | None
) -> tuple[Layout, tuple[AttentionShape, ...]]:
    """The layout of one region of `model` (a checkpointed module) and its attention layers.

    MoE blocks inside the region are read with the top_k found for them in the whole model (`root`);
    a region inside an MoE block (an expert, the expert container) counts its routed parameters at
    top_k / E, as in the whole model. A region is counted with every pass (grads="all"): what it
    re-runs is its forward, a third of that, whatever needs a gradient.
    """
    inside = {m.top_k for m in root.moe if _within(m.path, path)}
    k = top_k or (inside.pop() if len(inside) == 1 else None)
    own_shape = attention_shape(module) if has_head_attrs(module) else None
    if not all_params(module):  # e.g. a parameter-free "core attention" module
        return EMPTY_LAYOUT, (own_shape,) if own_shape else ()
    sub = layout(module, experts=experts, top_k=k, grads="all")  # type: ignore[arg-type]
    layers = sub.attention or ((own_shape,) if own_shape else ())  # the walk skips its root module
    for block in root.moe:
        if path.startswith(block.path + "."):
            sub = _scale_routed(sub, module, model.get_submodule(block.path), block, experts)
    return sub, layers


def _within(inner: str, outer: str) -> bool:
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _scale_routed(
    sub: Layout, module: nn.Module, owner: nn.Module, block: MoELayer, experts: object
) -> Layout:
    """`sub` (the layout of `module`, inside MoE block `owner`) with its routed experts at top_k / E."""
    explicit = explicit_registrations(experts, block.top_k)
    _, routed, _ = find_moe(owner, named_modules(owner), explicit, block.top_k)
    k, e = block.top_k, block.num_experts
    drop = {"mlp": 0, "vector": 0}
    for p in {id(p): p for p in all_params(module)}.values():
        if id(p) in routed:
            n = full_numel(p)
            drop["vector" if len(full_shape(p)) < 2 else "mlp"] += n - n * k // e  # where the walk put it
    return replace(
        sub,
        mlp_weights=sub.mlp_weights - drop["mlp"],
        vector_params=sub.vector_params - drop["vector"],
        passes=replace(  # a region is counted with every pass: 3 per parameter (region_layout)
            sub.passes, mlp=sub.passes.mlp - 3 * drop["mlp"], vector=sub.passes.vector - 3 * drop["vector"]
        ),
    )
