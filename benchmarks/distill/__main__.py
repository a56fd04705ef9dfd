"""``python -m benchmarks.distill report DIR... [--to PATH] [--preamble FILE]``.

With no ``--to`` it rewrites each ``DIR/REPORT.md`` from the records of the grid stored in
``DIR``; with ``--to`` it writes one document holding every DIR's report (image links relative
to it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.distill.harness import combined_report, report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distill")
    sub = parser.add_subparsers(dest="command", required=True)
    rewrite = sub.add_parser("report", help="rewrite REPORT.md from DIR's records")
    rewrite.add_argument("dirs", type=Path, nargs="+")
    rewrite.add_argument("--to", type=Path, help="write one combined report here")
    rewrite.add_argument("--preamble", type=Path, help="markdown to put under the title")
    args = parser.parse_args(argv)
    if args.to is None:
        for directory in args.dirs:
            report(directory)
            print(f"wrote {directory / 'REPORT.md'}", file=sys.stderr)
        return 0
    preamble = args.preamble.read_text() if args.preamble else ""
    args.to.write_text(combined_report(args.dirs, args.to, preamble), encoding="utf-8")
    print(f"wrote {args.to}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
