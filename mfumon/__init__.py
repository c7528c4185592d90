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
from mfumon.plotting import plot

__version__ = "0.1.0"

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
    "count_params",
    "flop_breakdown",
    "flops_per_token",
    "measure_flops",
    "monitor",
    "peak_flops",
    "plot",
    "register_moe",
]
