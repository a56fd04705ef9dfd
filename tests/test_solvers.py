"""Solver behaviour over the shared problem bank: certificates, batching, paths, result codes.

The objective of every solver path against CVXPY is in ``test_reference_table.py``.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from problem_bank import BANK, BANK_BY_NAME, CVXPY_REGS, build, cvxpy_reference, regularizer

from cvxdist.mapping import predict_convex
from cvxdist.problems import lam_max, make_problem
from cvxdist.prox import get_regularizer
from cvxdist.solvers import (
    RESULTS,
    SOLVERS,
    solve,
    solve_batch,
    solve_path,
    stack_problems,
    trace_count,
)
from cvxdist.solvers.fista import Fista

LAM_FRAC = 0.1


# Covered by default by test_problems.py's hypothesis test (the same bound for fista and admm,
# random problems, regularizers, λ and stopping points) and by the reference table.
@pytest.mark.slow
@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("reg", ("coupled", "one_vs_all", "nuclear"))
@pytest.mark.parametrize("spec", BANK[:3], ids=lambda s: s.name)
def test_gap_bounds_true_suboptimality(x64, solver, reg, spec):
    problem = build(spec)
    lam = LAM_FRAC * float(lam_max(problem, regularizer(reg)))
    reference, _ = cvxpy_reference(spec.name, reg, lam)
    for tol in (0.5, 0.1, 1e-2, 1e-4):  # tol is traced: one compilation for all four
        solution = solve(problem, lam, reg=reg, solver=solver, tol=tol)
        w = solution.weights
        primal = spec.objective(reg, lam, w.U, w.V, w.b)
        true_gap = (primal - reference) / primal
        assert true_gap <= float(solution.stats.rel_gap) + 1e-9
        dual = float(solution.stats.dual_objective)
        assert dual <= reference + 1e-9 * abs(reference)  # weak duality


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize(  # λ_max of each regularizer: test_problems.py's closed forms
    "reg", [r if r == "coupled" else pytest.param(r, marks=pytest.mark.slow) for r in CVXPY_REGS]
)
def test_lam_at_or_above_lam_max_gives_zero(x64, solver, reg):
    problem = build(BANK_BY_NAME["tall"])
    reg_obj = regularizer(reg)
    lmax = float(lam_max(problem, reg_obj))
    with pytest.warns(UserWarning, match="lam_max"):
        solution = solve(problem, lmax * 1.0001, reg=reg_obj, solver=solver, tol=1e-9)
    assert solution.converged
    assert np.all(np.asarray(solution.weights.U) == 0)
    assert int(solution.stats.active_gates) == 0
    below = solve(problem, lmax * 0.95, reg=reg_obj, solver=solver, tol=1e-9, max_iters=50_000)
    assert int(below.stats.active_gates) > 0


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_single_linear_gate_tiny_lambda_is_least_squares(x64, solver):
    rng = np.random.default_rng(7)
    X = rng.standard_normal((40, 4))
    Y = X @ rng.standard_normal((4, 2)) + 0.1 * rng.standard_normal((40, 2))
    G = np.zeros((4, 1))  # the all-ones pattern: a plain linear model
    problem = make_problem(X, Y, G, dtype="float64")
    solution = solve(problem, lam_frac=1e-9, solver=solver, tol=1e-12, max_iters=100_000)
    least_squares = np.linalg.lstsq(X, Y, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(solution.weights.U[0]), least_squares, atol=1e-6)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_vmapped_lambda_grid_equals_python_loop(x64, solver):
    problem = build(BANK_BY_NAME["tall"])
    lmax = float(lam_max(problem, regularizer("coupled")))
    lams = lmax * np.array([0.5, 0.1, 0.02])
    batch = solve_batch(problem, lams, solver=solver, tol=1e-8, max_iters=20_000)
    assert batch.weights.U.shape == (3, *problem.weight_shape)
    for lane, lam in enumerate(lams):
        single = solve(problem, lam, solver=solver, tol=1e-8, max_iters=20_000)
        np.testing.assert_allclose(batch.weights.U[lane], single.weights.U, atol=1e-6)
        assert abs(int(batch.stats.iterations[lane]) - int(single.stats.iterations)) <= 2
    # Lanes stop independently: the per-lane counts are not all the slowest lane's.
    iterations = np.asarray(batch.stats.iterations)
    assert iterations.min() < iterations.max()
    assert np.all(np.asarray(batch.converged))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_vmapped_independent_problems(x64, solver):
    specs = [BANK_BY_NAME["tall"], BANK_BY_NAME["tall"].__class__("tall2", 60, 5, 2, 8, seed=9)]
    problems = [build(spec) for spec in specs]
    lams = [0.1 * float(lam_max(p, regularizer("coupled"))) for p in problems]
    batch = solve_batch(
        stack_problems(problems), lams, solver=solver, tol=1e-8, batched_problem=True
    )
    for lane, (problem, lam) in enumerate(zip(problems, lams)):
        single = solve(problem, lam, solver=solver, tol=1e-8)
        np.testing.assert_allclose(batch.weights.U[lane], single.weights.U, atol=1e-6)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_new_lambda_does_not_recompile(solver):
    spec = BANK_BY_NAME["single_output"]
    problem = build(spec, dtype="float32")
    solve(problem, lam_frac=0.3, solver=solver, tol=1e-3)
    before = trace_count()
    for frac in (0.2, 0.05, 0.011):
        solve(problem, lam_frac=frac, solver=solver, tol=1e-3)
    solve(problem, lam_frac=0.2, solver=solver, tol=1e-4)  # a new tol is traced too
    assert trace_count() == before


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_warm_started_path_matches_cold_solves(x64, solver):
    problem = build(BANK_BY_NAME["skip_bias"])
    fracs = [0.5, 0.2, 0.05]
    path = solve_path(problem, lam_fracs=fracs, solver=solver, tol=1e-9, progress=False)
    assert [float(s.stats.lam) for s in path] == sorted(
        [float(s.stats.lam) for s in path], reverse=True
    )
    for frac, warm in zip(sorted(fracs, reverse=True), path):
        cold = solve(problem, lam_frac=frac, solver=solver, tol=1e-9)
        assert warm.converged
        np.testing.assert_allclose(warm.stats.objective, cold.stats.objective, rtol=1e-7)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_float32_reaches_default_tolerance(solver):
    spec = BANK_BY_NAME["tall"]
    problem = build(spec, dtype="float32")
    solution = solve(problem, lam_frac=0.05, solver=solver)
    assert solution.U.dtype == jnp.float32
    assert solution.converged, solution.message
    gap = float(solution.stats.rel_gap)
    assert gap <= 1e-3
    # The float32 certificate is honest: the float64 objective of the float32 weights is
    # within the reported gap of the CVXPY optimum at the same λ.
    lam = float(solution.stats.lam)
    reference, _ = cvxpy_reference(spec.name, "coupled", lam)
    w = solution.weights
    primal = spec.objective("coupled", lam, w.U)
    assert reference <= primal <= reference / (1 - gap) * (1 + 1e-5)
    assert abs(float(solution.stats.objective) - primal) <= 1e-5 * primal


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_result_codes(x64, solver):
    problem = build(BANK_BY_NAME["tall"])
    short = solve(problem, lam_frac=0.01, solver=solver, tol=1e-14, max_iters=2)
    assert short.result == RESULTS.max_steps_reached
    assert "max_iters" in short.message
    assert int(short.stats.iterations) == 2
    bad_init = jnp.full(problem.weight_shape, jnp.nan)
    broken = solve(problem, lam_frac=0.1, solver=solver, init=bad_init)
    assert broken.result == RESULTS.nonfinite
    assert "NaN" in broken.message


def test_predictions_of_solution_match_problem_operator(x64):
    spec = BANK_BY_NAME["skip_bias"]
    problem = build(spec)
    solution = solve(problem, lam_frac=0.1, tol=1e-10)
    X, Y, G = spec.arrays()
    pred = np.asarray(predict_convex(solution, G, X))
    # At the optimum the skip/bias absorb the mean and linear part: residual ⟂ [X, 1].
    residual = Y - pred
    np.testing.assert_allclose(X.T @ residual, 0, atol=1e-8)
    np.testing.assert_allclose(residual.sum(0), 0, atol=1e-8)


def test_bad_lambda_and_tol_raise():
    problem = build(BANK_BY_NAME["tall"], dtype="float32")
    with pytest.raises(ValueError, match="non-negative"):
        solve(problem, -0.1)
    with pytest.raises(ValueError, match="exactly one"):
        solve(problem)
    with pytest.raises(ValueError, match="finite"):
        solve(problem, float("nan"))
    with pytest.raises(ValueError, match="tol"):
        solve(problem, lam_frac=0.1, tol=0.0)
    with pytest.raises(ValueError, match="unknown solver"):
        solve(problem, lam_frac=0.1, solver="sgd")
    with pytest.raises(ValueError, match="unknown regularizer"):
        solve(problem, lam_frac=0.1, reg="l0")
    with pytest.raises(ValueError, match="init must have shape"):
        solve(problem, lam_frac=0.1, init=np.zeros((1, 2, 3)))


def test_jit_cache_key_independent_of_lambda_value_type():
    # Python floats, numpy scalars and 0-d arrays all hit the same compiled solve.
    problem = build(BANK_BY_NAME["tall"], dtype="float32")
    solve(problem, 0.01)
    before = trace_count()
    solve(problem, np.float64(0.02))
    solve(problem, jnp.asarray(0.03))
    assert trace_count() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(problem, 0.01)


def test_vmap_lanes_are_frozen_after_convergence(x64):
    # A lane at λ ≥ λ_max converges at iteration 0 and must stay exactly zero while others run.
    problem = build(BANK_BY_NAME["tall"])
    lmax = float(lam_max(problem, regularizer("coupled")))
    batch = solve_batch(problem, [2 * lmax, 0.05 * lmax], tol=1e-9)
    assert int(batch.stats.iterations[0]) == 0
    assert np.all(np.asarray(batch.weights.U[0]) == 0)
    assert int(batch.stats.iterations[1]) > 10
    # The running lane is unaffected by the frozen one: it reaches the CVXPY optimum.
    lam = 0.05 * lmax
    reference, _ = cvxpy_reference("tall", "coupled", lam)
    w = batch.weights
    ours = BANK_BY_NAME["tall"].objective("coupled", lam, w.U[1])
    assert abs(ours - reference) <= 1e-6 * reference


@pytest.mark.parametrize(
    "options", [{"growth": 0.9}, {"shrink": 1.0}, {"growth": 2.5, "shrink": 0.5}, {"shrink": 0.0}]
)
def test_fista_line_search_settings_are_validated(options):
    with pytest.raises(ValueError, match="growth"):
        Fista(get_regularizer("coupled"), **options)
