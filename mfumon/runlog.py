"""Reading a run back: the JSONL file the monitor writes, for `mfumon plot/report/compare/watch`.

A run file has one JSON object per log window, `{"step", "time", "peak_dtype", "device",
<metric keys>}`; its first line also carries `"run"`, the run's facts (see `JsonlLogger`). The
whole-run summary sits beside it in `<stem>.summary.json` once the run closed. A file still being
written, or cut off by a crash mid-write, is read up to its last whole line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfumon.errors import MfumonError

__all__ = ["RunLog", "RunLogError", "is_number", "read_run"]

PREFIX = "mfumon/"


class RunLogError(MfumonError):
    """A run file that cannot be read: missing, empty, or not mfumon's JSONL. The message is one line."""


@dataclass
class RunLog:
    """One run read back from its JSONL file."""

    path: Path
    records: list[dict[str, Any]]  # one per logged window, in file order
    run: dict[str, Any] = field(default_factory=dict)  # facts from the first line ({} for 0.1 files)
    summary: dict[str, Any] | None = None  # <stem>.summary.json, once the run closed
    notes: list[str] = field(default_factory=list)  # what was skipped, said once by the commands
    _columns: dict[str, tuple[list[int], list[float]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def label(self) -> str:
        """The run's name: its file name without the extension."""
        return self.path.stem

    def columns(self) -> dict[str, tuple[list[int], list[float]]]:
        """Every metric key's (steps, values) over the windows that have it, first-seen key order.

        Read in one pass over the windows and kept: `keys()` and `series()` are views of it.
        """
        if self._columns is None:
            out: dict[str, tuple[list[int], list[float]]] = {}
            for record in self.records:
                step = record["step"]
                for key, value in record.items():
                    if key.startswith(PREFIX) and is_number(value):
                        steps, values = out.setdefault(key, ([], []))
                        steps.append(step)
                        values.append(float(value))
            self._columns = out
        return self._columns

    def keys(self) -> list[str]:
        """Metric keys present in at least one window (`mfumon/...`), in first-seen order."""
        return list(self.columns())

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric key over the windows that have it."""
        key = key if key.startswith(PREFIX) else PREFIX + key
        steps, values = self.columns().get(key, ([], []))
        return list(steps), list(values)

    def latest(self, key: str) -> float | None:
        """The last window's value of `key`, None when no window has it."""
        _, values = self.series(key)
        return values[-1] if values else None


def read_run(path: str | Path) -> RunLog:
    """Read a run file; RunLogError (one clear line) when it is missing, empty or not mfumon JSONL."""
    path = Path(path)
    if not path.is_file():
        raise RunLogError(f"{path}: no such file (pass the .jsonl the monitor wrote, e.g. runs/<run>.jsonl)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunLogError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    lines = text.splitlines()
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):  # cut off mid-write (a crash, a live run)
                notes.append(f"{path}: skipped its last line, cut off mid-write")
                continue
            raise RunLogError(f"{path}: line {number} is not JSON: not an mfumon JSONL file") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise RunLogError(f"{path}: line {number} has no integer 'step': not an mfumon JSONL file")
        records.append(record)
    if not records:
        raise RunLogError(f"{path}: no logged window yet (an empty file, or a run before its first log)")
    if not any(k.startswith(PREFIX) for r in records for k in r):
        raise RunLogError(f"{path}: no 'mfumon/...' metric in any line: not an mfumon JSONL file")
    run = next((r["run"] for r in records if isinstance(r.get("run"), dict)), {})
    return RunLog(path=path, records=records, run=run, summary=_summary(path), notes=notes)


def _summary(path: Path) -> dict[str, Any] | None:
    target = path.with_suffix(".summary.json")
    try:
        summary = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def is_number(value: Any) -> bool:
    """Whether a value read from a run file is a finite number (not a bool, a string, None or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
