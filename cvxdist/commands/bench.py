"""``cvxdist bench NAME``: run a benchmark from a source checkout.

The benchmark code lives in ``benchmarks/`` at the root of the repository, not in the installed
package, so these commands need the checkout the package was installed from (``pip install -e``).
Each benchmark is a module ``benchmarks.<name>`` that follows :class:`Benchmark`; it is imported
only when ``cvxdist bench NAME`` is parsed, so the other commands never load it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

#: name -> (module under benchmarks/, one-line help).
BENCHMARKS: dict[str, tuple[str, str]] = {
    "solvers": (
        "benchmarks.solvers",
        "time R-FISTA against pyscnn's R-FISTA to the same relative duality gap",
    ),
    "distill": ("benchmarks.distill", "convex distillation against Adam, KD and pruning (E1-E4)"),
}


@runtime_checkable
class Benchmark(Protocol):
    """What ``cvxdist bench`` expects of a benchmark module ``benchmarks.<name>``.

    The command gives every benchmark ``--out DIR`` (required), ``--quick``, ``--only NAME...``,
    ``--repeats N`` (checked to be ≥ 1) and ``--report-only``, then:

    - ``register(parser)`` adds the benchmark's own options to its ``argparse`` parser;
    - ``run(args) -> int`` validates the options (raising :class:`~cvxdist.errors.UserError`
      before writing anything), measures (or resumes), writes its results and report under
      ``args.out``, prints the report and returns the exit status;
    - ``report(out_dir) -> str`` (``--report-only``) computes nothing: it rewrites the report
      from the results already in ``out_dir`` and returns it (``UserError`` if there are none).
    """

    def register(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...

    def report(self, out_dir: Path) -> str: ...


#: The members of :class:`Benchmark` and how each is called, for the error messages.
INTERFACE = {"register": "register(parser)", "run": "run(args) -> int", "report": "report(out_dir)"}


def interface_problems(module: ModuleType) -> list[str]:
    """What ``module`` lacks of :class:`Benchmark` (empty when it follows it)."""
    problems = []
    for name, usage in INTERFACE.items():
        member = getattr(module, name, None)
        if not callable(member):
            problems.append(f"no {usage}")
            continue
        try:
            inspect.signature(member).bind(None)
        except TypeError:
            problems.append(f"{name}{inspect.signature(member)} is not callable as {usage}")
        except ValueError:  # no signature to inspect (a builtin): trust it
            pass
    return problems


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark (needs a source checkout)",
        description="Run a benchmark and write JSON and a markdown report to --out.",
    )
    parser.set_defaults(func=_usage(parser))
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", action=_BenchmarkChoice)
    for name, (_, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text + ".")
        p.add_argument("--out", type=Path, required=True, help="directory for the results")
        p.add_argument("--quick", action="store_true", help="small shapes only (for CI)")
        p.add_argument("--only", nargs="+", metavar="NAME", help="run only these (by name)")
        p.add_argument("--repeats", type=int, help="repeats or seeds (default per benchmark)")
        p.add_argument(
            "--report-only",
            action="store_true",
            help="compute nothing: rewrite the report from the results already in --out",
        )


class _BenchmarkChoice(argparse._SubParsersAction):
    """Sub-parsers whose benchmark module is imported, checked and asked for its options
    only when that benchmark is chosen on the command line."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        chosen = self._name_parser_map.get(values[0]) if values else None
        if chosen is not None and not hasattr(chosen, "_cvxdist_benchmark"):
            chosen._cvxdist_benchmark = True
            _attach(values[0], chosen)
        super().__call__(parser, namespace, values, option_string)


def _attach(name: str, parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` the options and the ``func`` of benchmark ``name``; a benchmark that
    cannot be loaded gets a ``func`` that raises the reason (exit status 2)."""
    from cvxdist.errors import UserError

    try:
        module = load_benchmark(name)
    except UserError as err:
        parser.set_defaults(func=_raise(err))
        return
    module.register(parser)
    parser.set_defaults(func=_runner(module))


def _runner(module: Benchmark) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from cvxdist.distill.io import check_output_dir
        from cvxdist.errors import UserError

        check_output_dir(args.out)
        if args.repeats is not None and args.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {args.repeats}")
        if args.report_only:
            print(module.report(args.out))
            return 0
        return int(module.run(args))

    return run


def _raise(err: Exception) -> Callable[[argparse.Namespace], int]:
    def fail(args: argparse.Namespace) -> int:
        raise err

    return fail


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
    """Import ``benchmarks.<name>`` from the source checkout and check it follows `Benchmark`.

    Raises:
        UserError: no checkout next to the package, no such benchmark, or a module that does
            not follow the interface (the message lists what it lacks).
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
    module_name = BENCHMARKS[name][0]
    module = importlib.import_module(module_name)
    problems = interface_problems(module)
    if problems:
        raise UserError(
            f"{module_name} does not follow the benchmark interface "
            f"(cvxdist.commands.bench.Benchmark): {'; '.join(problems)}"
        )
    return module
