"""What every solver shares: result codes, the solution type and the one bounded loop.

A solver is an :class:`IterativeSolver`: a pure ``init / step / terminate / postprocess``
quadruple over a NamedTuple state (optimistix style). :func:`iterate` runs any of them under
one ``lax.while_loop`` bounded by the static ``max_iters``; λ and ``tol`` are traced.
:func:`solve_compiled` is that loop compiled (once per solver, problem structure and
``max_iters``); every entry point of :mod:`cvxdist.solvers` and the phases call it.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array, lax

from cvxdist.duality import Evaluation, Problem
from cvxdist.prox import Regularizer


class RESULTS(eqx.Enumeration):
    """How a solve ended. The message says what to change."""

    successful = ""
    max_steps_reached = (
        "stopped at max_iters before the duality gap reached tol: raise max_iters, loosen "
        "tol, warm-start from a nearby λ, or try --solver admm"
    )
    nonfinite = (
        "the iterates became NaN/Inf: check the data scale (standardize X and Y) or use float64"
    )
    linesearch_failed = (
        "the line search could not find a decreasing step: the problem is badly scaled, or "
        "tol is below what this precision can certify (use float64 or a looser tol)"
    )
    precision_floor = (
        "tol is below the smallest relative duality gap that float32 arithmetic can certify "
        "(128 eps, about 1.5e-5; smaller float32 gaps are rounding noise), so the solve stopped "
        "at that floor: polish in float64 (solve(..., polish=True), the default), solve in "
        "float64 (--dtype float64), or use tol >= 1.5e-5"
    )


class Weights(NamedTuple):
    """Weights of the convex model: ``U (P, d, c)``, skip ``V (d, c)``, bias ``b (c,)``."""

    U: Array
    V: Array | None = None
    b: Array | None = None


class SolveStats(NamedTuple):
    """Per-solve statistics (arrays; batched along the leading axis under vmap)."""

    iterations: Array
    objective: Array  # F(U) in the 1/(2N) convention
    dual_objective: Array
    rel_gap: Array  # the certificate: (F - D) / F
    subgrad_norm_sq: Array  # scnn's criterion: squared norm of the min-norm subgradient
    lam: Array
    step: Array  # final step size (FISTA) or penalty ρ (ADMM)
    active_gates: Array  # gates with a non-zero block
    time_s: Array  # wall time of the whole call (filled on the host; NaN inside jit)
    screened: Array | int = 0  # gates removed by gap-safe screening (cvxdist.solvers.phases)
    working_set: Array | int = 0  # gates of the last working-set phase (0: no working sets)
    # GEMM work in units of one full-width iteration (one forward and one adjoint over all P
    # gates): what the phases' narrower solves and their tests cost altogether.
    iteration_equivalents: Array | float = 0.0


class Solution(eqx.Module):
    """What a solve returns: the weights, a result code and statistics."""

    weights: Weights
    result: RESULTS
    stats: SolveStats

    @property
    def U(self) -> Array:
        return self.weights.U

    @property
    def converged(self) -> Array:
        return self.result == RESULTS.successful

    @property
    def message(self) -> str:
        """Human-readable outcome (host only, unbatched)."""
        return RESULTS[self.result] or "converged: relative duality gap below tol"


class IterativeSolver(eqx.Module):
    """Interface of a solver run by :func:`iterate`. ``state`` must have an ``iteration``."""

    reg: eqx.AbstractVar[Regularizer]

    def init(self, problem: Problem, U0: Array, lam: Array) -> Any:
        raise NotImplementedError

    def step(self, problem: Problem, lam: Array, state: Any) -> Any:
        raise NotImplementedError

    def certificate(self, state: Any) -> tuple[Evaluation, Array]:
        """The evaluation (objective, gap) and min-norm subgradient at the current iterate."""
        raise NotImplementedError

    def failed(self, state: Any) -> tuple[Array, RESULTS]:
        """Whether the solver cannot continue, and why."""
        evaluation, _ = self.certificate(state)
        nonfinite = ~jnp.isfinite(evaluation.primal)
        return nonfinite, RESULTS.where(nonfinite, RESULTS.nonfinite, RESULTS.successful)

    def terminate(self, state: Any, tol: Array) -> tuple[Array, RESULTS]:
        evaluation, _ = self.certificate(state)
        failed, why = self.failed(state)
        converged = evaluation.rel_gap <= tol
        return failed | converged, RESULTS.where(failed, why, RESULTS.successful)

    def postprocess(self, problem: Problem, lam: Array, state: Any) -> Weights:
        raise NotImplementedError

    def stats_extra(self, state: Any) -> Array:
        """The solver's step parameter reported in the stats."""
        return jnp.full((), jnp.nan)

    def unprepared(self) -> IterativeSolver:
        """This solver without what it precomputed for one problem (ADMM's kernel factor), to
        solve another: a restriction to fewer gates (screening, working sets) or a float64
        copy (polishing)."""
        return self


def iterate(
    solver: IterativeSolver,
    problem: Problem,
    lam: Array,
    U0: Array,
    tol: Array,
    max_iters: int,
) -> Solution:
    """Run ``solver`` from ``U0`` until the relative duality gap is ≤ ``tol``.

    ``max_iters`` is static (a loop bound); ``lam`` and ``tol`` are traced scalars.
    """

    def keep_going(state: Any) -> Array:
        done, _ = solver.terminate(state, tol)
        return (~done) & (state.iteration < max_iters)

    state = solver.init(problem, U0, lam)
    state = lax.while_loop(keep_going, lambda s: solver.step(problem, lam, s), state)
    done, result = solver.terminate(state, tol)
    result = RESULTS.where(done, result, RESULTS.max_steps_reached)
    evaluation, subgrad_sq = solver.certificate(state)
    weights = solver.postprocess(problem, lam, state)
    active = jnp.sum(solver.reg.group_norms(weights.U) > 0)
    stats = SolveStats(
        iterations=state.iteration,
        objective=evaluation.primal,
        dual_objective=evaluation.dual,
        rel_gap=evaluation.rel_gap,
        subgrad_norm_sq=subgrad_sq,
        lam=lam,
        step=solver.stats_extra(state),
        active_gates=active,
        time_s=jnp.full((), jnp.nan, evaluation.primal.dtype),
        screened=jnp.zeros((), jnp.int32),
        working_set=jnp.zeros((), jnp.int32),
        iteration_equivalents=state.iteration.astype(evaluation.primal.dtype),
    )
    return Solution(weights, result, stats)


_trace_count = 0


def trace_count() -> int:
    """How many times the solve core has been traced (compiled) in this process."""
    return _trace_count


def count_trace() -> None:
    """Called by every compiled solve entry when it is traced (see :func:`trace_count`)."""
    global _trace_count
    _trace_count += 1


@eqx.filter_jit
def solve_compiled(
    solver: IterativeSolver,
    problem: Problem,
    lam: Array,
    U0: Array,
    tol: Array,
    max_iters: int | Array,
) -> Solution:
    """:func:`iterate` under ``jit``: λ, ``tol`` (and an array ``max_iters``) are traced."""
    count_trace()
    return iterate(solver, problem, lam, U0, tol, max_iters)


def split_unregularized(problem: Problem, beta: Array | None) -> tuple[Any, Any]:
    """Skip ``V (d, c)`` and bias ``b (c,)`` from the stacked least-squares coefficients."""
    return problem.split_unregularized(beta)


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """One BLAS thread while a solve runs on the CPU.

    XLA's CPU LAPACK calls (ADMM's Cholesky/eigh, the nuclear prox's SVDs) go through
    scipy's OpenBLAS, whose spinning worker threads compete with XLA's own pool: measured
    2.7x slower ADMM solves on 2 cores with OpenBLAS's default threads. XLA's GEMMs do not
    use OpenBLAS, so nothing is lost. A no-op without threadpoolctl or off the CPU.
    """
    if jax.default_backend() != "cpu":
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
