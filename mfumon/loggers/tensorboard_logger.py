"""TensorBoard: one scalar per metric key per window, run facts and the summary as text."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfumon.errors import MissingDependencyError
from mfumon.loggers.base import Logger

__all__ = ["TensorBoardLogger"]


def _table(facts: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    return f"| fact | value |\n|---|---|\n{rows}"


class TensorBoardLogger(Logger):
    """Writes event files under `path`: scalars `mfumon/<key>` at each window's optimizer step.

    Run facts (device, dtype, peak) go to the text tab as `mfumon/run_info`, the whole-run
    summary as `mfumon/summary`. Events are flushed at every window.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependencyError(
                "the 'tensorboard' logger needs tensorboard: pip install 'mfumon[tensorboard]'"
            ) from None
        self.path = Path(path)
        self._writer = SummaryWriter(log_dir=str(self.path))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()  # once per window

    def log_run_info(self, info: Mapping[str, Any]) -> None:
        self._writer.add_text("mfumon/run_info", _table(info), global_step=0)

    def log_profile(self, profile: Any, step: int) -> None:
        """The profile's table as text, `mfumon/profile`, at its step."""
        self._writer.add_text("mfumon/profile", "```\n" + profile.table() + "\n```", global_step=step)
        self._writer.flush()

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self._writer.add_text("mfumon/summary", _table(summary), global_step=int(summary.get("last_step", 0)))

    def close(self) -> None:
        self._writer.close()
