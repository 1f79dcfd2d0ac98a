"""The `samkit` command line: one module per subcommand, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from samkit.cli.common import UserError, user_errors

# subcommand -> module; each module defines add_parser(subparsers) and run(args) -> int
COMMANDS: dict[str, str] = {
    "convert": "samkit.cli.convert",
    "everything": "samkit.cli.everything",
    "segment": "samkit.cli.segment",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samkit",
        description="Segment Anything: official checkpoints, prompts, segment everything.",
        epilog="Run `samkit COMMAND --help` for the options and examples of each command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `samkit` and `python -m samkit`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except user_errors() as error:
        print(f"samkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"samkit {args.command}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from samkit import __version__

    return f"samkit {__version__}"


__all__ = ["COMMANDS", "UserError", "build_parser", "main"]
