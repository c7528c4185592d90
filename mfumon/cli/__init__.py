"""The `mfumon` command: `mfumon peak`, `mfumon estimate`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mfumon.cli import estimate, peak
from mfumon.cli import plot as plot_cli
from mfumon.errors import MfumonError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="mfumon", description="MFU, FLOPs and device peaks for transformer training."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    peak.add_parser(sub)
    estimate.add_parser(sub)
    plot_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for a usage or input error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except MfumonError as exc:
        print(f"mfumon: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
