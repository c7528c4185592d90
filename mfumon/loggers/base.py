"""The interface every mfumon logger implements: `log` and `close`, and a few more; all optional."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Logger"]


class Logger:
    """Base class of mfumon loggers; every method is optional and does nothing by default.

    `log` receives the metric dict of one window (keys from `mfumon.metrics.METRIC_KEYS`) and the
    optimizer step it ends at. `log_run_info` is called once, at the first log, with facts about
    the run (device, dtype, peak, parameter counts). `log_summary` receives `Monitor.summary()`
    at close. Exceptions raised by any method are caught by the monitor, reported once, and the
    logger is switched off.
    """

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write the metrics of one window ending at optimizer step `step`."""

    def log_details(self, details: Mapping[str, Any], step: int) -> None:
        """Structured facts of the window ending at `step` that are no scalar metric (per-layer expert
        loads, throttle reasons, ...); called just before `log` for the same step (default: ignore)."""

    def log_profile(self, profile: Any, step: int) -> None:
        """Record one step's profile (a `mfumon.profiling.StepProfile`) at step `step` (default: ignore)."""

    def log_warmup(self, metrics: Mapping[str, float], step: int, warmup: int) -> None:
        """Called instead of `log` for windows made only of warm-up steps (default: ignore them)."""

    def log_run_info(self, info: Mapping[str, Any]) -> None:
        """Record facts about the run (called once, at the first log)."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Record the whole-run summary (called once, at close)."""

    def close(self) -> None:
        """Flush and release resources."""
