"""``python -m benchmarks.solvers --out DIR [--quick]``: the solver benchmark without the CLI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.solvers.harness import run_benchmark
from benchmarks.solvers.report import markdown_report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.solvers")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    payload = run_benchmark(args.out, quick=args.quick)
    print(markdown_report(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
