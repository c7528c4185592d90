"""Weights & Biases: metrics to the active run (or a new one), run facts to its config and summary."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mfumon.errors import MissingDependencyError
from mfumon.loggers.base import Logger
from mfumon.metrics import METRIC_KEYS

__all__ = ["PROFILE_COLUMNS", "STEP_KEY", "WandbLogger"]

STEP_KEY = "mfumon/step"  # the x-axis of the mfumon/* charts: optimizer steps
PROFILE_COLUMNS = (  # the columns of the mfumon/profile table, as `mfumon.profiling.ProfileRow` names them
    "name",
    "seconds",
    "flops",
    "bytes",
    "tflops",
    "intensity",
    "ceiling_tflops",
    "fraction",
    "time_lost",
)
_RUN_FACTS = (
    "device",
    "peak_dtype",
    "peak_tflops",
    "peak_source",
    "peak_mix",
    "world_size",
    "seq_len",
    "flops_per_token",
)


def has_wandb_credentials() -> bool:
    """True when an API key is in WANDB_API_KEY or in the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return host is not None and netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(Logger):
    """Logs each window to W&B, against `mfumon/step`.

    Uses the active `wandb.run` when there is one (and leaves it open at close); otherwise starts
    a run named `run_name` in project WANDB_PROJECT (default "mfumon") under `log_dir` (unless
    WANDB_DIR is set), offline when no API key is found and WANDB_MODE is not set, and finishes
    it at close. Device, dtype and peak go to the run config as `mfumon/<fact>`; the whole-run
    metrics (with `mfumon/mfu_avg`) to the run summary.
    """

    def __init__(self, *, run_name: str, log_dir: str | Path = "runs", project: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            raise MissingDependencyError(
                "the 'wandb' logger needs wandb: pip install 'mfumon[wandb]'"
            ) from None
        active = wandb.run
        self._owned = active is None
        if active is None:
            run_dir = Path(os.environ.get("WANDB_DIR") or log_dir)  # read now: wandb caches its settings
            run_dir.mkdir(parents=True, exist_ok=True)
            options: dict[str, Any] = {
                "project": project or os.environ.get("WANDB_PROJECT", "mfumon"),
                "name": run_name,
                "dir": str(run_dir),
            }
            if "WANDB_MODE" not in os.environ and not has_wandb_credentials():
                options["mode"] = "offline"  # no key: keep the run on disk (`wandb sync` uploads it)
            active = wandb.init(**options)
        self.run = active
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("mfumon/*", step_metric=STEP_KEY)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        # A run we own is ours to step; on the user's run, join their next commit instead.
        data = {**metrics, STEP_KEY: step}
        if self._owned:
            self.run.log(data, step=step, commit=True)
        else:
            self.run.log(data, commit=False)

    def log_profile(self, profile: Any, step: int) -> None:
        """The profile's rows as a wandb.Table, `mfumon/profile`, at its step."""
        import wandb

        columns = list(PROFILE_COLUMNS)
        rows = [[getattr(r, c) for c in columns] for r in profile.sorted_rows()]
        # It joins the next committed row, whatever that row's step (a pipelined exchange sends a
        # window one log late, and W&B drops rows whose step goes back); its own step rides with it.
        data = {"mfumon/profile": wandb.Table(columns=columns, data=rows), "mfumon/profile_step": step}
        self.run.log(data, commit=False)

    def log_run_info(self, info: Mapping[str, Any]) -> None:
        facts = {f"mfumon/{k}": info[k] for k in _RUN_FACTS if k in info}
        self.run.config.update(facts, allow_val_change=True)  # type: ignore[no-untyped-call]
        for key, value in facts.items():
            self.run.summary[key] = value

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        if not summary.get("steps"):
            return  # no timed step after warm-up: leave the per-window values
        whole_run = {k: v for k, v in summary.items() if k in METRIC_KEYS}  # no MFU keys without a peak
        for key, value in whole_run.items():
            self.run.summary[key] = value

    def close(self) -> None:
        if self._owned:
            self.run.finish()
