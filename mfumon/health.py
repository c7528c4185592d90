"""Device health at log time, off the step path: NVML clocks, power, energy, throttling; memory."""

from __future__ import annotations

import torch

from mfumon.errors import FaultLog
from mfumon.ledger import Source

__all__ = ["device_sources"]


def device_sources(device: torch.device, faults: FaultLog) -> list[Source]:
    """The sources that can measure `device` here (none yet: filled in by issue 11's points 5 and 6)."""
    return []
