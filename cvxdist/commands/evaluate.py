"""`cvxdist evaluate DIR`: re-evaluate a saved distilled student on a test split."""

from __future__ import annotations

import argparse
from pathlib import Path

from cvxdist.commands import add_run_teacher_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a distilled student folder (accuracy, agreement, size, latency)",
    )
    parser.add_argument("student", type=Path, help="folder written by `cvxdist distill`")
    add_run_teacher_argument(parser)
    parser.add_argument("--dataset", default=None, help="dataset (default: the teacher's)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cvxdist.distill.runner import run_evaluate

    return run_evaluate(args)
