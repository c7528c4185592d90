"""The walk of a model: where its embeddings, lm_head, routed experts, routers and attention are.

Everything is found by structure, never by model name or parameter-name substrings:

- embeddings are ``nn.Embedding``/``nn.EmbeddingBag`` modules (token and learned position tables);
- the lm_head is ``model.get_output_embeddings()`` where the model has it, else the module whose
  weight is tied to an embedding, else the last ``nn.Linear`` with as many outputs as the largest
  embedding has rows (the vocabulary);
- attention modules carry head attributes (``head_dim``/``qk_head_dim``/``num_heads``/``n_head``...)
  and own at least one weight matrix;
- routed experts, their MoE blocks, routers and top_k: see `mfumon._experts`.

Sizes are full (unsharded) sizes, read without communication. This module finds; `mfumon.params`
counts what it found, and `mfumon.flops` turns the counts into FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mfumon._experts import FoundMoE, Registration, find_moe
from mfumon._walk import (
    HEADS_ATTRS,
    QK_DIM_ATTRS,
    WIDTH_ATTRS,
    all_params,
    full_shape,
    int_attr,
    named_modules,
    own_params,
    param,
)
from mfumon.errors import ConfigError

__all__ = ["AttentionShape", "Structure", "attention_shape", "find_structure"]


@dataclass(frozen=True)
class AttentionShape:
    """What one attention layer's score and weighted-sum matmuls need."""

    heads: int  # query heads (GQA/MQA share K/V heads, which does not change the score FLOPs)
    qk_head_dim: int  # per-head width of Q and K (MLA: nope + rope dims)
    v_head_dim: int  # per-head width of V
    window: int | None = None  # sliding window: most keys one query attends, itself included


@dataclass(frozen=True)
class Structure:
    """What the walk found in one model; parameters keyed by id, each distinct parameter once."""

    params: dict[int, nn.Parameter]
    embedding_ids: set[int]  # parameters of nn.Embedding / nn.EmbeddingBag modules
    lm_head_ids: set[int]  # parameters of the output projection (its weight may be tied)
    lm_head_weight: nn.Parameter | None
    moe: list[FoundMoE]
    routed: dict[int, tuple[int, bool]]  # routed-expert param id -> (MoE layer index, is weight matrix)
    router_ids: set[int]  # routers and shared-expert gates
    attention_ids: set[int]  # parameters inside attention modules
    attention: tuple[AttentionShape, ...]  # one per attention module, in model order


def find_structure(model: nn.Module, explicit: dict[object, Registration], top_k: int | None) -> Structure:
    """Walk `model` once; ConfigError for a model without parameters or an MoE without top_k."""
    named = named_modules(model)
    params = {id(p): p for _, m in named for p in own_params(m)}  # distinct: a tied weight once
    if not params:
        raise ConfigError(f"model {type(model).__name__} has no parameters; pass the model you train")
    emb_ids = {
        id(p) for _, m in named if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in own_params(m)
    }
    lm_head = _find_lm_head(model, named)
    moe_layers, routed, router_ids = find_moe(model, named, explicit, top_k)
    attn_modules = _find_attention(named, exclude=set(routed) | router_ids)
    return Structure(
        params=params,
        embedding_ids=emb_ids,
        lm_head_ids={id(p) for p in all_params(lm_head)} if lm_head is not None else set(),
        lm_head_weight=param(lm_head, "weight") if lm_head is not None else None,
        moe=moe_layers,
        routed=routed,
        router_ids=router_ids,
        attention_ids={id(p) for _, m in attn_modules for p in all_params(m)},
        attention=tuple(shape for shape, _ in attn_modules),
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
            return head if isinstance(head, nn.Module) and param(head, "weight") is not None else None
    tables = [m for _, m in named if isinstance(m, nn.Embedding)]
    table_weights = {id(param(m, "weight")) for m in tables}
    for _, m in named:
        weight = param(m, "weight")
        if not isinstance(m, nn.Embedding) and weight is not None and id(weight) in table_weights:
            return m  # tied to an input embedding
    if not tables:
        return None
    vocab = max(m.num_embeddings for m in tables)
    heads = [m for _, m in named if isinstance(m, nn.Linear) and m.out_features == vocab]
    return heads[-1] if heads else None


# --- attention layers -------------------------------------------------------------------------


def _find_attention(
    named: list[tuple[str, nn.Module]], exclude: set[int]
) -> list[tuple[AttentionShape, nn.Module]]:
    """Innermost modules with head attributes that own a weight matrix, with their shapes."""
    candidates = []
    for path, m in named:
        if not path or int_attr(m, HEADS_ATTRS + QK_DIM_ATTRS) is None:
            continue
        if not any(len(full_shape(p)) >= 2 and id(p) not in exclude for p in all_params(m)):
            continue
        shape = attention_shape(m)
        if shape is not None:
            candidates.append((path, shape, m))
    paths = [path for path, _, _ in candidates]
    return [
        (shape, m)
        for path, shape, m in candidates
        if not any(other.startswith(path + ".") for other in paths)
    ]


def attention_shape(m: nn.Module) -> AttentionShape | None:
    """Heads, head widths and sliding window of attention module `m` (config fills gaps); None if unknown."""
    config = getattr(m, "config", None)
    qk_dim = int_attr(m, QK_DIM_ATTRS)
    heads = int_attr(m, HEADS_ATTRS) or int_attr(config, ("num_attention_heads",))
    width = int_attr(m, WIDTH_ATTRS) or int_attr(config, ("hidden_size",))
    if qk_dim is None and heads and width:
        qk_dim = width // heads
    if heads is None and qk_dim and width:
        heads = width // qk_dim
    if not heads or not qk_dim:
        return None
    v_dim = int_attr(m, ("v_head_dim",)) or qk_dim
    return AttentionShape(heads, qk_dim, v_dim, _window(m, config))


def _window(m: nn.Module, config: object) -> int | None:
    """Sliding window of one attention module: its own attribute, else the config's layer_types."""
    if hasattr(m, "sliding_window"):
        own = m.sliding_window
        return own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else None
    window = int_attr(config, ("sliding_window",))
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(m, "layer_idx", None)
    if isinstance(layer_types, (list, tuple)) and isinstance(layer_idx, int) and layer_idx < len(layer_types):
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window
