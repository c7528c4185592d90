"""mfumon: live MFU, HFU, TFLOP/s per device, tokens/s and step time for transformer training.

Importing mfumon imports torch and nothing of a training framework; integrations live in
`mfumon.integrations.lightning` and `mfumon.integrations.transformers`.
"""

from __future__ import annotations

from mfumon._structure import AttentionShape
from mfumon.errors import ConfigError, ConfigTypeError, MfumonError, MfumonWarning, MissingDependencyError
from mfumon.flops import CONVENTIONS, FlopBreakdown, flop_breakdown, flops_per_token
from mfumon.hardware import peak_flops
from mfumon.loggers import Logger
from mfumon.measure import measure_flops
from mfumon.metrics import METRIC_KEYS
from mfumon.monitor import Monitor, monitor
from mfumon.params import ParamCounts, count_params, register_moe

__version__ = "0.1.0"

# public name -> module, imported on first use: the run-file commands need no torch import of their own
_LAZY = {"compare": "mfumon.comparison", "report": "mfumon.reporting"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mfumon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CONVENTIONS",
    "METRIC_KEYS",
    "AttentionShape",
    "ConfigError",
    "ConfigTypeError",
    "FlopBreakdown",
    "Logger",
    "MfumonError",
    "MfumonWarning",
    "MissingDependencyError",
    "Monitor",
    "ParamCounts",
    "compare",
    "count_params",
    "flop_breakdown",
    "flops_per_token",
    "measure_flops",
    "monitor",
    "peak_flops",
    "register_moe",
    "report",
]
