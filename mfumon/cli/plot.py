"""`mfumon plot`: a run's metrics over optimizer steps as a picture, several runs overlaid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mfumon.plotting import choose_metrics, draw, load_runs, save

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register `plot` on an argparse subparsers object (from `parser.add_subparsers()`)."""
    parser = subparsers.add_parser(
        "plot",
        help="draw a run's MFU, TFLOP/s, tokens/s and step time over steps (needs mfumon[plot])",
        description="Draw the metrics of one or more runs (the .jsonl files the monitor wrote) over "
        "optimizer steps, one chart per metric, the runs overlaid; warm-up and missing windows shaded, "
        "each run's peak and its dtype in the title.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="run files written by the monitor")
    parser.add_argument("-o", "--output", help="picture to write (.png, .svg, .pdf); default: RUN.png")
    parser.add_argument(
        "--metric",
        help="comma-separated keys, e.g. mfu,tokens_per_s (default: mfu, tflops_per_device, "
        "tokens_per_s, step_time_ms, those the runs logged)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Read the runs, draw them, write the picture and print its path; returns the exit code."""
    runs = load_runs(args.runs)
    for note in dict.fromkeys(note for r in runs for note in r.notes):
        print(f"mfumon plot: note: {note}", file=sys.stderr)
    keys = choose_metrics(runs, args.metric)
    output = Path(args.output) if args.output else Path(args.runs[0]).with_suffix(".png")
    print(save(draw(runs, keys), output))
    return 0
