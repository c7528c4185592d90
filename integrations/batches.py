"""What a training batch shows the callbacks: its tokens, its own shapes, the model's longest sequence.

Framework-free (torch only), found by structure, never synced: a token count stays a 0-d tensor on
the batch's device, and document lengths are computed there (`mfumon.steps`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mfumon.monitoring import Tokens
from mfumon.steps import doc_lengths_from_cu_seqlens, doc_lengths_from_positions

__all__ = ["batch_shapes", "batch_tokens", "config_seq_len"]


def batch_tokens(batch: Any) -> tuple[Tokens, int] | None:
    """Tokens in one micro-batch and its sequence length; None when the batch shows no tokens.

    Found by structure: a mapping with a 2-D `attention_mask` (non-padding tokens, left on the
    device: never synced here) or `input_ids` (all of them); else an integer (batch, seq)
    tensor, alone or first in a tuple/list.
    """
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        mask = batch.get("attention_mask")
        ids = ids if isinstance(ids, torch.Tensor) and ids.ndim >= 1 else None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and (ids is None or mask.shape == ids.shape):
            return mask.sum(), int(mask.shape[-1])
        if ids is not None:
            return ids.numel(), int(ids.shape[-1])
        return None
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if (
        isinstance(batch, torch.Tensor)
        and batch.ndim == 2
        and not (batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool)
    ):
        return batch.numel(), int(batch.shape[-1])
    return None


def batch_shapes(batch: Any) -> dict[str, Any]:
    """One micro-batch's own shapes, as keyword arguments of `Monitor.micro_step`; {} when it shows none.

    Found by structure, on the batch's device with no host sync: `cu_seq_lens_q` (document offsets
    of HF's `DataCollatorWithFlattening`) or packed rows' `position_ids` (a document starts where
    they restart; only without a 2-D `attention_mask`) give `doc_lengths`; otherwise the batch's
    own sequence length (dynamic padding) is its `seq_len`.
    """
    if isinstance(batch, Mapping):
        cu = batch.get("cu_seq_lens_q")
        if isinstance(cu, torch.Tensor) and cu.ndim == 1 and cu.numel() > 1 and _integer(cu):
            return {"doc_lengths": doc_lengths_from_cu_seqlens(cu)}
        pos, ids, mask = batch.get("position_ids"), batch.get("input_ids"), batch.get("attention_mask")
        if (
            isinstance(pos, torch.Tensor)
            and pos.ndim == 2
            and _integer(pos)
            and not (isinstance(mask, torch.Tensor) and mask.ndim == 2)
            and (not isinstance(ids, torch.Tensor) or ids.shape == pos.shape)
        ):
            return {"doc_lengths": doc_lengths_from_positions(pos)}
    found = batch_tokens(batch)
    return {} if found is None else {"seq_len": found[1]}


def _integer(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def config_seq_len(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (`max_position_embeddings`/`n_positions`)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
