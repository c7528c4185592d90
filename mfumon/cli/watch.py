"""`mfumon watch RUN.jsonl`: follow a run file being written and redraw a compact view each window.

Each poll costs one `stat` of the file (and one of its summary) while nothing is written; new
bytes are read from where the last read ended, and a line is used once its newline arrives. A file
truncated or replaced at the same path (a new run, log rotation) starts the view over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from mfumon import metrics as K
from mfumon.comparison import GOODPUT, format_value
from mfumon.errors import ConfigError
from mfumon.runlog import PREFIX, RunLogError, read_run

__all__ = ["Tail", "View", "add_parser", "run", "sparkline"]

BLOCKS = "▁▂▃▄▅▆▇█"
CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen


def add_parser(subparsers: Any) -> None:
    """Register `watch` on an argparse subparsers object (from `parser.add_subparsers()`)."""
    parser = subparsers.add_parser(
        "watch",
        help="follow a run's JSONL as it is written: MFU, a sparkline, tokens/s, step time",
        description="Follow a run file the monitor is writing and redraw a compact view at each new "
        "window, until Ctrl-C. A file that does not exist yet is waited for; --once prints the current "
        "state and exits (2 when the file is missing, empty or not mfumon JSONL).",
    )
    parser.add_argument("path", help="the run's JSONL (e.g. runs/<run>.jsonl)")
    parser.add_argument("--once", action="store_true", help="print the current state once and exit")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default 0.5)")
    parser.add_argument("--width", type=int, default=48, help="sparkline width in characters (default 48)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Print the view once (--once) or follow the file until Ctrl-C; 0 then (errors raise MfumonError)."""
    out = out or sys.stdout
    if not (args.interval > 0) or args.width < 4:
        raise ConfigError(
            f"--interval must be > 0 s and --width >= 4, got {args.interval!r} and {args.width!r}"
        )
    if args.once:
        log = read_run(args.path)
        for note in log.notes:
            print(f"mfumon watch: note: {note}", file=sys.stderr)
        view = View(Path(args.path))
        view.add(log.records)
        print(view.render(args.width), file=out, flush=True)
        return 0
    try:
        follow(Path(args.path), interval=args.interval, width=args.width, out=out)
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends
        return 0
    return 0


def follow(path: Path, *, interval: float, width: int, out: TextIO) -> None:
    """Poll `path` every `interval` s, drawing the view when a window arrives, until interrupted."""
    tail, view = Tail(path), View(path)
    try:
        _follow(tail, view, interval=interval, width=width, out=out)
    finally:
        tail.close()


def _follow(tail: Tail, view: View, *, interval: float, width: int, out: TextIO) -> None:
    path, tty = tail.path, out.isatty()
    waiting: str | None = None
    while True:
        lines, event = tail.poll()
        if event in ("truncated", "replaced"):
            view = View(path)
            print(f"mfumon watch: {path} was {event}: reading it from the start", file=out, flush=True)
        fresh = view.add(tail.records(lines)) if lines else 0
        closed = view.check_closed()
        if fresh or closed:
            print((CLEAR if tty else "") + view.render(width) + ("" if tty else "\n"), file=out, flush=True)
            waiting = None
        elif not view.records and waiting != (say := "file" if event == "missing" else "window"):
            waiting = say
            what = "to appear" if say == "file" else "to log its first window"
            print(f"mfumon watch: waiting for {path} {what} (Ctrl-C to stop)", file=out, flush=True)
        time.sleep(interval)


class Tail:
    """New whole lines of a file since the last poll; only the bytes appended since are read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._ident: tuple[int, int] | None = None  # (device, inode) of the open file
        self.offset = 0  # bytes read so far
        self._partial = b""  # the start of a line whose newline has not arrived
        self.line_number = 0  # whole lines handed out, for error messages

    def poll(self) -> tuple[list[bytes], str | None]:
        """(new whole lines, event): event is "missing", "truncated", "replaced" or None."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return [], "missing"
        except OSError as exc:
            raise RunLogError(f"{self.path}: cannot be read ({type(exc).__name__}: {exc})") from None
        event = None
        if self._file is not None and (stat.st_dev, stat.st_ino) != self._ident:
            self._file.close()  # another file at the path: a new run, read from its start
            self._file, event, self.line_number = None, "replaced", 0
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - kept open between polls
            except OSError as exc:
                raise RunLogError(f"{self.path}: cannot be read ({type(exc).__name__}: {exc})") from None
            opened = os.fstat(self._file.fileno())
            self._ident, self.offset, self._partial = (opened.st_dev, opened.st_ino), 0, b""
        elif stat.st_size < self.offset:
            event, self.offset, self._partial, self.line_number = "truncated", 0, b"", 0
        return (self._read() if stat.st_size > self.offset else []), event

    def close(self) -> None:
        """Close the file kept open between polls."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read(self) -> list[bytes]:
        assert self._file is not None
        self._file.seek(self.offset)
        data = self._file.read()
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return lines

    def records(self, lines: list[bytes]) -> list[dict[str, Any]]:
        """Parse whole lines as run records; RunLogError (one line) for one that is not mfumon JSONL."""
        out = []
        for line in lines:
            self.line_number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise RunLogError(
                    f"{self.path}: line {self.line_number} is not JSON: not an mfumon JSONL file"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise RunLogError(
                    f"{self.path}: line {self.line_number} has no integer 'step': not an mfumon JSONL file"
                )
            out.append(record)
        return out


@dataclass
class View:
    """What the watch shows: the run's facts, the latest window, MFU (or tokens/s) over the windows.

    A window that carries run facts after others starts the view over: the monitor appends a new
    run to an existing file of the same name, and the view shows the latest run.
    """

    path: Path
    run: dict[str, Any] = field(default_factory=dict)
    latest: dict[str, Any] = field(default_factory=dict)
    records: int = 0
    trend: list[float] = field(default_factory=list)  # MFU per window (tokens/s where no peak)
    trend_key: str | None = None
    closed: bool = False

    def add(self, records: list[dict[str, Any]]) -> int:
        """Take new windows in; returns how many. RunLogError when the first has no mfumon metric."""
        for record in records:
            if self.records and isinstance(record.get("run"), dict):  # another run appended to the file
                self.run, self.latest, self.records, self.trend, self.trend_key = {}, {}, 0, [], None
                self.closed = False
            if not self.records and not any(k.startswith(PREFIX) for k in record):
                raise RunLogError(
                    f"{self.path}: no 'mfumon/...' metric in its first line: not an mfumon JSONL file"
                )
            if not self.run and isinstance(record.get("run"), dict):
                self.run = record["run"]
            self.records += 1
            self.latest = record
            if self.trend_key is None:
                self.trend_key = K.MFU if K.MFU in record else K.TOKENS_PER_S
            value = record.get(self.trend_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.trend.append(float(value))
        return len(records)

    def check_closed(self) -> bool:
        """True once, when the run's summary.json appears after its last window (the run closed)."""
        if self.closed or not self.records:
            return False
        try:
            mtime = self.path.with_suffix(".summary.json").stat().st_mtime
        except OSError:
            return False
        self.closed = mtime + 1.0 >= float(self.latest.get("time", 0.0))  # not a previous run's summary
        return self.closed

    def render(self, width: int) -> str:
        """The compact view, a few lines."""
        r, w = self.run, self.latest
        facts = [str(r.get("device") or w.get("device") or "device unknown")]
        peak = r.get("peak_tflops") or w.get(K.PEAK_TFLOPS)
        dtype = r.get("peak_dtype") or w.get("peak_dtype")
        facts.append(f"peak {peak:g} TFLOP/s {dtype or ''}".rstrip() if peak else "no peak known: no MFU")
        if r.get("world_size"):
            facts.append(f"{r['world_size']} rank{'s' * (r['world_size'] != 1)}")
        lines = [f"{self.path}  {' · '.join(facts)}"]
        status = "  (run closed)" if self.closed else ""
        head = f"step {w.get('step', 0):,}  window {self.records}"
        lines.append(f"{head}  MFU {_fmt('mfu', w.get(K.MFU))}  avg {_fmt('mfu', w.get(K.MFU_AVG))}{status}")
        name = "MFU" if self.trend_key == K.MFU else "tokens/s"
        shown = self.trend[-width:] if len(self.trend) > width else self.trend
        span = ""
        if shown:
            low, high = min(shown), max(shown)
            kind = "mfu" if self.trend_key == K.MFU else "tokens_per_s"
            span = f"  {_fmt(kind, low)} .. {_fmt(kind, high)}, last {len(shown)} windows"
        lines.append(f"{name:<8} {sparkline(shown)}{span}")
        lines.append(
            f"tokens/s {_fmt('tokens_per_s', w.get(K.TOKENS_PER_S))}  "
            f"step time {_fmt('step_time_ms', w.get(K.STEP_TIME_MS), ' ms')}  "
            f"TFLOP/s per device {_fmt('tflops_per_device', w.get(K.TFLOPS_PER_DEVICE))}  "
            f"goodput {_fmt('goodput', w.get(GOODPUT))}"
        )
        return "\n".join(lines)


def sparkline(values: list[float]) -> str:
    """One unicode block per value, scaled from the lowest (▁) to the highest (█); "-" when empty."""
    if not values:
        return "-"
    low, high = min(values), max(values)
    if high - low <= 1e-12 * max(abs(high), 1.0):
        return BLOCKS[len(BLOCKS) // 2] * len(values)  # flat: the middle block
    top = len(BLOCKS) - 1
    return "".join(BLOCKS[round((v - low) / (high - low) * top)] for v in values)


def _fmt(name: str, value: Any, unit: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return format_value("mfu_avg" if name == "mfu" else name, float(value)) + unit
