"""The `mfumon` command: `peak`, `estimate`, `plot`, `report`, `compare`, `watch`.

Each subcommand's module is imported only when it is the one asked for (all of them for
`mfumon --help`): the run-file commands read JSONL and never import torch, so they start at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mfumon.errors import MfumonError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {  # subcommand -> its module (each has add_parser(subparsers))
    "peak": "mfumon.cli.peak",
    "estimate": "mfumon.cli.estimate",
    "plot": "mfumon.cli.plot",
    "report": "mfumon.cli.report",
    "compare": "mfumon.cli.compare",
    "watch": "mfumon.cli.watch",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered (or only `only`, when it is one)."""
    parser = argparse.ArgumentParser(
        prog="mfumon", description="MFU, FLOPs and device peaks for transformer training."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if only is None or only == name:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for a usage or input error)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    first = args_in[0] if args_in else None
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(args_in)
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
