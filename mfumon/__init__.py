"""mfumon: live MFU, HFU, TFLOP/s per device, tokens/s and step time for transformer training.

Importing mfumon imports no framework, and not even torch until a name that needs it is used;
integrations live in `mfumon.integrations.lightning` and `mfumon.integrations.transformers`.
"""

from __future__ import annotations

from mfumon.errors import ConfigError, ConfigTypeError, MfumonError, MfumonWarning, MissingDependencyError

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first use (PEP 562): `import mfumon` stays
# light, so the run-file commands (plot, report, compare, watch) never import torch.
_LAZY = {
    "AttentionShape": "mfumon._structure",
    "CONVENTIONS": "mfumon.flops",
    "FlopBreakdown": "mfumon.flops",
    "flop_breakdown": "mfumon.flops",
    "flops_per_token": "mfumon.flops",
    "peak_flops": "mfumon.hardware",
    "Logger": "mfumon.loggers",
    "measure_flops": "mfumon.measure",
    "METRIC_KEYS": "mfumon.metrics",
    "Monitor": "mfumon.monitoring",
    "monitor": "mfumon.monitoring",
    "ParamCounts": "mfumon.params",
    "count_params": "mfumon.params",
    "register_moe": "mfumon.params",
    "plot": "mfumon.plotting",
    "StepProfile": "mfumon.profiling",
    "profile_step": "mfumon.profiling",
    "compare": "mfumon.comparison",
    "report": "mfumon.reporting",
}


def __getattr__(name: str) -> object:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later lookups are plain attribute reads
        return value
    try:  # a submodule not imported yet (mfumon.hardware, ...), as an eager package would have it
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'mfumon' has no attribute {name!r}") from None


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
    "StepProfile",
    "compare",
    "count_params",
    "flop_breakdown",
    "flops_per_token",
    "measure_flops",
    "monitor",
    "peak_flops",
    "plot",
    "profile_step",
    "register_moe",
    "report",
]
