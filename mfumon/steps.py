"""What one optimizer step brings to the monitor: its tokens and, when given, its shapes.

`StepInput` checks each `micro_step()`/`step()` call and sums the micro-batches until `step()`
closes the optimizer step. It hands the step timer two values, both left on their device:

- the tokens (an int, or a 0-d tensor such as ``attention_mask.sum()``);
- the step's extra model FLOPs, when it brought its own shapes (``doc_lengths=`` or
  ``seq_len=``): its attention FLOPs (`mfumon.flops.step_attention_flops`) less tokens x the
  setup's attention FLOPs per token, so that tokens x flops_per_token + extra is the step's own
  count. A step without shapes has none: its FLOPs are tokens x flops_per_token, as at setup.

Document lengths can be read off a batch without a host sync: `doc_lengths_from_positions`
(packed rows whose ``position_ids`` restart per document) and `doc_lengths_from_cu_seqlens`
(``cu_seq_lens_q`` of HF's ``DataCollatorWithFlattening``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mfumon.errors import ConfigError, ConfigTypeError, check_int
from mfumon.flops import step_attention_flops
from mfumon.params import layout

if TYPE_CHECKING:
    from mfumon.flop_model import FlopModel

__all__ = [
    "Lengths",
    "StepInput",
    "Tokens",
    "check_doc_lengths",
    "check_tokens",
    "doc_lengths_from_cu_seqlens",
    "doc_lengths_from_positions",
]

Tokens = int | float | torch.Tensor  # a whole number of tokens, or a one-element tensor on any device
Lengths = Sequence[int] | torch.Tensor  # lengths of the documents packed into one step


def check_tokens(tokens: Any, name: str = "tokens") -> Tokens:
    """Validate a token count: a whole number >= 0 or a one-element numeric tensor (shape only)."""
    if type(tokens) is int:  # fast path
        if tokens < 0:
            raise ConfigError(f"{name} must be >= 0 (tokens processed in this step), got {tokens}")
        return tokens
    if isinstance(tokens, torch.Tensor):
        if tokens.numel() != 1 or tokens.dtype == torch.bool or tokens.is_complex():
            raise ConfigError(
                f"{name} must be a number or a one-element tensor such as attention_mask.sum(), "
                f"got a tensor of shape {tuple(tokens.shape)} and dtype {tokens.dtype}"
            )
        return tokens
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Real):
        raise ConfigTypeError(f"{name} must be a whole number of tokens (int or 0-d tensor), got {tokens!r}")
    if not math.isfinite(tokens) or tokens < 0 or float(tokens) != int(tokens):
        raise ConfigError(
            f"{name} must be a whole number >= 0 (tokens processed in this step), got {tokens!r}"
        )
    return int(tokens)


def check_doc_lengths(doc_lengths: Any) -> torch.Tensor | list[int]:
    """`doc_lengths` checked: a list of ints >= 1 (returned as a list), or a non-empty 1-D integer tensor.

    A tensor is checked by shape and dtype only (its values are never read: no host sync).
    """
    if isinstance(doc_lengths, torch.Tensor):
        if (
            doc_lengths.ndim != 1
            or doc_lengths.numel() == 0
            or doc_lengths.dtype.is_floating_point
            or (doc_lengths.is_complex() or doc_lengths.dtype == torch.bool)
        ):
            raise ConfigError(
                "doc_lengths must be a non-empty 1-D integer tensor (the length of each document packed "
                f"into this step), got shape {tuple(doc_lengths.shape)} and dtype {doc_lengths.dtype}"
            )
        return doc_lengths
    if isinstance(doc_lengths, (str, bytes)) or not isinstance(doc_lengths, Sequence):
        raise ConfigTypeError(
            "doc_lengths must be a list of ints or a 1-D integer tensor (the length of each document "
            f"packed into this step), got {type(doc_lengths).__name__}"
        )
    bad = [n for n in doc_lengths if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1]
    if bad or not doc_lengths:
        raise ConfigError(
            "doc_lengths must be ints >= 1, one per document packed into this step, "
            f"got {bad[:3] if bad else list(doc_lengths)!r}"
        )
    return [int(n) for n in doc_lengths]


def doc_lengths_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Document lengths of packed rows from their `position_ids`, on their device, without a host sync.

    A document starts at each row's first token and wherever the position does not count on from
    the previous token's (a reset, e.g. to 0). Returns a 1-D int64 tensor with one entry per
    token: the length of the document starting there, 0 elsewhere (zeros count no FLOPs).
    """
    pos = position_ids.reshape(-1, position_ids.shape[-1])  # (rows, seq)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flat = starts.reshape(-1)  # (rows * seq,)
    index = torch.arange(flat.numel(), device=flat.device)
    first = torch.where(flat, index, 0).cummax(0).values  # each token's document start
    return torch.zeros_like(index).index_add_(0, first, torch.ones_like(index))  # tokens per start


def doc_lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Document lengths from cumulative offsets ``[0, n1, n1 + n2, ...]`` (``cu_seq_lens_q``), no sync."""
    cu = cu_seqlens.reshape(-1)
    return cu[1:] - cu[:-1]


class StepInput:
    """One optimizer step's tokens and extra FLOPs, summed over its micro-batches (see the module doc)."""

    def __init__(self, flops: FlopModel) -> None:
        self._flops = flops
        self.pending: Tokens | None = None  # micro-batches' tokens since the last step, if any
        self._extra: Any = None  # their extra FLOPs; None while none brought shapes
        self._layers: Any = None  # the model's attention layers, found at the first shaped step
        self._grads: Any = None  # and whether each one's Q, K, V need a gradient
        self._counted: Any = None  # the FLOP model's breakdown they were read for
        self._per_token: dict[int, float] = {}  # seq_len -> attention FLOPs per token

    def add(self, tokens: Tokens, doc_lengths: Lengths | None, seq_len: int | None) -> None:
        """Add one micro-batch; raises ConfigError/ConfigTypeError on a bad argument (nothing is added)."""
        tokens = check_tokens(tokens)
        shaped = doc_lengths is not None or seq_len is not None
        extra = self._extra_of(tokens, doc_lengths, seq_len) if shaped else None
        self.pending = tokens if self.pending is None else self.pending + tokens
        if extra is not None:
            self._extra = extra if self._extra is None else self._extra + extra

    def take(
        self, tokens: Tokens | None, doc_lengths: Lengths | None, seq_len: int | None
    ) -> tuple[Tokens, Any]:
        """The step's tokens and extra FLOPs (None: no shapes), its micro-batches included; then empty."""
        if tokens is not None:
            self.add(tokens, doc_lengths, seq_len)
        elif self.pending is None:
            raise ConfigError(
                "step() needs tokens=<tokens in this optimizer step>, or micro_step(tokens=...) calls"
            )
        elif doc_lengths is not None or seq_len is not None:
            raise ConfigError("step(doc_lengths=/seq_len=) needs tokens= too; or pass them to micro_step()")
        out = self.pending, self._extra
        self.pending = self._extra = None
        return out

    def _extra_of(self, tokens: Tokens, doc_lengths: Lengths | None, seq_len: int | None) -> Any:
        """This micro-batch's attention FLOPs by its own shapes, less tokens x the setup's per token."""
        flops = self._flops
        if doc_lengths is not None and seq_len is not None:
            raise ConfigError("pass doc_lengths= or seq_len= for a step, not both")
        if flops.breakdown is None or flops.model is None or flops.convention != "mfumon":
            raise ConfigError(
                "doc_lengths=/seq_len= in step() need FLOPs counted from the model under "
                "convention='mfumon'; this monitor has fixed FLOPs per token (flops_per_token= or "
                f"convention={flops.convention!r}): drop them, or build it with the model instead"
            )
        if self._counted is not flops.breakdown:  # first shaped step, or counted again (frozen weights)
            whole = layout(flops.model, grads=flops.grads)
            self._layers, self._grads = whole.attention, whole.attention_grads
            self._per_token.clear()
            self._counted = flops.breakdown
        setup = flops.breakdown.attn_scores  # attention FLOPs per token as counted now
        if seq_len is not None:
            seq_len = check_int("seq_len", seq_len, "tokens per sequence in this step")
            per_token = self._per_token.get(seq_len)
            if per_token is None:  # rows of seq_len tokens: one document per row
                row = step_attention_flops([seq_len], self._layers, causal=flops.causal, grads=self._grads)
                per_token = self._per_token[seq_len] = row / seq_len
            return None if abs(per_token - setup) < 0.5 else tokens * (per_token - setup)  # 0.5: rounding
        docs = check_doc_lengths(doc_lengths)
        if not self._layers:
            return None  # no attention layers: no attention FLOPs to change
        step = step_attention_flops(docs, self._layers, causal=flops.causal, grads=self._grads)
        return step - tokens * setup
