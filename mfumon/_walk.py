"""Primitives of the walk over a model: its modules, parameters at full size, and integer attributes.

Direct `_parameters`/`_modules`/`__dict__` access keeps a 45k-module model (DeepSeek-V3 with
per-expert modules, transformers 4.x) well under a second; nn.Module's generic getters are slower.
"""

from __future__ import annotations

from torch import nn

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
    """Parameters registered on `m` itself, not its submodules."""
    return [p for p in m._parameters.values() if p is not None]


def all_params(m: nn.Module) -> list[nn.Parameter]:
    """Parameters of `m` and its submodules (a shared one may appear twice)."""
    found: list[nn.Parameter] = []
    stack = [m]
    while stack:
        module = stack.pop()
        found.extend(p for p in module._parameters.values() if p is not None)
        stack.extend(c for c in module._modules.values() if c is not None)
    return found


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
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
