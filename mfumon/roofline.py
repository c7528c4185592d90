"""The components of one training step, their FLOPs and bytes, and the roofline each row sits under.

`component_map` labels the model's modules by the component their time belongs to (found by
structure, as the FLOP model finds them: `mfumon._structure`, `mfumon._experts`). `component_costs`
splits `flop_breakdown`'s fields over the same components and adds a bytes-moved model:

FLOPs per step (the MFU model, so the rows add up to ``flop_breakdown(...).total x tokens``):
attention projections ``attn_proj``; attention core ``attn_scores`` (+ chinchilla's softmax);
mlp ``mlp`` less the routed experts; routed experts 2 x passes x weights x top_k / E;
router ``router``; lm_head + loss ``lm_head``; embeddings ``embedding`` (chinchilla only);
``other`` (norm scales and biases) goes to the row of the module that owns each vector, the rest
to "norms & elementwise"; optimizer and other: 0 model FLOPs.

Bytes per step (an analytic lower bound; a = bytes per activation element in the matmul dtype,
w = bytes per stored parameter element, T = tokens in the step):

- a weight matrix (k inputs, n outputs): weights 3 x numel x w (read forward, read backward for the
  input gradient, its gradient written; frozen: 2); activations 3 x (k + n) x a per token it sees
  (forward reads X and writes Y; backward reads dY twice and X once, writes dX). A routed expert
  sees T x top_k / E tokens, and its weights are read only when it gets one: min(1, T x top_k / E)
  of the experts' weights count;
- attention core (per layer, per token, fused kernel IO: no s x s matrix): 3 x (Q + K + V + O) x a
  with Q = heads x d_qk, K = kv_heads x d_qk, V = kv_heads x d_v, O = heads x d_v;
- a norm of width d: 5 x d x a per token (forward reads x, writes y; backward reads dy and x,
  writes dx) plus its scale as a weight; an embedding table of width d: 5 x d x a per token plus
  its dense gradient written once (numel x w);
- the loss: the logits read and their gradient written in fp32, 2 x vocab x 4 per token;
- the optimizer: what the step's optimizers hold, read from them after the step: each parameter
  with a gradient read and written, its gradient read, every state tensor read and written;
- not counted (so a real kernel moves more): residual adds, activation functions and gating
  inside the MLP, dropout, masks, rotary tables, communication.

Roofline per row: ceiling = min(peak, intensity x bandwidth), so the least time the row can take
is max(FLOPs / peak, bytes / bandwidth); its time lost is its seconds minus that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from mfumon._experts import explicit_registrations
from mfumon._grads import grad_flow
from mfumon._structure import Structure, find_structure
from mfumon._walk import all_params, full_numel, full_shape, int_attr, named_modules, param
from mfumon.flops import FlopBreakdown

__all__ = [
    "ATTN_CORE",
    "ATTN_PROJ",
    "COMPONENTS",
    "EMBEDDINGS",
    "EXPERTS",
    "LM_HEAD",
    "MLP",
    "NORMS",
    "OPTIMIZER",
    "OTHER",
    "ROUTER",
    "ComponentMap",
    "Costs",
    "component_costs",
    "component_map",
    "optimizer_bytes",
    "roofline",
]

ATTN_PROJ = "attention projections"
ATTN_CORE = "attention core"
MLP = "mlp"
EXPERTS = "routed experts"
ROUTER = "router"
NORMS = "norms & elementwise"
EMBEDDINGS = "embeddings"
LM_HEAD = "lm_head + loss"
OPTIMIZER = "optimizer"
OTHER = "other"
COMPONENTS = (ATTN_PROJ, ATTN_CORE, MLP, EXPERTS, ROUTER, NORMS, EMBEDDINGS, LM_HEAD, OPTIMIZER, OTHER)

_BY_CATEGORY = {"attn": ATTN_PROJ, "mlp": MLP, "routed": EXPERTS, "router": ROUTER, "lm": LM_HEAD}
_BY_CATEGORY.update(vector=NORMS, embedding=EMBEDDINGS)


@dataclass
class ComponentMap:
    """Which modules to time and the component each one's own time belongs to."""

    root: nn.Module  # the model (under a torch.compile wrapper: the module it compiled)
    units: list[tuple[str, nn.Module, str]]  # (path, module, component of its exclusive time)
    compiled: list[str] = field(default_factory=list)  # paths of compiled regions (not separated inside)
    merged: set[str] = field(default_factory=set)  # components a compiled region hides
    joined: list[tuple[set[str], str]] = field(default_factory=list)  # components one module runs as one
    structure: Structure | None = None


def _is_compiled(m: nn.Module) -> bool:
    """torch.compile'd: an OptimizedModule wrapper, or a module compiled in place (`module.compile()`)."""
    return hasattr(m, "_orig_mod") or m.__dict__.get("_compiled_call_impl") is not None


def component_map(model: nn.Module) -> ComponentMap:
    """Label `model`'s modules by component (see the module docstring); compiled regions are one unit."""
    root = model
    while hasattr(root, "_orig_mod") and isinstance(root._orig_mod, nn.Module):  # torch.compile(model)
        root = root._orig_mod
    found = find_structure(root, explicit_registrations(None, None), None)
    category = _categories(found, root)
    special: dict[int, str] = {}
    for path in (*found.attention_paths, *found.cross_attention, *found.recurrent):
        special[id(root.get_submodule(path))] = ATTN_CORE
    for moe in found.moe:
        special[id(root.get_submodule(moe.path))] = ROUTER
    lm_head = next(
        (
            m
            for _, m in named_modules(root)
            if not isinstance(m, nn.Embedding)
            and found.lm_head_weight is not None
            and param(m, "weight") is found.lm_head_weight
        ),
        None,
    )
    out = ComponentMap(root, [], structure=found)
    if root is not model:  # the whole model is compiled: its boundary is all that survives
        out.compiled.append("")
        out.merged |= {_BY_CATEGORY[c] for c in set(category.values())} | ({ATTN_CORE} if special else set())
        out.units.append(("", model, "compiled"))
        return out
    specials = set(special)

    def inside_special(m: nn.Module) -> bool:
        return any(id(sub) in specials for sub in m.modules() if sub is not m)

    def visit(path: str, m: nn.Module, parent_label: str | None) -> None:
        params = all_params(m)
        if not params:
            return  # no parameters (rotary tables, activations, dropout): its time is its parent's
        if type(m).forward is nn.Module.forward:  # a container (ModuleList, ModuleDict) is never
            for name, child in m._modules.items():  # called, so hooks on it never fire: its children
                if child is not None:  # are timed instead (e.g. experts kept in an nn.ModuleList)
                    visit(f"{path}.{name}" if path else name, child, parent_label)
            return
        every = {category.get(id(p), "vector") for p in params}
        cats = every - {"vector"} if len(every) > 1 else set(every)  # biases go with their weight's module
        if _is_compiled(m):  # what runs inside is one piece of compiled code
            out.compiled.append(path)
            out.merged |= {_BY_CATEGORY[c] for c in every} | ({ATTN_CORE} if inside_special(m) else set())
            if hasattr(m, "_orig_mod"):  # an OptimizedModule wrapper: its own hooks run eagerly
                out.units.append((path, m, "compiled"))
            else:  # compiled in place: hooks on it would be traced; it is timed as part of its parent,
                out.merged.add(parent_label or OTHER)  # whose own time merges with it (the root's: other)
            return
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            out.units.append((path, m, EMBEDDINGS))
            return
        if m is lm_head:
            out.units.append((path, m, LM_HEAD))
            return
        if id(m) in special:
            out.units.append((path, m, special[id(m)]))
            own = {
                _BY_CATEGORY[category.get(id(p), "vector")] for p in m._parameters.values() if p is not None
            }
            if own - {special[id(m)], NORMS}:  # e.g. nn.MultiheadAttention's in_proj_weight
                why = f"{path} ({type(m).__name__}) multiplies its own weights inside its forward"
                out.joined.append((own - {NORMS} | {special[id(m)]}, why))
            for name, child in m._modules.items():
                if child is not None:
                    visit(f"{path}.{name}" if path else name, child, special[id(m)])
            return
        if len(cats) == 1 and not inside_special(m):
            label = _BY_CATEGORY[cats.pop()]
            if parent_label == ATTN_CORE and label == MLP:  # a weight in attention the walk did not class
                label = ATTN_PROJ
            out.units.append((path, m, label))
            return
        holds_head = lm_head is not None and any(c is lm_head for c in m._modules.values())
        label = LM_HEAD if holds_head else NORMS  # HF: the loss is computed in the head's parent
        out.units.append((path, m, label))
        for name, child in m._modules.items():
            if child is not None:
                visit(f"{path}.{name}" if path else name, child, label)

    visit("", root, None)
    return out


def _categories(found: Structure, model: nn.Module) -> dict[int, str]:
    """Parameter id -> category, as `mfumon.params` classes it (routed experts apart)."""
    out: dict[int, str] = {}
    for pid, p in found.params.items():
        if pid in found.routed:
            out[pid] = "routed"
        elif found.lm_head_weight is not None and p is found.lm_head_weight:
            out[pid] = "lm"
        elif pid in found.embedding_ids:
            out[pid] = "embedding"
        elif len(full_shape(p)) < 2 or pid in found.elementwise_ids:
            out[pid] = "vector"
        elif pid in found.router_ids:
            out[pid] = "router"
        elif pid in found.attention_ids:
            out[pid] = "attn"
        else:
            out[pid] = "mlp"
    return out


@dataclass
class Costs:
    """FLOPs and bytes of one step per component; `notes` say what the model could not count."""

    flops: dict[str, float]
    bytes: dict[str, float]
    notes: list[str] = field(default_factory=list)


def component_costs(cmap: ComponentMap, breakdown: FlopBreakdown, *, tokens: int, act_bytes: int) -> Costs:
    """FLOPs (from `breakdown`, so they add up to its total x tokens) and bytes per component."""
    found = cmap.structure
    assert found is not None  # set by component_map
    flops = dict.fromkeys(COMPONENTS, 0.0)
    nbytes = dict.fromkeys(COMPONENTS, 0.0)
    label_of = {}  # param id -> component of the unit owning it
    for _, m, label in sorted(cmap.units, key=lambda u: u[0].count(".") if u[0] else -1):
        for p in all_params(m):
            label_of[id(p)] = label  # deeper units overwrite their ancestors'
    named = named_modules(cmap.root)
    every = all(p.requires_grad for p in found.params.values())
    flow = None if every else grad_flow(named, "auto", found.attention_paths)
    moe_k = {i: (layer.top_k, layer.num_experts) for i, layer in enumerate(found.moe)}
    routed_w = vectors = 0.0
    vector_by = dict.fromkeys(COMPONENTS, 0.0)
    for pid, p in found.params.items():
        passes = 3 if flow is None else flow.passes(pid, p)
        n, shape = full_numel(p), full_shape(p)
        share, used = 1.0, 1.0
        if pid in found.routed:
            k, e = moe_k[found.routed[pid][0]]
            share, used = k / e, min(1.0, tokens * k / e)
        label = label_of.get(pid, NORMS)
        label = label if label != "compiled" else _BY_CATEGORY.get("vector")
        w = p.element_size()
        if pid in found.routed and len(shape) >= 2 and found.routed[pid][1]:
            routed_w += 2 * passes * n * share
        elif len(shape) < 2 or pid in found.elementwise_ids:
            vectors += 2 * passes * n * share
            vector_by[label] += 2 * passes * n * share
        is_table = pid in found.embedding_ids and found.lm_head_weight is not p
        if is_table:
            nbytes[EMBEDDINGS] += n * w + tokens * 5 * shape[-1] * act_bytes
            continue
        weight_bytes = (3 if p.requires_grad else 2) * n * w * used
        if len(shape) >= 2 and pid not in found.elementwise_ids:
            per_matrix = math.prod(shape[-2:])
            k_in, n_out = shape[-1], shape[-2]
            seen = tokens * share * (n // per_matrix)  # token-passes over its matrices
            comp = _matmul_component(pid, found, label)
            nbytes[comp] += weight_bytes + seen * 3 * (k_in + n_out) * act_bytes
        else:
            nbytes[label if label in nbytes else NORMS] += weight_bytes
    for _, m, label in cmap.units:
        if label == NORMS and all(len(full_shape(p)) < 2 for p in all_params(m)):
            width = max(full_numel(p) for p in all_params(m))
            nbytes[NORMS] += tokens * 5 * width * act_bytes
    for a, path in zip(found.attention, found.attention_paths, strict=True):
        kv = _kv_heads(cmap.root, path, a.heads)
        per_token = a.heads * a.qk_head_dim + kv * a.qk_head_dim + kv * a.v_head_dim + a.heads * a.v_head_dim
        nbytes[ATTN_CORE] += tokens * 3 * per_token * act_bytes
    if found.lm_head_weight is not None:
        nbytes[LM_HEAD] += tokens * 2 * full_shape(found.lm_head_weight)[0] * 4
    b = breakdown
    flops[ATTN_PROJ] = b.attn_proj * tokens
    flops[ATTN_CORE] = (b.attn_scores + b.softmax) * tokens
    flops[MLP] = max(b.mlp - routed_w, 0) * tokens
    flops[EXPERTS] = min(routed_w, b.mlp) * tokens
    flops[ROUTER] = b.router * tokens
    flops[LM_HEAD] = b.lm_head * tokens
    flops[EMBEDDINGS] = b.embedding * tokens
    notes = []
    if b.other and vectors <= b.other * 1.001:  # norms' and biases' FLOPs go where their module is timed
        for label, f in vector_by.items():
            if label != NORMS:
                flops[label] += f * tokens
        flops[NORMS] += (b.other - (vectors - vector_by[NORMS])) * tokens
    else:
        flops[NORMS] += b.other * tokens
    return Costs(flops, nbytes, notes)


def _matmul_component(pid: int, found: Structure, label: str) -> str:
    """The component a weight matrix's bytes belong to (its category; a compiled unit hides nothing here)."""
    if pid in found.routed:
        return EXPERTS
    if found.lm_head_weight is not None and pid == id(found.lm_head_weight):
        return LM_HEAD
    if pid in found.router_ids:
        return ROUTER
    if pid in found.attention_ids:
        return ATTN_PROJ
    return label if label in (MLP, ATTN_PROJ, ROUTER, EXPERTS, LM_HEAD) else MLP


def _kv_heads(model: nn.Module, path: str, heads: int) -> int:
    """K/V heads of one attention layer (GQA/MQA): its own attribute, its config, else `heads`."""
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return heads
    kv = int_attr(m, ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head"))
    groups = int_attr(m, ("num_key_value_groups",))
    if kv is None and groups:
        kv = heads // groups
    return kv or int_attr(getattr(m, "config", None), ("num_key_value_heads",)) or heads


def optimizer_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> float:
    """Bytes one step of these optimizers moves: each trained parameter read and written, its gradient
    read, every tensor of its state read and written (read after the step: the gradients may be gone)."""
    total = 0.0
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                local = _local(p)  # FSDP2 / DTensor: this rank's shard is what its optimizer touches
                total += 3 * local.numel() * local.element_size()  # the gradient has the parameter's size
                for value in opt.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.numel() > 1:
                        value = _local(value)
                        total += 2 * value.numel() * value.element_size()
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2, tensor parallel), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def roofline(
    flops: float, nbytes: float, seconds: float, peak_flops: float | None, bandwidth: float | None
) -> dict[str, float | None]:
    """Achieved FLOP/s, intensity (FLOPs per byte), ceiling FLOP/s, fraction of it, and time lost.

    The least time is max(flops / peak, bytes / bandwidth), the roofline's; with no bandwidth known,
    flops / peak (the compute roof alone); None with no peak (except for rows with no FLOPs).
    """
    intensity = flops / nbytes if nbytes > 0 else None
    achieved = flops / seconds if seconds > 0 else None
    ceiling: float | None = None
    least: float | None = None
    if peak_flops is not None:  # with no bandwidth, the compute roof alone (the profile notes it)
        if flops > 0:  # a row with no FLOPs (optimizer, other) has a least time but no FLOP/s ceiling
            ceiling = (
                peak_flops
                if bandwidth is None or intensity is None
                else min(peak_flops, intensity * bandwidth)
            )
        least = max(flops / peak_flops, nbytes / bandwidth if bandwidth else 0.0)
    elif bandwidth is not None and flops <= 0:
        least = nbytes / bandwidth
    return {
        "tflops": None if achieved is None else achieved / 1e12,
        "intensity": intensity,
        "ceiling_tflops": None if ceiling is None else ceiling / 1e12,
        "fraction": None if least is None or seconds <= 0 else least / seconds,
        "time_lost": None if least is None else seconds - least,
    }
