"""``cvxdist bench NAME``: run a benchmark from a source checkout.

The benchmark code lives in ``benchmarks/`` at the root of the repository, not in the installed
package, so these commands need the checkout the package was installed from (``pip install -e``).
Each sub-benchmark is a module ``benchmarks.<name>`` with
``run(out_dir, *, quick, only, repeats, ...) -> dict`` and ``markdown_report(payload) -> str``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

#: name -> (module under benchmarks/, one-line help). ``distill`` joins here later.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "solvers": (
        "benchmarks.solvers",
        "time R-FISTA against pyscnn's R-FISTA to the same relative duality gap",
    ),
    "distill": ("benchmarks.distill", "convex distillation against Adam, KD and pruning (E1-E4)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark (needs a source checkout)",
        description="Run a benchmark and write JSON and a markdown table to --out.",
    )
    parser.set_defaults(func=_usage(parser))
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (_, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text + ".")
        p.add_argument(
            "--out", type=Path, required=True, help="directory for the JSON and markdown"
        )
        p.add_argument(
            "--quick", action="store_true", help="small shapes only (about a minute; for CI)"
        )
        p.add_argument(
            "--only", nargs="+", metavar="PROBLEM", help="run only these problems (by name)"
        )
        p.add_argument("--repeats", type=int, help="steady-state repeats (default per problem)")
        if name == "solvers":
            p.add_argument(
                "--scnn-backend",
                choices=("numpy", "torch"),
                default="numpy",
                help="pyscnn's array backend (numpy is what pyscnn uses on CPU)",
            )
            p.add_argument(
                "--time-limit",
                type=float,
                help="seconds pyscnn may run per problem before it is declared not to reach "
                "the gap (default 5400, quick 120)",
            )
        if name == "distill":
            p.add_argument(
                "--report-only",
                action="store_true",
                help="compute nothing: report the points already recorded in --out",
            )
        p.set_defaults(func=run)


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        del args
        parser.print_help()
        return 2

    return show


def benchmarks_root() -> Path:
    """The repository root holding ``benchmarks/`` (the checkout cvxdist was installed from)."""
    import cvxdist

    return Path(cvxdist.__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks.<name>`` from the source checkout.

    Raises:
        UserError: no checkout next to the package, or no such benchmark.
    """
    from cvxdist.errors import UserError

    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    root = benchmarks_root()
    if not (root / "benchmarks" / "__init__.py").is_file():
        raise UserError(
            "cvxdist bench needs a source checkout: the benchmarks/ directory is not next to "
            f"the cvxdist package (looked in {root}); clone the repository and "
            "`pip install -e .` from it"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(BENCHMARKS[name][0])


def run(args: argparse.Namespace) -> int:
    from cvxdist.distill.io import check_output_dir
    from cvxdist.errors import UserError

    check_output_dir(args.out)
    module = load_benchmark(args.benchmark)
    if args.repeats is not None and args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    try:
        module.select_problems(args.quick, args.only)
    except ValueError as err:
        raise UserError(str(err)) from err
    options = {"quick": args.quick, "only": args.only, "repeats": args.repeats}
    if args.benchmark == "solvers":
        ok, why = module.scnn_available()
        if not ok:
            raise UserError(why)
        if args.time_limit is not None and not args.time_limit > 0:
            raise UserError(f"--time-limit must be positive, got {args.time_limit}")
        options.update(scnn_backend=args.scnn_backend, time_limit_s=args.time_limit)
    if getattr(args, "report_only", False):
        options["report_only"] = True
    payload = module.run(args.out, **options)
    print(module.markdown_report(payload))
    print(f"wrote {args.out / (args.benchmark + '.json')}", file=sys.stderr)
    return 0
