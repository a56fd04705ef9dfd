"""cvxdist's side: R-FISTA (and ADMM, and what ``auto`` picks, with the cost model's
prediction) timed to the target gap, one
R-FISTA iteration profiled step by step, and one iteration against the two GEMMs it needs."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.solvers.instances import (
    MAX_ITERS,
    OUR_TOLS,
    REG,
    TARGET_GAP,
    GapEvaluator,
    Instance,
)


def run_cvxdist(
    problem: Any,
    lam: float,
    evaluator: GapEvaluator,
    repeats: int,
    log: Callable[[str], None],
    solver: Any = "fista",
    name: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Solve to the target gap: first call (with compilation), then ``repeats`` steady calls
    (``solver`` a name or a solver instance, ``name`` its label, ``options`` more arguments of
    ``solve``, such as ``working_set``)."""
    import jax

    from cvxdist.solvers import solve

    name = name or solver

    def call(tol: float) -> tuple[Any, float]:
        start = time.perf_counter()
        solution = solve(
            problem, lam, reg=REG, solver=solver, tol=tol, max_iters=MAX_ITERS, **options
        )
        jax.block_until_ready(solution)
        return solution, time.perf_counter() - start

    tries = []
    cold_total = 0.0
    for tol in OUR_TOLS:
        solution, wall = call(tol)
        cold_total += wall
        check = evaluator(solution.U, lam)
        tries.append(
            {
                "tol": tol,
                "wall_s": wall,
                "iterations": int(solution.stats.iterations),
                "own_rel_gap_f32": float(solution.stats.rel_gap),
                "rel_gap_f64": check["rel_gap"],
                "message": solution.message,
            }
        )
        log(
            f"  cvxdist {name} tol={tol:g}: {wall:.3f}s (first call), "
            f"{tries[-1]['iterations']} iters, "
            f"gap f64 {check['rel_gap']:.3g}"
        )
        if check["rel_gap"] <= TARGET_GAP:
            break
    tol = tries[-1]["tol"]
    walls, cores = [], []
    for _ in range(repeats):
        again, wall = call(tol)
        walls.append(wall)
        cores.append(float(again.stats.time_s))
    steady = statistics.median(walls)
    iterations = int(solution.stats.iterations)
    log(f"  cvxdist {name} steady: {steady:.3f}s median of {walls}")
    return {
        "solver": name,
        "reached_target": check["rel_gap"] <= TARGET_GAP,
        "tol": tol,
        "iterations": iterations,
        "rel_gap": check["rel_gap"],
        "objective": check["objective"],
        "converged": bool(solution.converged),
        "message": solution.message,
        "active_gates": int(solution.stats.active_gates),
        "iteration_equivalents": float(solution.stats.iteration_equivalents),
        "working_set": int(solution.stats.working_set),
        "screened": int(solution.stats.screened),
        "time_with_compile_s": cold_total,
        "time_steady_s": steady,
        "time_steady_all_s": walls,
        "time_core_steady_s": statistics.median(cores),
        "time_per_iteration_s": statistics.median(cores) / max(iterations, 1),
        "tries": tries,
    }


def run_admm_and_auto(
    problem: Any,
    lam: float,
    evaluator: GapEvaluator,
    repeats: int,
    log: Callable[[str], None],
    fista: dict[str, Any],
) -> dict[str, Any]:
    """ADMM on the same problem, and what ``solver="auto"`` picks (timed as that solver).

    ADMM runs where its dense N × N kernel applies (padded N ≤ ``DENSE_MAX_ROWS``) or where
    ``auto`` would choose it; beyond, its matrix-free CG form is slower than R-FISTA by the
    cost model of :func:`cvxdist.solvers.choose_solver` and is recorded as not run.
    """
    from cvxdist.solvers import choose_solver, costs
    from cvxdist.solvers.kernel import DENSE_MAX_ROWS

    rows = problem.X.shape[0] * problem.X.shape[1]
    choice = choose_solver(problem)
    if rows <= DENSE_MAX_ROWS or choice == "admm":
        admm = run_cvxdist(problem, lam, evaluator, repeats, log, solver="admm")
    else:
        admm = {
            "solver": "admm",
            "not_run": f"N = {rows} > {DENSE_MAX_ROWS}: matrix-free ADMM, slower than R-FISTA "
            "by the cost model of choose_solver",
        }
    chosen = admm if choice == "admm" else fista
    times = [r["time_steady_s"] for r in (fista, admm) if r.get("reached_target")]
    return {
        "admm": admm,
        "auto": {
            "chooses": choice,
            "time_steady_s": chosen["time_steady_s"],
            "cost_model": costs.explain(problem),
        },
        "admm_over_fista_steady": (
            fista["time_steady_s"] / admm["time_steady_s"] if "time_steady_s" in admm else None
        ),
        "best_time_steady_s": min(times) if times else None,
    }


def profile_iterations(
    problem: Any, lam: float, tol: float, max_iters: int = MAX_ITERS, **solver_options: Any
) -> dict[str, Any]:
    """Run the same R-FISTA iteration by iteration (jitted step, host loop) to time single
    iterations and count line-search backtracks and restarts (``solver_options`` such as
    ``growth`` and ``shrink`` go to the solver)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from cvxdist.solvers import make_solver

    solver = make_solver("fista", REG, **solver_options)
    dtype = problem.dtype
    lam_arr = jnp.asarray(lam, dtype)
    init = eqx.filter_jit(solver.init)
    step = eqx.filter_jit(solver.step)
    state = jax.block_until_ready(init(problem, problem.zeros(), lam_arr))
    jax.block_until_ready(step(problem, lam_arr, state))  # compile
    times, backtracks = [], []
    while int(state.iteration) < max_iters:
        before = int(state.backtracks)
        start = time.perf_counter()
        state = jax.block_until_ready(step(problem, lam_arr, state))
        times.append(time.perf_counter() - start)
        backtracks.append(int(state.backtracks) - before)
        if float(state.evaluation.rel_gap) <= tol or bool(state.linesearch_failed):
            break
        if not math.isfinite(float(state.evaluation.primal)):
            break
    plain = [t for t, b in zip(times, backtracks) if b == 0]
    iterations = int(state.iteration)
    return {
        "iterations": iterations,
        "backtracks": int(state.backtracks),
        "restarts": int(state.restarts),
        "iterations_with_backtracks": sum(b > 0 for b in backtracks),
        "final_step": float(state.step),
        "step_time_median_s": statistics.median(times),
        "step_time_mean_s": statistics.fmean(times),
        "step_time_no_backtrack_median_s": statistics.median(plain) if plain else None,
        "gemms_per_iteration": 2.0 + int(state.backtracks) / max(iterations, 1),
    }


def time_iteration_vs_gemms(
    inst: Instance, problem: Any, lam: float, rounds: int
) -> dict[str, Any]:
    """One R-FISTA iteration against the two GEMMs it needs, timed *interleaved*.

    The iteration is a jitted ``Fista.step`` from a fixed state whose step needs no
    backtracking (so it performs exactly one forward and one adjoint product); the GEMMs are
    jitted float32 products of the same contraction order as the operators (``X @ W`` and
    ``Xᵀ @ Z``, or ``M @ W`` and ``Mᵀ @ Z`` gate first). Each round
    times the step, then both GEMMs, so that contention from other processes hits them alike;
    the ratio is the median of the per-round ratios.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from cvxdist.solvers import make_solver

    solver = make_solver("fista", REG)
    lam_arr = jnp.asarray(lam, problem.dtype)
    step = eqx.filter_jit(solver.step)
    state = jax.block_until_ready(eqx.filter_jit(solver.init)(problem, problem.zeros(), lam_arr))
    for _ in range(50):  # a few iterations in, at a state whose next step is not rejected
        following = jax.block_until_ready(step(problem, lam_arr, state))
        if int(state.iteration) >= 5 and int(following.backtracks) == int(state.backtracks):
            break
        state = following

    from cvxdist.operators import gate_first

    N, d = inst.X.shape
    P, c = inst.G.shape[1], inst.Y.shape[1]
    rng = np.random.default_rng(0)
    if gate_first(d, P, c):  # the products the operators perform in that order
        X = jnp.asarray(inst.X @ inst.G >= 0, jnp.float32)
        inner, outer = P, d * c
    else:
        X = jnp.asarray(inst.X, jnp.float32)
        inner, outer = d, P * c
    W = jnp.asarray(rng.standard_normal((inner, outer)), jnp.float32)
    Z = jnp.asarray(rng.standard_normal((N, outer)), jnp.float32)
    forward = jax.jit(lambda X, W: X @ W)
    adjoint = jax.jit(lambda X, Z: X.T @ Z)

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    calls = (
        lambda: step(problem, lam_arr, state),
        lambda: forward(X, W),
        lambda: adjoint(X, Z),
    )
    for call in calls:  # warm up
        timed(call)
    steps, fwds, adjs, ratios = [], [], [], []
    for _ in range(rounds):
        t_step, t_fwd, t_adj = (timed(call) for call in calls)
        steps.append(t_step)
        fwds.append(t_fwd)
        adjs.append(t_adj)
        ratios.append(t_step / (t_fwd + t_adj))
    flops = 2.0 * N * d * P * c
    gemm = statistics.median([f + a for f, a in zip(fwds, adjs)])
    return {
        "rounds": rounds,
        "forward_s": statistics.median(fwds),
        "adjoint_s": statistics.median(adjs),
        "gemm_s": gemm,
        "gflops_per_s": 2 * flops / gemm / 1e9,
        "flops_per_gemm": flops,
        "iteration_s": statistics.median(steps),
        "iteration_over_gemm": statistics.median(ratios),
        "ratios": ratios,
    }
