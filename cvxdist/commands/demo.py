"""`cvxdist demo --out DIR`: the main job on a default that needs no download."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="distill the shipped Fashion-MNIST teacher's last stage; compare with Adam",
        description="Teacher vs convex student vs non-convex (Adam) student of the same size "
        "on the shipped Fashion-MNIST ResNet (digits when Fashion-MNIST is not installed).",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", default=None, help="default: the shipped FMNIST ResNet")
    parser.add_argument("--samples-per-class", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cvxdist.distill.runner import run_demo

    return run_demo(args)
