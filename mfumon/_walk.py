"""Primitives of the walk over a model: its modules, parameters at full size, and integer attributes.

Direct `_parameters`/`_modules`/`__dict__` access keeps a 45k-module model (DeepSeek-V3 with
per-expert modules, transformers 4.x) well under a second; nn.Module's generic getters are slower.

Sharded parameters count at full size, without communication: DeepSpeed ZeRO-3 keeps it in
``ds_shape``, an FSDP2 DTensor's shape is global, and FSDP1 (``FullyShardedDataParallel``, which
Lightning's ``FSDPStrategy`` and accelerate use) flattens a unit's parameters into one
``FlatParameter`` whose metadata (``_param_infos``, ``_shapes``, ``_shared_param_infos``) names
every original parameter, its module and its full shape. With ``use_orig_params=False`` the
original modules hold no parameters; with ``True`` they hold sharded 1-D views (possibly empty).
Either way the walk sees, on the module that owns it, a stand-in for each original: a parameter
on the meta device with the full shape (one per tied weight, so ties stay ties), and never the
FlatParameter itself. Read parameters through `own_params`, `all_params` and `param`, never
``m._parameters`` or ``m.weight``, so FSDP1 models get the same answer as plain ones.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from mfumon.errors import ConfigError

__all__ = [
    "HEADS_ATTRS",
    "QK_DIM_ATTRS",
    "WIDTH_ATTRS",
    "all_params",
    "full_numel",
    "full_shape",
    "has_head_attrs",
    "int_attr",
    "module_int",
    "named_modules",
    "own_params",
    "param",
]

HEADS_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
QK_DIM_ATTRS = ("qk_head_dim", "head_dim", "head_size")
WIDTH_ATTRS = ("embed_dim", "hidden_size", "n_embd", "d_model")


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """Full (unsharded) shape: DeepSpeed ZeRO-3 keeps it in ds_shape; a DTensor's shape is global."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


def full_numel(p: nn.Parameter) -> int:
    """Full (unsharded) element count, without communication (ZeRO-3 ds_numel, DTensor global numel)."""
    ds_numel = getattr(p, "ds_numel", None)
    return int(ds_numel) if ds_numel is not None else int(p.numel())


def own_params(m: nn.Module) -> list[nn.Parameter]:
    """Parameters registered on `m` itself, not its submodules (FSDP1 originals as full-size stand-ins)."""
    if _FSDP1_SEEN:  # only once an FSDP1 model was walked: plain models take no extra step
        views = _STANDINS.get(m)
        if views is not None:
            return _with_standins(m, views)
    return [p for p in m._parameters.values() if p is not None]


def param(m: nn.Module, name: str) -> nn.Parameter | None:
    """Parameter `name` registered on `m` as the walk sees it (an FSDP1 original's stand-in), or None."""
    if _FSDP1_SEEN:
        views = _STANDINS.get(m)
        if views is not None and name in views:
            return views[name]
    p = m._parameters.get(name)
    return None if p is None or _is_flat(p) else p


def all_params(m: nn.Module) -> list[nn.Parameter]:
    """Parameters of `m` and its submodules (a shared one may appear twice)."""
    found: list[nn.Parameter] = []
    stack = [m]
    while stack:
        module = stack.pop()
        found.extend(own_params(module))
        stack.extend(c for c in module._modules.values() if c is not None)
    return found


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) for every distinct module, parents first, like nn.Module.named_modules().

    Registers the FSDP1 units it meets, so `own_params` then sees their original parameters.
    """
    seen = {id(model)}
    out: list[tuple[str, nn.Module]] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    fsdp = _fsdp1_class()
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
        if fsdp is not None:
            _register_flat(m, fsdp)
    return out


# --- FSDP1: original parameters behind a FlatParameter -------------------------------------------

# original module -> {parameter name: full-size stand-in}; the FlatParameter's module maps to {}
_FSDP1_SEEN = False  # a plain global: a weak dictionary's truth test costs a call per module
_STANDINS: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Parameter]] = weakref.WeakKeyDictionary()
_DONE: dict[int, weakref.ref[torch.Tensor]] = {}  # FlatParameters whose stand-ins exist, by id (tensors
# compare elementwise, so no weak set)


def _fsdp1_class() -> type | None:
    """FullyShardedDataParallel if something imported it (else no model holds one), else None."""
    module = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    return getattr(module, "FullyShardedDataParallel", None)


def _is_flat(p: torch.Tensor) -> bool:
    return getattr(p, "_is_flat_param", False) is True


def _register_flat(m: nn.Module, fsdp: type) -> None:
    """Stand-ins for the originals of the FlatParameter `m` holds: an FSDP1 unit's (its handle's, which
    with use_orig_params=True no module registers), or one registered on `m` (the wrapped module's,
    reachable when the FSDP unit above it is not, e.g. Lightning wrapping the LightningModule)."""
    flat = m._parameters.get("_flat_param")  # the name FSDP1 registers it under (use_orig_params=False)
    flats = [flat] if flat is not None and _is_flat(flat) else []
    if isinstance(m, fsdp):
        handle = getattr(m, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is not None:
            flats.append(flat)
    global _FSDP1_SEEN
    for flat in flats:
        _FSDP1_SEEN = True
        done = _DONE.get(id(flat))
        if done is None or done() is not flat:
            _standins(flat)
            _DONE[id(flat)] = weakref.ref(flat)
    if flats and m not in _STANDINS:
        _STANDINS[m] = {}  # the FlatParameter's own module: hide the FlatParameter
    if m.__dict__.get("_fsdp_use_orig_params") is True:
        _check_reached(m)


def _check_reached(m: nn.Module) -> None:
    """ConfigError if `m` holds use_orig_params=True shards whose FSDP unit the walk never met: their
    full shapes live only on that unit's FlatParameter (e.g. the model inside the FSDP root)."""
    views = _STANDINS.get(m, {})
    for name, p in m._parameters.items():
        if p is not None and name not in views and getattr(p, "_fsdp_flattened", False):
            raise ConfigError(
                f"parameter '{name}' of {type(m).__name__} is an FSDP (use_orig_params=True) shard whose "
                f"FullyShardedDataParallel unit is not inside the model given, so its full size is unknown; "
                f"pass the FSDP-wrapped model (Lightning: trainer.model; HF: the Trainer's model)"
            )


def _standins(flat: torch.Tensor) -> None:
    """One meta Parameter of full shape per original parameter of `flat`; a shared one maps to its primary."""
    originals = getattr(flat, "_params", None)  # use_orig_params=True: each original keeps its flag
    for i, (name, module, _) in enumerate(flat._param_infos):
        grad = originals[i].requires_grad if originals else flat.requires_grad
        full = torch.empty(flat._shapes[i], dtype=flat.dtype, device="meta")
        _STANDINS.setdefault(module, {})[name] = nn.Parameter(full, requires_grad=grad)
    for info in flat._shared_param_infos:
        primary = _STANDINS[info.prim_module][info.prim_param_name]
        _STANDINS.setdefault(info.module, {})[info.param_name] = primary


def _with_standins(m: nn.Module, views: dict[str, nn.Parameter]) -> list[nn.Parameter]:
    """`m`'s parameters with FSDP1 originals replaced by their stand-ins and FlatParameters left out."""
    out = [views.get(name, p) for name, p in m._parameters.items() if p is not None and not _is_flat(p)]
    return out + [p for name, p in views.items() if m._parameters.get(name) is None]


def module_int(m: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of `names` set on module `m` (a plain instance attribute) to a positive int."""
    attrs = m.__dict__
    for name in names:
        value = attrs.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def int_attr(obj: object, names: tuple[str, ...]) -> int | None:
    """The first attribute of `names` on `obj` (a config, or a module) that holds a positive int."""
    if obj is None:
        return None
    if isinstance(obj, nn.Module):
        return module_int(obj, names)
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def has_head_attrs(m: nn.Module) -> bool:
    """Whether module `m` carries attention head attributes (an attention module, or part of one)."""
    return module_int(m, HEADS_ATTRS + QK_DIM_ATTRS) is not None
