"""`cvxdist evaluate DIR`: re-evaluate a saved distilled student on a test split."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a distilled student folder (accuracy, agreement, size, latency)",
    )
    parser.add_argument("student", type=Path, help="folder written by `cvxdist distill`")
    parser.add_argument(
        "--teacher",
        default=None,
        metavar="PATH_OR_NAME",
        help="the teacher folder or shipped name (default: the one the run recorded); its "
        "checkpoint must be the one the run was distilled from (SHA-256)",
    )
    parser.add_argument("--dataset", default=None, help="dataset (default: the teacher's)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cvxdist.distill.runner import run_evaluate

    return run_evaluate(args)
