"""One JSON object per log in a file, flushed at every write."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mfumon.loggers.base import Logger

__all__ = ["JsonlLogger"]


class JsonlLogger(Logger):
    """Appends `{"step", "time", "peak_dtype", "device", <metric keys>, <details>}` per log to `path`.

    Details are the window's structured facts (`Logger.log_details`), e.g. `expert_load_layers`.

    The first line also carries `"run"`: the run's facts (device, peak, FLOPs per token and by
    component, parameter counts, warm-up, ...), so `mfumon plot/report/compare` need only the file.

    The whole-run summary goes to `<path stem>.summary.json` beside it at close. Every line is
    flushed when written, so a run that crashes keeps all lines written before the crash.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._extra: dict[str, Any] = {}
        self._run: dict[str, Any] | None = None  # run facts, written once with the first line
        self._details: dict[str, Any] = {}  # the next line's structured facts

    def log_run_info(self, info: Mapping[str, Any]) -> None:
        self._extra = {"peak_dtype": info.get("peak_dtype"), "device": info.get("device")}
        if info.get("peak_mix"):  # FP8 beside bf16: dtype -> share of model FLOPs
            self._extra["peak_mix"] = info["peak_mix"]
        self._run = dict(info)

    def log_details(self, details: Mapping[str, Any], step: int) -> None:
        self._details = {"step": step, **details}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(), **self._extra, **metrics}
        details, self._details = self._details, {}
        if details.pop("step", None) == step:  # facts of this same window: they ride on its line
            record.update({k: v for k, v in details.items() if k not in record})
        if self._run is not None:  # the run's facts ride on its first line, so the file stands alone
            record["run"], self._run = self._run, None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_profile(self, profile: Any, step: int) -> None:
        """One line: `{"step", "time", "profile": {"seconds", "rows", "peak_tflops", "bandwidth_gbs"}}`."""
        self._file.write(json.dumps({"step": step, "time": time.time(), "profile": profile.as_dict()}) + "\n")
        self._file.flush()

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        target = self.path.with_suffix(".summary.json")
        target.write_text(json.dumps(dict(summary), indent=2) + "\n", encoding="utf-8")

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
