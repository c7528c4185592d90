"""The walk of a model: where its embeddings, lm_head, routed experts, routers and attention are.

Everything is found by structure, never by model name or parameter-name substrings:

- embeddings are ``nn.Embedding``/``nn.EmbeddingBag`` modules (token and learned position tables);
- the lm_head is ``model.get_output_embeddings()`` where the model has it, else the module whose
  weight is tied to an embedding, else the last ``nn.Linear`` with as many outputs as the largest
  embedding has rows (the vocabulary);
- attention modules carry head attributes (``head_dim``/``qk_head_dim``/``num_heads``/``n_head``...)
  and own at least one weight matrix; each says whether it is causal (``is_causal``, else the
  ``is_decoder`` of BERT-family attention on transformers 4.x) and whether it is encoder-decoder
  cross-attention (``is_cross_attention`` on it or its parent, or a decoder attention that says
  it is not causal);
- state-space and linear-attention mixers (Mamba, Mamba2, GatedDeltaNet) own parameters of their
  own (the decay ``A_log``, skip ``D``, ``dt_bias``) and a depthwise causal ``nn.Conv1d`` child
  (groups = channels, padding = kernel - 1): they have no softmax scores;
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
    window: int | None = None  # sliding window: a query attends keys less than `window` positions away
    causal: bool | None = None  # what the module says; None: the caller's `causal=` decides


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
    cross_attention: tuple[str, ...] = ()  # paths of encoder-decoder cross-attention: scores not counted
    recurrent: tuple[str, ...] = ()  # paths of state-space / linear-attention mixers: no softmax scores
    elementwise_ids: frozenset[int] = frozenset()  # the mixers' own parameters (A_log, D, dt_bias)
    attention_paths: tuple[str, ...] = ()  # the module path of each


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
    mixers = _find_recurrent(named)
    attn_modules, cross = _find_attention(named, exclude=set(routed) | router_ids, mixers=mixers)
    paths = {id(m): path for path, m in named}
    return Structure(
        params=params,
        embedding_ids=emb_ids,
        lm_head_ids={id(p) for p in all_params(lm_head)} if lm_head is not None else set(),
        lm_head_weight=param(lm_head, "weight") if lm_head is not None else None,
        moe=moe_layers,
        routed=routed,
        router_ids=router_ids,
        attention_ids={id(p) for _, m in (*attn_modules, *cross, *mixers) for p in all_params(m)},
        attention=tuple(shape for shape, _ in attn_modules),
        cross_attention=tuple(path for path, _ in cross),
        recurrent=tuple(path for path, _ in mixers),
        elementwise_ids=frozenset(id(p) for _, m in mixers for p in own_params(m)),
        attention_paths=tuple(paths[id(m)] for _, m in attn_modules),
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
    named: list[tuple[str, nn.Module]], exclude: set[int], mixers: list[tuple[str, nn.Module]]
) -> tuple[list[tuple[AttentionShape, nn.Module]], list[tuple[str, nn.Module]]]:
    """Innermost modules with head attributes that own a weight matrix: (self-attention with its
    shape, cross-attention by path). Modules inside, or holding, a recurrent mixer are neither."""
    by_path = dict(named)
    candidates = []
    for path, m in named:
        if not path or int_attr(m, HEADS_ATTRS + QK_DIM_ATTRS) is None:
            continue
        if any(_within(path, mixer) or _within(mixer, path) for mixer, _ in mixers):
            continue
        if not any(len(full_shape(p)) >= 2 and id(p) not in exclude for p in all_params(m)):
            continue
        shape = _shape(m)
        if shape is not None:
            candidates.append((path, shape, m))
    paths = [path for path, _, _ in candidates]
    innermost = [c for c in candidates if not any(other.startswith(c[0] + ".") for other in paths)]
    second = _second_of_pairs(named[0][1], [(path, m) for path, _, m in innermost])
    found, cross = [], []
    for path, shape, m in innermost:
        if path in second or _is_cross(m, by_path.get(path.rpartition(".")[0])):
            cross.append((path, m))
        else:
            found.append((shape, m))
    return found, cross


def _second_of_pairs(model: nn.Module, attention: list[tuple[str, nn.Module]]) -> set[str]:
    """Cross-attention that says only ``is_decoder=True`` (T5 and BERT decoders on transformers 4.x):
    in a model built for cross-attention, the second of the two such modules in one decoder layer."""
    config = getattr(model, "config", None)
    if not (getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False)):
        return set()
    unsaid = [
        p for p, m in attention if getattr(m, "is_decoder", None) is True and _says(m, "is_causal") is None
    ]
    second = set()
    for path in unsaid:
        parts = path.split(".")
        for depth in range(len(parts) - 1, 0, -1):  # the nearest layer holding another such module
            layer = [p for p in unsaid if _within(p, ".".join(parts[:depth]))]
            if len(layer) > 1:
                if len(layer) == 2 and path == layer[1]:
                    second.add(path)
                break
    return second


def _find_recurrent(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """State-space / linear-attention mixers (Mamba, Mamba2, GatedDeltaNet), outermost first."""
    found: list[tuple[str, nn.Module]] = []
    for path, m in named:
        if _is_recurrent(m) and not any(_within(path, outer) for outer, _ in found):
            found.append((path, m))
    return found


def attention_shape(m: nn.Module) -> AttentionShape | None:
    """Shape of self-attention module `m`: heads, head widths, window, causal (config fills gaps).

    None when unknown, and for modules with no softmax score term mfumon counts: recurrent mixers,
    and cross-attention that says so itself.
    """
    if _is_recurrent(m) or _is_cross(m, None):
        return None
    return _shape(m)


def _shape(m: nn.Module) -> AttentionShape | None:
    config = getattr(m, "config", None)
    qk_dim = int_attr(m, (*QK_DIM_ATTRS, "attention_head_size"))  # BERT family on transformers 4.x
    heads = int_attr(m, HEADS_ATTRS) or int_attr(config, ("num_attention_heads",))
    width = int_attr(m, WIDTH_ATTRS) or int_attr(config, ("hidden_size",))
    if qk_dim is None and heads and width:
        qk_dim = width // heads
    if heads is None and qk_dim and width:
        heads = width // qk_dim
    if not heads or not qk_dim:
        return None
    v_dim = int_attr(m, ("v_head_dim",)) or qk_dim
    local = _local_attention(m)
    if local is not None:  # (left, right) reach, flash-attention style (ModernBERT on transformers 4.x)
        left, right = local
        return AttentionShape(heads, qk_dim, v_dim, left + 1 if left >= 0 else None, causal=right == 0)
    return AttentionShape(heads, qk_dim, v_dim, _window(m, config), causal=_causal(m))


def _causal(m: nn.Module) -> bool | None:
    """What attention module `m` says: `is_causal`, else BERT-family `is_decoder` (transformers 4.x)."""
    says = _says(m, "is_causal")
    return says if says is not None else _says(m, "is_decoder")


def _says(m: nn.Module, name: str) -> bool | None:
    value = getattr(m, name, None)
    return value if isinstance(value, bool) else None


def _is_cross(m: nn.Module, parent: nn.Module | None) -> bool:
    """Encoder-decoder cross-attention: flagged on the module or its parent (BERT, GPT-2), or a
    decoder attention that is not causal (BART, T5, Whisper: the decoder's self-attention is)."""
    if any(getattr(x, "is_cross_attention", None) is True for x in (m, parent) if x is not None):
        return True
    return getattr(m, "is_decoder", None) is True and getattr(m, "is_causal", None) is False


def _is_recurrent(m: nn.Module) -> bool:
    """A state-space / linear-attention mixer: own parameters (decay, skip) and a depthwise causal
    Conv1d child (groups = channels, padding = kernel - 1), as Mamba, Mamba2 and GatedDeltaNet have."""
    if not own_params(m):
        return False
    for child in m._modules.values():
        if isinstance(child, nn.Conv1d) and child.groups == child.in_channels > 1:
            kernel, padding = child.kernel_size[0], child.padding
            if kernel > 1 and isinstance(padding, tuple) and padding[0] == kernel - 1:
                return True
    return False


def _local_attention(m: nn.Module) -> tuple[int, int] | None:
    local = getattr(m, "local_attention", None)
    if isinstance(local, tuple) and len(local) == 2 and all(type(x) is int for x in local):
        return local
    return None


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer + ".")


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
