"""`cvxdist data fetch NAME`: install or extract a dataset that a Debian package ships."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="fetch a dataset from its Debian package (apt as root, else into a user cache)",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = sub.add_parser(
        "fetch",
        help="make a packaged dataset readable (fashion_mnist)",
        description="As root: apt-get update, then apt-get install -y the package. Otherwise, "
        "or with --user: apt-get download and dpkg-deb -x into the user cache "
        "($CVXDIST_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/cvxdist). Does nothing when "
        "the dataset is already there. Prints one JSON line: dataset, folder, how.",
    )
    fetch.add_argument("name", help="dataset name, e.g. fashion_mnist")
    fetch.add_argument(
        "--user", action="store_true", help="extract into the user cache even as root"
    )
    fetch.add_argument("--quiet", action="store_true", help="print only the JSON line")
    fetch.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    import json
    import sys

    from cvxdist.fetch import fetch_dataset

    def log(message: str) -> None:
        if not args.quiet:
            print(f"cvxdist data fetch: {message}", file=sys.stderr, flush=True)

    folder, how = fetch_dataset(args.name, user=args.user, log=log)
    print(json.dumps({"dataset": args.name, "folder": str(folder), "how": how}))
    return 0
