"""`mfumon compare BASE.jsonl NEW.jsonl`: two runs side by side, and a CI gate on one metric."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mfumon.comparison import METRICS, Comparison, compare, format_change, format_value

__all__ = ["EXIT_OK", "EXIT_REGRESSED", "add_parser", "run"]

EXIT_OK = 0
EXIT_REGRESSED = 1  # NEW worse than BASE by more than the tolerance on the gate's metric
# Bad input (a missing, empty or foreign file, no metric in common, a bad option) exits 2, from main().


def add_parser(subparsers: Any) -> None:
    """Register `compare` on an argparse subparsers object (from `parser.add_subparsers()`)."""
    parser = subparsers.add_parser(
        "compare",
        help="compare two runs' whole-run MFU, TFLOP/s, tokens/s, step time; exit 1 on a regression",
        description="Print two runs side by side (whole-run values, from <stem>.summary.json when the run "
        "closed, else added up from its windows) with relative changes. Exit 1 when NEW is worse than BASE "
        "by more than --tolerance on --metric, 0 otherwise, 2 on bad input.",
    )
    parser.add_argument("base", help="the reference run's JSONL (e.g. from the main branch)")
    parser.add_argument("new", help="the run to check against it")
    parser.add_argument(
        "--tolerance",
        default="0.03",
        help="largest relative loss that passes, a fraction (0.03) or a percentage (3%%); default 0.03",
    )
    parser.add_argument(
        "--metric",
        default="mfu_avg",
        help=f"the gate's metric: {', '.join(METRICS)} (default mfu_avg, the whole-run MFU; "
        "tokens_per_s where a run has no peak)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the comparison; EXIT_REGRESSED when NEW regressed, else EXIT_OK (bad input: MfumonError)."""
    result = compare(args.base, args.new, tolerance=args.tolerance, metric=args.metric)
    for side in (result.base, result.new):
        for note in side.run.notes:
            print(f"mfumon compare: note: {note}", file=sys.stderr)
    for warning in result.warnings:
        print(f"mfumon compare: warning: {warning}", file=sys.stderr)
    print(render(result))
    return EXIT_REGRESSED if result.regressed else EXIT_OK


def render(result: Comparison) -> str:
    """The side-by-side table and the gate's verdict, as printed."""
    lines = [
        f"base: {result.base.run.path}  (whole run from {result.base.source})",
        f"new:  {result.new.run.path}  (whole run from {result.new.source})",
        f"{'':<20} {'base':>14} {'new':>14} {'change':>9}",
    ]
    for row in result.rows:
        mark = "  <- gate" if row.gated else ""
        base, new = format_value(row.name, row.base), format_value(row.name, row.new)
        lines.append(f"{row.label:<20} {base:>14} {new:>14} {format_change(row.change):>9}{mark}")
    gate = result.gate
    better = "higher" if gate.higher_is_better else "lower"
    limit = f"the {result.tolerance * 100:.2f}% tolerance"
    if result.regressed:
        verdict = f"REGRESSED: worse by more than {limit}"
    elif gate.change is None:
        verdict = "passed: no relative change (base is 0)"
    else:
        verdict = f"passed: within {limit}"
    lines.append(f"gate: {gate.label} ({better} is better) {format_change(gate.change)}: {verdict}")
    return "\n".join(lines)
