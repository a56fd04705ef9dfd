r"""R-FISTA (cvxdist) against pyscnn's R-FISTA, timed to the same relative duality gap.

Both tools solve the *identical* gated-ReLU problem with the ``one_vs_all`` regularizer (pyscnn's
``NeuronGL1``):

- the same rows ``X`` (unit-norm columns), targets ``Y`` and gate vectors ``G``; the gates are
  put in pyscnn's canonical order (sorted unique, non-zero activation patterns) beforehand, so
  pyscnn's own de-duplication keeps every gate in place; the benchmark checks that pyscnn's
  masks and gates equal ours;
- pyscnn's objective is :math:`\|r\|^2/(2Nc) + \lambda_s \sum_{k,i}\|W_{k,i}\|_2` (its
  ``Model.objective`` passes ``scaling = N`` and ``_scaling`` multiplies by ``c``), ours is
  :math:`\|r\|^2/(2N) + \lambda R(U)`; multiplying pyscnn's by ``c`` gives ours, so
  :math:`\lambda_s = \lambda / c` and :math:`F_{ours} = c\,F_{scnn}` (checked on every run);
- masks are computed once in float64 and shared: pyscnn builds them in float64 from the same
  float32-representable data, and the float32 cvxdist problem gets the same masks.

Quality is measured by the benchmark itself, never by either tool's own stopping rule: the
relative duality gap of the returned weights, computed in float64 with
:func:`cvxdist.problems.evaluate`. pyscnn's stopping rule (squared norm of the minimum-norm
subgradient ≤ tol) says little about the gap, so pyscnn is run with ``tol = 0`` and a callback
that evaluates the gap of its iterates (the callback's time is excluded) and stops it at the
first iterate whose gap is ≤ the target: pyscnn is timed with an *oracle* stopping rule, which
favours it. cvxdist stops on its own certificate (``tol`` a little below the target; the float64
gap of its output is checked and the solve repeated with a tighter ``tol`` if it missed).

Timing: float32 for both; the same number of threads (all usable cores) for XLA, OpenBLAS (which
pyscnn's default CPU backend, numpy through ``opt_einsum``, uses) and torch. cvxdist is timed
with compilation (first call for the shapes) and in steady state (median of later calls); one
iteration is compared with the two GEMMs it performs, jitted and timed in the same run: in the
feature-first order forward ``X @ W``, ``W (d, P·c)``, and adjoint ``Xᵀ @ Z``, ``Z (N, P·c)``; in
the gate-first order (see :mod:`cvxdist.operators`) ``M @ W``, ``W (P, d·c)``, and ``Mᵀ @ Z``,
``Z (N, d·c)``, with ``M`` the ``(N, P)`` float masks. Same flops either way.

Run: ``cvxdist bench solvers --out DIR`` (full) or ``--quick`` (one small problem, for CI).

Modules: :mod:`.instances` (problems, data, the float64 gap), :mod:`.ours` (cvxdist's runs),
:mod:`.pyscnn` (pyscnn's run), :mod:`.variants` (cvxdist's other solvers: working sets,
screening, Anderson, ADMM certifying every third iteration), :mod:`.harness` (one problem, the
run over the problems) and :mod:`.report`. This module is the benchmark interface of
``cvxdist bench`` (:class:`cvxdist.commands.bench.Benchmark`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.solvers.harness import run_benchmark, run_problem
from benchmarks.solvers.instances import (
    FULL_PROBLEMS,
    QUICK_PROBLEMS,
    GapEvaluator,
    ProblemSpec,
    make_instance,
    select_problems,
)
from benchmarks.solvers.pyscnn import run_pyscnn, scnn_available
from benchmarks.solvers.report import markdown_report

__all__ = [
    "FULL_PROBLEMS",
    "QUICK_PROBLEMS",
    "GapEvaluator",
    "ProblemSpec",
    "make_instance",
    "markdown_report",
    "register",
    "report",
    "run",
    "run_benchmark",
    "run_problem",
    "run_pyscnn",
    "select_problems",
]


def register(parser: argparse.ArgumentParser) -> None:
    """``cvxdist bench solvers`` options (``--only`` names problems, ``--repeats`` solves)."""
    parser.add_argument(
        "--scnn-backend",
        choices=("numpy", "torch"),
        default="numpy",
        help="pyscnn's array backend (numpy is what pyscnn uses on CPU)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        help="seconds pyscnn may run per problem before it is declared not to reach "
        "the gap (default 5400, quick 120)",
    )


def run(args: argparse.Namespace) -> int:
    """Measure the problems (finished ones are reused at the same commit); writes
    ``solvers.json`` and ``solvers.md`` under ``args.out`` and prints the table."""
    from cvxdist.errors import UserError

    try:
        select_problems(args.quick, args.only)
    except ValueError as err:
        raise UserError(str(err)) from err
    ok, why = scnn_available()
    if not ok:
        raise UserError(why)
    if args.time_limit is not None and not args.time_limit > 0:
        raise UserError(f"--time-limit must be positive, got {args.time_limit}")
    payload = run_benchmark(
        args.out,
        quick=args.quick,
        only=args.only,
        repeats=args.repeats,
        scnn_backend=args.scnn_backend,
        time_limit_s=args.time_limit,
    )
    print(markdown_report(payload))
    print(f"wrote {Path(args.out) / 'solvers.json'}", file=sys.stderr)
    return 0


def report(out_dir: Path) -> str:
    """Rewrite ``out_dir/solvers.md`` from ``out_dir/solvers.json`` (nothing measured)."""
    from cvxdist.errors import UserError

    path = Path(out_dir) / "solvers.json"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no solver benchmark results in {out_dir} (no solvers.json)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    text = markdown_report(payload)
    (Path(out_dir) / "solvers.md").write_text(text, encoding="utf-8")
    return text
