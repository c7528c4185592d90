"""Parameter counts read from the live module: total, active (MoE-aware), embedding, lm_head.

Everything is found by structure, never by model name or parameter-name substrings:

- embeddings are ``nn.Embedding``/``nn.EmbeddingBag`` modules (token and learned position tables);
- the lm_head is ``model.get_output_embeddings()`` where the model has it, else the module whose
  weight is tied to an embedding, else the last ``nn.Linear`` with as many outputs as the largest
  embedding has rows (the vocabulary);
- attention modules carry head attributes (``head_dim``/``qk_head_dim``/``num_heads``/``n_head``...)
  and own at least one weight matrix;
- routed experts are an ``nn.ModuleList`` of two or more identical modules, or a module owning
  stacked parameters of 3 or more dimensions (``[E, d, 2f]`` or ``[E, 2f, d]``, with their
  ``[E, *]`` biases). Such a container is an MoE layer when its parent (the MoE block) also holds a
  router (a child or parameter whose leading dimension is ``E``) or a ``top_k``/``num_experts``
  attribute. ``top_k`` is read from the block, the router, the expert container or their
  ``config``, in that order; shared experts and everything else in the block count in full.

Custom layouts get an explicit way in: ``count_params(model, experts=..., top_k=...)`` or
:func:`register_moe`.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from mfumon.errors import ConfigError, ConfigTypeError

__all__ = ["AttentionShape", "MoELayer", "ParamCounts", "count_params", "register_moe"]

TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_top_k", "experts_per_token", "router_top_k")
NUM_EXPERTS_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")
HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
QK_DIM_ATTRS = ("qk_head_dim", "head_dim", "head_size")
WIDTH_ATTRS = ("embed_dim", "hidden_size", "n_embd", "d_model")


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


@dataclass(frozen=True)
class MoELayer:
    """One MoE block found in the model."""

    path: str  # module path of the block (the parent of the routed experts)
    num_experts: int
    top_k: int
    routed: int  # routed-expert parameters of all experts of this block


@dataclass(frozen=True)
class AttentionShape:
    """What one attention layer's score and weighted-sum matmuls need."""

    heads: int  # query heads (GQA/MQA share K/V heads, which does not change the score FLOPs)
    qk_head_dim: int  # per-head width of Q and K (MLA: nope + rope dims)
    v_head_dim: int  # per-head width of V
    window: int | None = None  # sliding window: most keys one query attends, itself included


@dataclass(frozen=True)
class _Layout:
    """Everything the FLOP model needs, computed once per model."""

    counts: ParamCounts
    attn_weights: int  # weight matrices in attention modules
    mlp_weights: int  # other weight matrices, routed experts scaled by top_k / num_experts
    router_weights: int  # routers and shared-expert gates
    lm_head_weights: int  # the output projection's weight matrix
    vector_params: int  # active non-embedding parameters that are no weight matrix: norms, biases
    embedding: int  # same as counts.embedding
    attention: tuple[AttentionShape, ...]  # one per attention module, in model order
    moe: tuple[MoELayer, ...]


@dataclass(frozen=True)
class _Registration:
    top_k: int
    num_experts: int | None


_REGISTERED_TYPES: dict[type, _Registration] = {}
_REGISTERED_MODULES: weakref.WeakKeyDictionary[nn.Module, _Registration] = weakref.WeakKeyDictionary()
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Layout]] = weakref.WeakKeyDictionary()


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
    _check_positive("top_k", top_k)
    if num_experts is not None:
        _check_positive("num_experts", num_experts)
    reg = _Registration(top_k, num_experts)
    if isinstance(experts, nn.Module):
        _REGISTERED_MODULES[experts] = reg
    else:
        _REGISTERED_TYPES[experts] = reg
    _CACHE.clear()  # a registration can change any model's count


def count_params(
    model: nn.Module,
    *,
    experts: nn.Module | type[nn.Module] | Iterable[nn.Module] | None = None,
    top_k: int | None = None,
    cache: bool = True,
) -> ParamCounts:
    """Total, active, embedding, lm_head and matmul parameters of `model`, counted once and cached.

    Found by structure (see the module docstring); FSDP2 DTensor parameters count at their global
    shape and DeepSpeed ZeRO-3 ones at ``ds_numel``, without communication. Routed experts found
    with no ``top_k`` on the block, its router or the config raise ConfigError: pass ``top_k=``.

    Args:
        experts: routed-expert containers the structural search would miss: a module, a module
            class (every instance), or an iterable of modules. Same meaning as :func:`register_moe`.
        top_k: experts per token for every MoE layer; overrides what the model says.
        cache: reuse the count from an earlier call on this model (pass False after changing it).
    """
    return _layout(model, experts=experts, top_k=top_k, cache=cache).counts


def _layout(
    model: nn.Module,
    *,
    experts: nn.Module | type[nn.Module] | Iterable[nn.Module] | None = None,
    top_k: int | None = None,
    cache: bool = True,
) -> _Layout:
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if top_k is not None:
        _check_positive("top_k", top_k)
    explicit = _explicit_registrations(experts, top_k)
    key = (tuple(sorted(id(e) for e in explicit)), top_k)
    if cache:
        hit = _CACHE.get(model, {}).get(key)
        if hit is not None:
            return hit
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the walk allocates many small objects; on a 45k-module model GC passes dominate
    try:
        layout = _walk(model, explicit, top_k)
    finally:
        if gc_was_enabled:
            gc.enable()
    if cache:
        _CACHE.setdefault(model, {})[key] = layout
    return layout


def _explicit_registrations(experts: object, top_k: int | None) -> dict[object, _Registration]:
    """Expert containers given as an argument, keyed by instance or class."""
    if experts is None:
        return {}
    if isinstance(experts, nn.Module) or isinstance(experts, type):
        items: list[object] = [experts]
    elif isinstance(experts, Iterable):
        items = list(experts)
    else:
        raise ConfigTypeError(f"experts= takes a module, a module class or modules, got {experts!r}")
    for item in items:
        if not (isinstance(item, nn.Module) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise ConfigTypeError(f"experts= takes nn.Module instances or subclasses, got {item!r}")
    reg = _Registration(top_k or 0, None)  # 0: top_k still to be found on the model
    return {item: reg for item in items}


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")


# --- sizes, sharding-aware --------------------------------------------------------------------


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    """Full (unsharded) shape: DeepSpeed ZeRO-3 keeps it in ds_shape; a DTensor's shape is global."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


def _numel(p: nn.Parameter) -> int:
    """Full (unsharded) element count, without communication (ZeRO-3 ds_numel, DTensor global numel)."""
    ds_numel = getattr(p, "ds_numel", None)
    return int(ds_numel) if ds_numel is not None else int(p.numel())


# --- the structural walk ----------------------------------------------------------------------
# Direct `_parameters`/`_modules`/`__dict__` access below keeps a 45k-module model (DeepSeek-V3 with
# per-expert modules, transformers 4.x) well under a second; nn.Module's generic getters are slower.


def _own_params(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m._parameters.values() if p is not None]


def _all_params(m: nn.Module) -> list[nn.Parameter]:
    """Parameters of `m` and its submodules (a shared one may appear twice)."""
    found: list[nn.Parameter] = []
    stack = [m]
    while stack:
        module = stack.pop()
        found.extend(p for p in module._parameters.values() if p is not None)
        stack.extend(c for c in module._modules.values() if c is not None)
    return found


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) for every distinct module, parents first, like nn.Module.named_modules()."""
    seen = {id(model)}
    out: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, m = stack.pop()
        out.append((path, m))
        children = [
            (f"{path}.{name}" if path else name, c)
            for name, c in m._modules.items()
            if c is not None and id(c) not in seen
        ]
        seen.update(id(c) for _, c in children)
        stack.extend(reversed(children))
    return out


def _module_int(m: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of `names` set on module `m` (a plain instance attribute) to a positive int."""
    attrs = m.__dict__
    for name in names:
        value = attrs.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _int_attr(obj: object, names: tuple[str, ...]) -> int | None:
    """The first attribute of `names` on `obj` (a config, or a module) that holds a positive int."""
    if obj is None:
        return None
    if isinstance(obj, nn.Module):
        return _module_int(obj, names)
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _walk(model: nn.Module, explicit: dict[object, _Registration], top_k: int | None) -> _Layout:
    named = _named_modules(model)
    params = {id(p): p for _, m in named for p in _own_params(m)}  # distinct: a tied weight once
    if not params:
        raise ConfigError(f"model {type(model).__name__} has no parameters; pass the model you train")
    emb_ids = {
        id(p) for _, m in named if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in _own_params(m)
    }
    lm_head = _find_lm_head(model, named)
    lm_ids = {id(p) for p in _all_params(lm_head)} if lm_head is not None else set()
    lm_weight = getattr(lm_head, "weight", None)
    moe_layers, routed, router_ids = _find_moe(model, named, explicit, top_k)
    attn_modules = _find_attention(named, exclude=set(routed) | router_ids)
    attn_ids = {id(p) for _, m in attn_modules for p in _all_params(m)}

    sums = {"attn": 0, "mlp": 0, "router": 0, "lm": 0, "vector": 0}
    total = embedding = lm_params = tied = 0
    routed_full: dict[int, int] = {}  # per MoE layer index: weights+vectors before scaling
    routed_w: dict[int, int] = {}
    routed_v: dict[int, int] = {}
    for pid, p in params.items():
        n = _numel(p)
        total += n
        embedding += n if pid in emb_ids else 0
        lm_params += n if pid in lm_ids else 0
        tied += n if pid in emb_ids and pid in lm_ids else 0
        if pid in routed:
            index, is_weight = routed[pid]
            routed_full[index] = routed_full.get(index, 0) + n
            bucket = routed_w if is_weight else routed_v
            bucket[index] = bucket.get(index, 0) + n
        elif lm_weight is not None and p is lm_weight:
            sums["lm"] += n
        elif pid in emb_ids:
            continue  # a lookup: 0 FLOPs
        elif len(_shape(p)) < 2:
            sums["vector"] += n
        elif pid in router_ids:
            sums["router"] += n
        elif pid in attn_ids:
            sums["attn"] += n
        else:
            sums["mlp"] += n
    inactive = 0
    for i, layer in enumerate(moe_layers):
        k, e = layer.top_k, layer.num_experts
        sums["mlp"] += routed_w.get(i, 0) * k // e  # each expert equal-sized: exact
        sums["vector"] += routed_v.get(i, 0) * k // e
        inactive += routed_full.get(i, 0) - (routed_w.get(i, 0) * k // e + routed_v.get(i, 0) * k // e)
    moe = tuple(
        MoELayer(layer.path, layer.num_experts, layer.top_k, routed_full.get(i, 0))
        for i, layer in enumerate(moe_layers)
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
    )
    return _Layout(
        counts=counts,
        attn_weights=sums["attn"],
        mlp_weights=sums["mlp"],
        router_weights=sums["router"],
        lm_head_weights=sums["lm"],
        vector_params=sums["vector"],
        embedding=embedding,
        attention=tuple(shape for shape, _ in attn_modules),
        moe=moe,
    )


def _find_lm_head(model: nn.Module, named: list[tuple[str, nn.Module]]) -> nn.Module | None:
    """The output projection: HF's get_output_embeddings(), else a tied or vocabulary-wide Linear."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        else:
            return (
                head
                if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), nn.Parameter)
                else None
            )
    tables = [m for _, m in named if isinstance(m, nn.Embedding)]
    table_weights = {id(m.weight) for m in tables}
    for _, m in named:
        weight = m._parameters.get("weight")
        if not isinstance(m, nn.Embedding) and weight is not None and id(weight) in table_weights:
            return m  # tied to an input embedding
    if not tables:
        return None
    vocab = max(m.num_embeddings for m in tables)
    heads = [m for _, m in named if isinstance(m, nn.Linear) and m.out_features == vocab]
    return heads[-1] if heads else None


@dataclass(frozen=True)
class _FoundMoE:
    path: str
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class _Container:
    module: nn.Module
    num_experts: int
    stacked: bool  # per-expert parameters stacked along dim 0, else one child module per expert
    registration: _Registration | None


def _find_moe(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    explicit: dict[object, _Registration],
    top_k: int | None,
) -> tuple[list[_FoundMoE], dict[int, tuple[int, bool]], set[int]]:
    """MoE blocks, routed params (id -> (layer index, is weight matrix)) and router param ids."""
    parents = {
        id(child): (path, m) for path, m in named for child in m._modules.values() if child is not None
    }
    by_block: dict[int, list[_Container]] = {}
    blocks: dict[int, tuple[str, nn.Module]] = {}
    for _, m in named:
        reg = (
            explicit.get(m)
            or explicit.get(type(m))
            or _REGISTERED_MODULES.get(m)
            or _REGISTERED_TYPES.get(type(m))
        )
        container = _as_container(m, reg)
        if container is None or id(m) not in parents:
            continue
        block_path, block = parents[id(m)]
        by_block.setdefault(id(block), []).append(container)
        blocks[id(block)] = (block_path, block)

    layers: list[_FoundMoE] = []
    routed: dict[int, tuple[int, bool]] = {}
    router_ids: set[int] = set()
    for block_id, found in by_block.items():
        block_path, block = blocks[block_id]
        num_experts = found[0].num_experts
        items = [c for c in found if c.num_experts == num_experts]
        regs = [c.registration for c in items if c.registration is not None]
        router_modules, routers = _routers(block, num_experts, {id(c.module) for c in items})
        hinted = any(
            _int_attr(o, NUM_EXPERTS_ATTRS + TOP_K_ATTRS) for o in [block] + [c.module for c in items]
        )
        if not regs and not routers and not hinted:
            continue  # identical modules or 3-D weights with nothing that routes tokens: not MoE
        path = block_path or type(block).__name__
        k = top_k or next((r.top_k for r in regs if r.top_k), None)
        k = k or _find_top_k([block, *router_modules, *(c.module for c in items)], model)
        if k is None:
            raise ConfigError(
                f"found {num_experts} routed experts in '{path}' ({type(block).__name__}) but no top_k on "
                f"the block, its router or the config; pass count_params(model, top_k=K) or "
                f"mfumon.register_moe(experts, top_k=K)"
            )
        if k > num_experts:
            raise ConfigError(f"top_k={k} exceeds the {num_experts} experts found in '{path}'")
        index = len(layers)
        layers.append(_FoundMoE(path, num_experts, k))
        for c in items:
            for p in _all_params(c.module):
                shape = _shape(p)
                if c.stacked and (not shape or shape[0] != num_experts):
                    continue  # not per-expert: counts in full like the rest of the block
                routed[id(p)] = (index, len(shape) >= (3 if c.stacked else 2))
        router_ids |= {id(p) for p in routers}
    return layers, routed, router_ids


def _as_container(m: nn.Module, reg: _Registration | None) -> _Container | None:
    """`m` as a routed-expert container, if it looks like one (or is registered as one)."""
    stacks = [_shape(p) for p in m._parameters.values() if p is not None and len(_shape(p)) >= 3]
    if stacks and not isinstance(m, nn.modules.conv._ConvNd):
        leading = {s[0] for s in stacks}
        if len(leading) == 1 and (reg is not None or min(leading) >= 2):
            return _Container(m, _checked(leading.pop(), reg), True, reg)
    if reg is not None:
        children = [c for c in m._modules.values() if c is not None and _all_params(c)]
        return _Container(m, _checked(len(children), reg), False, reg)
    if not isinstance(m, nn.ModuleList) or len(m) < 2:
        return None
    children = list(m._modules.values())
    first = children[0]
    if first is None or not _all_params(first):
        return None
    signature = _signature(first)
    if any(c is None or type(c) is not type(first) or _signature(c) != signature for c in children[1:]):
        return None
    if any(
        isinstance(sub, nn.Embedding) or _module_int(sub, HEADS_ATTRS + QK_DIM_ATTRS)
        for sub in first.modules()
    ):
        return None  # a stack of decoder layers, not experts
    return _Container(m, len(children), False, None)


def _checked(num_experts: int, reg: _Registration | None) -> int:
    if reg is not None and reg.num_experts is not None and reg.num_experts != num_experts:
        raise ConfigError(
            f"register_moe(num_experts={reg.num_experts}) but the container holds {num_experts} experts"
        )
    return num_experts


def _signature(m: nn.Module) -> tuple[tuple[int, ...], ...]:
    return tuple(_shape(p) for p in _all_params(m))


def _routers(
    block: nn.Module, num_experts: int, containers: set[int]
) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """Router modules and parameters of an MoE block: its own [E, d] (and [E]) parameters and the
    children whose every parameter leads with E; with them, children leading with 1 (shared-expert
    gates). No [E, d] matrix anywhere: no router, and a gate alone does not make a block MoE."""
    own = [p for p in _own_params(block) if _shape(p) and _shape(p)[0] == num_experts and len(_shape(p)) <= 2]
    routers: list[tuple[nn.Module, list[nn.Parameter]]] = [(block, own)] if own else []
    gates: list[tuple[nn.Module, list[nn.Parameter]]] = []
    for child in block._modules.values():
        if child is None or id(child) in containers:
            continue
        ps = _all_params(child)
        if not ps or not any(len(_shape(p)) == 2 for p in ps):
            continue
        leading = {_shape(p)[0] if _shape(p) else 0 for p in ps}
        if leading == {num_experts}:
            routers.append((child, ps))
        elif leading == {1}:
            gates.append((child, ps))
    if not any(len(_shape(p)) == 2 for _, ps in routers for p in ps):
        return [], []
    chosen = routers + gates
    return [m for m, _ in chosen if m is not block], [p for _, ps in chosen for p in ps]


def _find_top_k(owners: list[nn.Module], model: nn.Module) -> int | None:
    """top_k from the block, its routers, the expert containers, then their and the model's configs."""
    candidates: list[object] = [*owners]
    candidates += [o.__dict__.get("config") for o in owners] + [getattr(model, "config", None)]
    for owner in candidates:
        k = _int_attr(owner, TOP_K_ATTRS)
        if k is not None:
            return k
    return None


# --- attention layers -------------------------------------------------------------------------


def _find_attention(
    named: list[tuple[str, nn.Module]], exclude: set[int]
) -> list[tuple[AttentionShape, nn.Module]]:
    """Innermost modules with head attributes that own a weight matrix, with their shapes."""
    candidates = []
    for path, m in named:
        if not path or _int_attr(m, HEADS_ATTRS + QK_DIM_ATTRS) is None:
            continue
        if not any(len(_shape(p)) >= 2 and id(p) not in exclude for p in _all_params(m)):
            continue
        shape = _attention_shape(m)
        if shape is not None:
            candidates.append((path, shape, m))
    paths = [path for path, _, _ in candidates]
    return [
        (shape, m)
        for path, shape, m in candidates
        if not any(other.startswith(path + ".") for other in paths)
    ]


def _attention_shape(m: nn.Module) -> AttentionShape | None:
    config = getattr(m, "config", None)
    qk_dim = _int_attr(m, QK_DIM_ATTRS)
    heads = _int_attr(m, HEADS_ATTRS) or _int_attr(config, ("num_attention_heads",))
    width = _int_attr(m, WIDTH_ATTRS) or _int_attr(config, ("hidden_size",))
    if qk_dim is None and heads and width:
        qk_dim = width // heads
    if heads is None and qk_dim and width:
        heads = width // qk_dim
    if not heads or not qk_dim:
        return None
    v_dim = _int_attr(m, ("v_head_dim",)) or qk_dim
    return AttentionShape(heads, qk_dim, v_dim, _window(m, config))


def _window(m: nn.Module, config: object) -> int | None:
    """Sliding window of one attention module: its own attribute, else the config's layer_types."""
    if hasattr(m, "sliding_window"):
        own = m.sliding_window
        return own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else None
    window = _int_attr(config, ("sliding_window",))
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(m, "layer_idx", None)
    if isinstance(layer_types, (list, tuple)) and isinstance(layer_idx, int) and layer_idx < len(layer_types):
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window
