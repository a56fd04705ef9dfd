"""The `cvxdist` command line.

Each sub-command lives in `cvxdist/commands/<name>.py` and exposes
`register(subparsers) -> None`, adding a parser whose `func(args) -> int` runs it. Command
modules import only argparse at module level, so `cvxdist --help` stays fast; the heavy
imports happen inside `func`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cvxdist.errors import UserError

# Order is the order shown by --help.
COMMAND_MODULES = ("solve", "demo", "distill", "evaluate", "teacher", "data", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvxdist",
        description="Compress a trained network by convex distillation of its blocks.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cvxdist.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"cvxdist.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from cvxdist import __version__

    return f"cvxdist {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"cvxdist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cvxdist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
