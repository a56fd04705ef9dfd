"""Sub-commands of the `cvxdist` CLI (see `cvxdist.cli`), and their shared checks."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def check_output_file(path: Path, example: str) -> None:
    """Fail early (before any work) when the file ``path`` cannot be written: its folder must
    exist and be writable, and ``path`` must not be a folder (``example``: a file name to
    suggest)."""
    from cvxdist.errors import UserError

    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UserError(f"--out {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {path}: directory {parent} is not writable")
    if Path(path).is_dir():
        raise UserError(f"--out {path} is a directory; give a file name like {example}")


def add_run_teacher_argument(parser: argparse.ArgumentParser) -> None:
    """``--teacher`` of commands that read a run directory (`evaluate`, `export`)."""
    parser.add_argument(
        "--teacher",
        default=None,
        metavar="PATH_OR_NAME",
        help="the teacher folder or shipped name (default: the one the run recorded); its "
        "checkpoint must be the one the run was distilled from (SHA-256)",
    )
