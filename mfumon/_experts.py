"""Routed experts: which containers hold them, their MoE blocks, routers and top_k.

Routed experts are an ``nn.ModuleList`` of two or more identical modules, or a module owning
stacked parameters of 3 or more dimensions (``[E, d, 2f]`` or ``[E, 2f, d]``, with their ``[E, *]``
biases). Such a container is an MoE layer when its parent (the MoE block) also holds a router (a
child or parameter whose leading dimension is ``E``) or a ``top_k``/``num_experts`` attribute.
``top_k`` is read from the block, the router, the expert container or their ``config``, in that
order. Containers the search would miss are declared with `mfumon.register_moe` or ``experts=``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import nn

from mfumon._walk import (
    HEADS_ATTRS,
    QK_DIM_ATTRS,
    all_params,
    full_shape,
    int_attr,
    module_int,
    named_modules,
    own_params,
)
from mfumon.errors import ConfigError, ConfigTypeError

__all__ = [
    "FoundMoE",
    "MoEParts",
    "Registration",
    "explicit_registrations",
    "find_moe",
    "moe_parts",
    "register",
]

TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_top_k", "experts_per_token", "router_top_k")
NUM_EXPERTS_ATTRS = ("num_experts", "n_routed_experts", "num_local_experts")


@dataclass(frozen=True)
class Registration:
    """A container declared as routed experts, with its top_k (0: still to be found on the model)."""

    top_k: int
    num_experts: int | None


_REGISTERED_TYPES: dict[type, Registration] = {}
_REGISTERED_MODULES: weakref.WeakKeyDictionary[nn.Module, Registration] = weakref.WeakKeyDictionary()


def register(experts: nn.Module | type[nn.Module], registration: Registration) -> None:
    """Remember a routed-expert container (instance or class) declared by `mfumon.register_moe`."""
    if isinstance(experts, nn.Module):
        _REGISTERED_MODULES[experts] = registration
    else:
        _REGISTERED_TYPES[experts] = registration


def explicit_registrations(experts: object, top_k: int | None) -> dict[object, Registration]:
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
    reg = Registration(top_k or 0, None)  # 0: top_k still to be found on the model
    return {item: reg for item in items}


@dataclass(frozen=True)
class FoundMoE:
    """One MoE block found in a model: its path, routed experts and experts per token."""

    path: str
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class _Container:
    module: nn.Module
    num_experts: int
    stacked: bool  # per-expert parameters stacked along dim 0, else one child module per expert
    registration: Registration | None


def find_moe(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    explicit: dict[object, Registration],
    top_k: int | None,
) -> tuple[list[FoundMoE], dict[int, tuple[int, bool]], set[int]]:
    """MoE blocks, routed params (id -> (layer index, is weight matrix)) and router param ids."""
    layers: list[FoundMoE] = []
    routed: dict[int, tuple[int, bool]] = {}
    router_ids: set[int] = set()
    for found, _, items, _, routers in _blocks(model, named, explicit, top_k):
        index = len(layers)
        layers.append(found)
        for c in items:
            for p in all_params(c.module):
                shape = full_shape(p)
                if c.stacked and (not shape or shape[0] != found.num_experts):
                    continue  # not per-expert: counts in full like the rest of the block
                routed[id(p)] = (index, len(shape) >= (3 if c.stacked else 2))
        router_ids |= {id(p) for p in routers}
    return layers, routed, router_ids


@dataclass(frozen=True, eq=False)
class MoEParts:
    """One MoE block's modules, to read its routing: the block, its routed-expert containers and
    its routers (children whose every parameter leads with num_experts; none when the router is
    a parameter of the block itself). Shared-expert gates are not routers here."""

    found: FoundMoE
    block: nn.Module
    containers: tuple[nn.Module, ...]
    routers: tuple[nn.Module, ...]


def moe_parts(model: nn.Module) -> list[MoEParts]:
    """The MoE blocks of `model` with their modules, found as `count_params` finds them (with
    `register_moe` declarations); ConfigError for routed experts without a top_k."""
    named = named_modules(model)
    out = []
    for found, block, items, router_modules, _ in _blocks(model, named, {}, None):
        routers = tuple(
            r for r in router_modules if {full_shape(p)[:1] for p in all_params(r)} == {(found.num_experts,)}
        )
        out.append(MoEParts(found, block, tuple(c.module for c in items), routers))
    return out


def _blocks(
    model: nn.Module,
    named: list[tuple[str, nn.Module]],
    explicit: dict[object, Registration],
    top_k: int | None,
) -> Iterator[tuple[FoundMoE, nn.Module, list[_Container], list[nn.Module], list[nn.Parameter]]]:
    """Each MoE block: what was found, the block, its expert containers, router modules and params."""
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

    for block_id, found in by_block.items():
        block_path, block = blocks[block_id]
        num_experts = found[0].num_experts
        items = [c for c in found if c.num_experts == num_experts]
        regs = [c.registration for c in items if c.registration is not None]
        router_modules, routers = _routers(block, num_experts, {id(c.module) for c in items})
        hinted = any(
            int_attr(o, NUM_EXPERTS_ATTRS + TOP_K_ATTRS) for o in [block] + [c.module for c in items]
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
        yield FoundMoE(path, num_experts, k), block, items, router_modules, routers


def _as_container(m: nn.Module, reg: Registration | None) -> _Container | None:
    """`m` as a routed-expert container, if it looks like one (or is registered as one)."""
    stacks = [full_shape(p) for p in own_params(m) if len(full_shape(p)) >= 3]
    if stacks and not isinstance(m, nn.modules.conv._ConvNd):
        leading = {s[0] for s in stacks}
        if len(leading) == 1 and (reg is not None or min(leading) >= 2):
            return _Container(m, _checked(leading.pop(), reg), True, reg)
    if reg is not None:
        children = [c for c in m._modules.values() if c is not None and all_params(c)]
        return _Container(m, _checked(len(children), reg), False, reg)
    if not isinstance(m, nn.ModuleList) or len(m) < 2:
        return None
    children = list(m._modules.values())
    first = children[0]
    if first is None or not all_params(first):
        return None
    signature = _signature(first)
    if any(c is None or type(c) is not type(first) or _signature(c) != signature for c in children[1:]):
        return None
    if any(
        isinstance(sub, nn.Embedding) or module_int(sub, HEADS_ATTRS + QK_DIM_ATTRS)
        for sub in first.modules()
    ):
        return None  # a stack of decoder layers, not experts
    return _Container(m, len(children), False, None)


def _checked(num_experts: int, reg: Registration | None) -> int:
    if reg is not None and reg.num_experts is not None and reg.num_experts != num_experts:
        raise ConfigError(
            f"register_moe(num_experts={reg.num_experts}) but the container holds {num_experts} experts"
        )
    return num_experts


def _signature(m: nn.Module) -> tuple[tuple[int, ...], ...]:
    return tuple(full_shape(p) for p in all_params(m))


def _routers(
    block: nn.Module, num_experts: int, containers: set[int]
) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """Router modules and parameters of an MoE block: its own [E, d] (and [E]) parameters and the
    children whose every parameter leads with E; with them, children leading with 1 (shared-expert
    gates). No [E, d] matrix anywhere: no router, and a gate alone does not make a block MoE."""
    own = [
        p
        for p in own_params(block)
        if full_shape(p) and full_shape(p)[0] == num_experts and len(full_shape(p)) <= 2
    ]
    routers: list[tuple[nn.Module, list[nn.Parameter]]] = [(block, own)] if own else []
    gates: list[tuple[nn.Module, list[nn.Parameter]]] = []
    for child in block._modules.values():
        if child is None or id(child) in containers:
            continue
        ps = all_params(child)
        if not ps or not any(len(full_shape(p)) == 2 for p in ps):
            continue
        leading = {full_shape(p)[0] if full_shape(p) else 0 for p in ps}
        if leading == {num_experts}:
            routers.append((child, ps))
        elif leading == {1}:
            gates.append((child, ps))
    if not any(len(full_shape(p)) == 2 for _, ps in routers for p in ps):
        return [], []
    chosen = routers + gates
    return [m for m, _ in chosen if m is not block], [p for _, ps in chosen for p in ps]


def _find_top_k(owners: list[nn.Module], model: nn.Module) -> int | None:
    """top_k from the block, its routers, the expert containers, then their and the model's configs."""
    candidates: list[object] = [*owners]
    candidates += [o.__dict__.get("config") for o in owners] + [getattr(model, "config", None)]
    for owner in candidates:
        k = int_attr(owner, TOP_K_ATTRS)
        if k is not None:
            return k
    return None
