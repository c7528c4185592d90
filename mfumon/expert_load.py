"""MoE expert load: tokens per expert per layer from the routers' own top-k, counted on the device."""

from __future__ import annotations

from torch import nn

from mfumon.errors import FaultLog
from mfumon.ledger import Source

__all__ = ["expert_load_source"]


def expert_load_source(model: nn.Module, faults: FaultLog) -> Source | None:
    """A source counting `model`'s expert load, None for a dense model (filled in by issue 11's point 7)."""
    return None
