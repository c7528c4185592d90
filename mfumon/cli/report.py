"""`mfumon report RUN.jsonl -o report.html`: one self-contained HTML page of a run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mfumon.reporting import write_report
from mfumon.runlog import read_run

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register `report` on an argparse subparsers object (from `parser.add_subparsers()`)."""
    parser = subparsers.add_parser(
        "report",
        help="write one self-contained HTML page of a run (facts, summary, charts, MFU waterfall)",
        description="Read the JSONL the monitor wrote and write one HTML file that opens with no network: "
        "the run's facts, the whole-run summary, charts over the steps, the time ledger and the latest step "
        "profile where the run has them, and the MFU waterfall.",
    )
    parser.add_argument("run_file", metavar="RUN.jsonl", help="the JSONL file the monitor wrote")
    parser.add_argument("-o", "--output", default=None, help="the HTML file to write (default: RUN.html)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report; returns 0 (bad input raises a MfumonError, which the CLI turns into exit 2)."""
    run_log = read_run(args.run_file)
    for note in run_log.notes:
        print(f"mfumon report: note: {note}", file=sys.stderr)
    output = args.output or str(args.run_file).removesuffix(".jsonl") + ".html"
    path = write_report(run_log, output)
    print(f"mfumon report: wrote {path}")
    return 0
