"""Solves run in host-driven phases: gap-safe screening, working sets and bfloat16 GEMMs.

Every phase is one call of the ordinary compiled solve (:func:`cvxdist.solvers.iterate` under
``jit``), warm-started from the previous phase, with an iteration budget passed as a traced
scalar (so budgets never recompile). Between phases, on the host:

- **screening** (``screen=True``): the gap-safe test of :mod:`cvxdist.screening` removes the
  gates that are provably zero at the optimum, and the next phase runs on the problem
  restricted to the survivors (``problem.restrict_gates``): ``G``, the stored masks and
  every GEMM shrink to ``p`` gates. ``p`` is bucketed (``64 · 2^k``) so a solve
  compiles at most ``log2(P / 64) + 1`` programs; padding gates are dead (zero mask). Phase
  lengths grow geometrically (``first_phase``, ×``growth``), so the test runs ``O(log iters)``
  times. Each phase restarts the solver's momentum and step search: that is the price.
- **working sets** (``working_set=True``; skglm, celer, blitz): each phase is solved on the
  gates ranked first by their KKT violation ``‖∇f(U)_i‖° / λ`` (the dual norm of the gate's
  gradient block against λ; the support ranks first), a bucket of ``64 · 2^k`` gates that
  holds at least twice the support and grows geometrically when gates that matter were left
  out (:func:`choose_working_set`). The phase is warm-started from the current weights and
  aims at half the floor; the test before the next phase measures the gap on *all* live
  gates, and only that gap ends the solve. With screening the candidates are the survivors.
  On a λ path the first set is glmnet's sequential strong set (``strong_from``), verified by
  the same full-gap test. Every narrower phase costs ``p / P`` of a full-width iteration
  (``stats.iteration_equivalents`` adds them up, tests included).
- **precision** (``problem.precision == "bf16"``, or ``"default"`` off CPU where XLA's
  default float32 GEMMs are TF32 or bfloat16 passes, see :func:`exact_gemms`): phases run
  with the cheap GEMMs while the true (float32) duality gap keeps falling; once a bf16 phase
  fails to halve it, or the solve claims a gap that the full-precision recomputation does not
  confirm, or its line search fails, the remaining phases use ``"highest"`` GEMMs. So a bf16
  solve ends with the same guarantee as a float32 one.

The certificate reported at the end is always recomputed on the *full* problem with
``"highest"`` GEMMs (:func:`cvxdist.duality.certify`), and ``converged`` means that gap is at
most ``tol``. These are the only Python loops over iterations in the library (a few phases per
solve, not one per iteration).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from cvxdist.duality import Problem, certify
from cvxdist.problems import padded_index
from cvxdist.prox import Regularizer
from cvxdist.screening import (
    MIN_BUCKET,
    ScreenResult,
    bucket_size,
    gap_to_screen,
    operator_norm_bounds,
    screen,
)
from cvxdist.solvers.common import (
    RESULTS,
    IterativeSolver,
    Solution,
    SolveStats,
    Weights,
    solve_compiled,
)


@functools.partial(jax.jit, static_argnums=3)
def _embed(U_sub: Array, take: Array, live: Array, num_gates: int) -> Array:
    """Full ``(P, d, c)`` weights from restricted ones (``take``/``live``: see
    :func:`cvxdist.problems.padded_index`)."""
    U = jnp.zeros((num_gates, *U_sub.shape[1:]), U_sub.dtype)
    return U.at[take].add(jnp.where(live[:, None, None], U_sub, 0.0))


@jax.jit
def _take(U_sub: Array, take: Array, live: Array) -> Array:
    """Restricted weights ``U_sub[take]`` with the padding slots zeroed."""
    return jnp.where(live[:, None, None], U_sub[take], 0.0)


def solve_phased(
    solver: IterativeSolver,
    problem: Problem,
    lam: Array,
    U0: Array,
    tol: float,
    max_iters: int,
    *,
    screen_gates: bool = True,
    working_set: bool = False,
    strong_from: float | None = None,
    shrink: float = 0.1,
    bf16_phase: int = 50,
    min_bucket: int = MIN_BUCKET,
    max_phases: int = 100,
) -> Solution:
    """Solve in phases with screening, working sets and/or bf16 GEMMs (module docstring).

    Args:
        lam: traced λ (a 0-d array of the problem dtype).
        U0: warm start ``(P, d, c)``.
        tol: target relative duality gap of the full problem, certified at full precision.
        max_iters: total iteration budget over all phases.
        screen_gates: run the gap-safe test between phases and shrink the problem.
        working_set: solve each phase on the gates ranked first by their KKT violation
            (:func:`choose_working_set`), a bucket of ``min_bucket · 2^k`` gates.
        strong_from: the previous λ of a path: the first working set is then the sequential
            strong set ``‖∇f(U0)_i‖° ≥ 2λ − strong_from`` plus the support of ``U0``.
        shrink: each phase runs until the gap has fallen by this factor (or to ``tol``).
        bf16_phase: iteration cap of a bfloat16 phase (its progress is checked after it).
        min_bucket: smallest gate bucket of a restricted problem.
        max_phases: safety bound on the number of phases.

    Returns:
        A Solution on the full problem; ``stats.screened`` is the number of gates removed,
        ``stats.working_set`` the size of the last working set (0: none),
        ``stats.iteration_equivalents`` the GEMM work in full-width iterations and
        ``stats.time_s`` is NaN (the caller times the call).
    """
    reg = solver.reg
    dtype = problem.dtype
    eps = float(jnp.finfo(dtype).eps)
    num_gates = problem.num_gates
    precision = problem.precision
    cheap = not exact_gemms(problem)  # low-precision phases, then full-precision ones
    tested = screen_gates or working_set  # a gradient test (gap + scores) before each phase
    bounds = operator_norm_bounds(problem) if screen_gates else None
    active = np.arange(num_gates)
    sub, sub_bounds, U_sub = problem, bounds, U0
    if tested:  # the same pytree structure (a gate mask) for every phase: fewer compiles
        sub = problem.restrict_gates(active, num_gates)
        solver = solver.unprepared()  # a factor precomputed for all gates does not apply
    floor = float(tol)
    iterations = 0
    work = 0.0  # GEMM pairs, in units of one full-width pair
    result = RESULTS.max_steps_reached
    last = None
    target = math.inf
    previous_gap = math.inf
    line_search_failed = False
    chosen: WorkingSet | None = None
    width = 0  # gates of the last working-set phase (0: no working sets)
    strong = None if strong_from is None else 2.0 - float(strong_from) / max(float(lam), eps)
    for _ in range(max_phases):
        # Full-precision gap of the restricted problem (with safe screening it bounds the
        # suboptimality of the full problem), and the gates it proves zero.
        if tested:
            test = screen(sub, reg, lam, U_sub, sub_bounds)
            work += sub.num_gates / num_gates
            gap = float(test.rel_gap)
            keep = np.asarray(test.keep)[: len(active)]
            if screen_gates and not keep.all():
                survivors = np.flatnonzero(keep)
                active = active[survivors]
                if len(active) == 0:  # every gate is provably zero: the zero model
                    U_sub = None
                    result = RESULTS.successful
                    break
                size = bucket_size(len(active), num_gates, min_bucket)
                sub = problem.restrict_gates(active, size)
                sub_bounds = jnp.asarray(np.asarray(bounds)[padded_index(active, size)[0]])
                U_sub = _take(U_sub, *padded_index(survivors, size))
                test = _take_test(test, survivors, size)
        else:
            gap = float(certify(sub, reg, lam, U_sub).evaluation.rel_gap)
            work += 1.0
        if not np.isfinite(gap):
            result = RESULTS.nonfinite
            break
        # The last working-set phase reached its target but the full gap did not follow:
        # gates that matter were left out, so the next set doubles.
        grow = width > 0 and bool(last.converged) and gap > 2.0 * target
        if gap <= floor:
            full = U_sub
            if tested:
                full = _embed(U_sub, *padded_index(active, sub.num_gates), num_gates)
            final = _final_solution(solver, problem, lam, full, last, iterations, active)
            final = _with_work(final, work + 1.0, width)
            if float(final.stats.rel_gap) <= tol:
                return eqx.tree_at(lambda s: s.result, final, RESULTS.successful)
            # Screened gates' dual constraints bind at this dual point: go on, tighter.
            floor = max(floor * shrink, eps)
        if last is not None and cheap and precision != "highest":
            # The solve claimed a gap its GEMMs cannot back (bf16, or TF32 behind XLA's
            # default on GPUs), its line search failed, or bf16 stopped making progress.
            stalled = line_search_failed or (bool(last.converged) and gap > target)
            if precision == "bf16":
                stalled = stalled or gap > 0.5 * previous_gap
            if stalled:  # low-precision GEMMs cannot take the gap further: finish in full
                precision = "highest"
        elif last is not None and line_search_failed:
            result = RESULTS.linesearch_failed
            break
        budget = int(max_iters) - iterations
        if budget <= 0:
            break
        if precision == "bf16":
            budget = min(budget, bf16_phase)
        target = floor
        aim = gap * shrink  # where a phase that is not the last one stops
        if screen_gates:
            # Run until the gap is small enough to halve the bucket (were the dual
            # correlations to stay put), so that every test removes gates.
            half = bucket_size(len(active), num_gates, min_bucket) // 2
            if half >= min_bucket:
                aim = min(aim, gap_to_screen(test, len(active) - half))
                target = max(floor, aim)
        elif cheap and precision != "highest":
            target = max(floor, aim)
        run, U_run = sub, U_sub
        if working_set:
            width = sub.num_gates
            chosen = choose_working_set(
                test, U_sub, reg, len(active), num_gates, chosen, grow, strong, min_bucket
            )
            strong = None  # the strong rule seeds the first working set only
            if chosen.size < sub.num_gates:  # solve on the working set only
                run = problem.restrict_gates(active[chosen.slots], chosen.size)
                U_run = _take(U_sub, *padded_index(chosen.slots, chosen.size))
                # The working set's gap is below the full one: aim under the floor.
                target = max(WORKING_SET_AIM * floor, aim)
                width = chosen.size
        previous_gap = gap
        last = solve_compiled(
            solver,
            run.with_precision(precision),
            lam,
            U_run,
            jnp.asarray(target, dtype),
            jnp.asarray(budget, jnp.int32),
        )
        done = int(last.stats.iterations)
        iterations += done
        work += (done + 1) * run.num_gates / num_gates  # + the solver's initial residual
        U_sub = last.weights.U
        if run is not sub:
            U_sub = _embed(U_sub, *padded_index(chosen.slots, chosen.size), sub.num_gates)
        line_search_failed = bool(last.result == RESULTS.linesearch_failed)
    if U_sub is None:
        U = problem.zeros()
    elif tested:
        U = _embed(U_sub, *padded_index(active, sub.num_gates), num_gates)
    else:
        U = U_sub
    final = _final_solution(solver, problem, lam, U, last, iterations, active)
    final = _with_work(final, work + 1.0, width)
    return eqx.tree_at(lambda s: s.result, final, result)


#: A working-set phase aims at this fraction of the floor: its gap is a lower bound of the
#: full problem's, which the next test measures.
WORKING_SET_AIM = 0.5


class WorkingSet(NamedTuple):
    """The gates a phase is solved on: ``slots`` (sorted positions in the restricted
    problem) padded to ``size`` gates (a bucket)."""

    slots: np.ndarray
    size: int


def choose_working_set(
    test: ScreenResult,
    U: Array,
    reg: Regularizer,
    num_live: int,
    num_gates: int,
    previous: WorkingSet | None,
    grow: bool,
    strong: float | None,
    min_bucket: int = MIN_BUCKET,
) -> WorkingSet:
    """The next working set (skglm's rule, on gate blocks; host side).

    Gates are ranked by their KKT violation ``‖∇f(U)_i‖° / λ`` (``test.violation``); the
    support of ``U`` ranks first and screened gates never enter. The set holds
    ``max(min_bucket, 2 · support, previous size)`` gates, doubled when ``grow`` (the previous
    phase reached its target yet the full gap did not follow: violators were left out), or,
    with ``strong`` (a threshold on the violation, glmnet's sequential strong rule), the gates
    above it and the support. The size is rounded up to a bucket (``min_bucket · 2^k``) and
    the whole bucket is filled with the best-ranked gates: the padding would cost the same.

    Args:
        test: the test at ``U`` on the restricted problem (its first ``num_live`` slots).
        U: the weights of the restricted problem.
        num_live: live (unscreened) gates of the restricted problem.
        num_gates: gates of the full problem (caps the bucket).
    """
    score = np.asarray(test.violation)[:num_live].astype(np.float64)
    support = np.asarray(reg.group_norms(U) > 0)[:num_live]
    keep = np.asarray(test.keep)[:num_live]
    score = np.where(support, np.inf, score)
    score = np.where(keep, score, -np.inf)
    count = int(support.sum())
    if strong is not None:
        wanted = int(np.sum(score >= strong))
    else:
        wanted = max(min_bucket, 2 * count, previous.size if previous else 0)
        if grow and previous is not None:
            wanted = max(wanted, 2 * previous.size)
    size = bucket_size(max(wanted, 1), num_gates, min_bucket)
    ranked = np.argsort(-score, kind="stable")[: min(size, int(keep.sum()))]
    return WorkingSet(np.sort(ranked), size)


def _take_test(test: ScreenResult, survivors: np.ndarray, size: int) -> ScreenResult:
    """The test's per-gate fields for the surviving gates only, padded to ``size`` (host)."""

    def take(values: Array, fill: float) -> np.ndarray:
        values = np.asarray(values)
        out = np.full(size, fill, values.dtype)
        out[: len(survivors)] = values[survivors]
        return out

    fields = (take(test.keep, False), take(test.slack, 0.0), take(test.violation, -np.inf))
    return eqx.tree_at(lambda t: (t.keep, t.slack, t.violation), test, fields)


def _with_work(solution: Solution, work: float, width: int) -> Solution:
    """``solution`` with the phases' work and the width of the last working set."""
    stats = solution.stats._replace(
        working_set=jnp.asarray(width, jnp.int32),
        iteration_equivalents=jnp.asarray(work, solution.stats.objective.dtype),
    )
    return eqx.tree_at(lambda s: s.stats, solution, stats)


def exact_gemms(problem: Problem) -> bool:
    """Whether the problem's GEMMs are float32/float64-exact, so that the gap a solver computes
    is already the certificate. ``"default"`` is exact on CPU only: XLA uses TF32 on recent
    NVIDIA GPUs and bfloat16 passes on TPUs for float32 dots (host-side check)."""
    if problem.precision == "highest":
        return True
    if problem.precision == "bf16":
        return False
    placement = getattr(problem.G, "sharding", None)
    devices = placement.device_set if placement is not None else {jax.devices()[0]}
    return {device.platform for device in devices} == {"cpu"}


def _final_solution(
    solver: IterativeSolver,
    problem: Problem,
    lam: Array,
    U: Array,
    last: Solution | None,
    iterations: int,
    active: np.ndarray,
) -> Solution:
    """The Solution at full weights ``U`` (result code: max_steps_reached, to be set)."""
    step = last.stats.step if last is not None else jnp.full((), jnp.nan, problem.dtype)
    weights, stats = _final_stats(solver, problem, lam, U, step)
    stats = stats._replace(
        iterations=jnp.asarray(iterations, jnp.int32),
        screened=jnp.asarray(problem.num_gates - len(active), jnp.int32),
    )
    return Solution(weights, RESULTS.max_steps_reached, stats)


@eqx.filter_jit
def _final_stats(
    solver: IterativeSolver, problem: Problem, lam: Array, U: Array, step: Array
) -> tuple[Weights, SolveStats]:
    """Weights and statistics of ``U`` on the full problem, with full-precision GEMMs."""
    cert = certify(problem, solver.reg, lam, U)
    evaluation = cert.evaluation
    safe_step = jnp.where(jnp.isfinite(step) & (step > 0), step, 1.0)
    V, b = problem.split_unregularized(cert.beta)
    stats = SolveStats(
        iterations=jnp.zeros((), jnp.int32),
        objective=evaluation.primal,
        dual_objective=evaluation.dual,
        rel_gap=evaluation.rel_gap,
        subgrad_norm_sq=solver.reg.min_norm_subgradient_sq(U, cert.grad, lam, safe_step),
        lam=lam,
        step=step,
        active_gates=jnp.sum(solver.reg.group_norms(U) > 0),
        time_s=jnp.full((), jnp.nan, problem.dtype),
        screened=jnp.zeros((), jnp.int32),
    )
    return Weights(U, V, b), stats
