"""The `cvxdist` command line.

Each sub-command lives in `cvxdist/commands/<name>.py` and exposes
`register(subparsers) -> None`, adding a parser whose `func(args) -> int` runs it. Command
modules import only argparse at module level, so `cvxdist --help` stays fast; the heavy
imports happen inside `func`.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from cvxdist.errors import UserError

# Order is the order shown by --help.
COMMAND_MODULES = ("solve", "demo", "distill", "evaluate", "export", "teacher", "data", "bench")

#: Errors of the environment while writing the output (disk full, file too large, read-only
#: file system, permissions): reported in one line like bad input, not as a traceback.
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (``PROG: error: ...``), status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (one line), --help, --version
        return int(exit_.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"cvxdist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"cvxdist {args.command}: error: cannot write{where}: {err.strerror}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(f"cvxdist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
