"""Anderson extrapolation, ADMM along paths and the measured cost model of ``auto``."""

from __future__ import annotations

from types import SimpleNamespace

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problem_bank import BANK_BY_NAME, cvxpy_reference
from test_composed import build as build_composed
from test_composed import cvxpy_optimum
from test_screening import build
from test_solvers import regularizer
from test_working_sets import assert_certified, assert_path_matches_cvxpy

from cvxdist.duality import lam_max
from cvxdist.prox import get_regularizer
from cvxdist.solvers import Admm, Fista, choose_solver, costs, solve, solve_path, trace_count
from cvxdist.solvers.fista import anderson_coefficients

ANDERSON = {"fista_aa": dict(anderson=5), "pgd_aa": dict(anderson=3, momentum=False)}


@pytest.mark.parametrize("options", ANDERSON, ids=str)
@pytest.mark.parametrize(
    ("name", "reg"),
    [("tall", "coupled"), ("skip_bias", "nuclear"), ("single_output", "one_vs_all")],
)
def test_anderson_matches_cvxpy(x64, name, reg, options):
    spec = BANK_BY_NAME[name]
    problem = build(spec)
    reg_obj = regularizer(reg)
    lam = 0.1 * float(lam_max(problem, reg_obj))
    reference, _ = cvxpy_reference(name, reg, lam)
    solver = Fista(reg_obj, **ANDERSON[options])
    solution = solve(problem, lam, reg=reg_obj, solver=solver, tol=1e-9, max_iters=100_000)
    assert solution.converged, solution.message
    w = solution.weights
    ours = spec.objective(reg, lam, w.U, w.V, w.b)
    assert abs(ours - reference) <= 1e-6 * abs(reference)
    assert_certified(problem, reg_obj, solution, 1e-9)


@pytest.mark.parametrize("name", ["pooled_head", "per_group"])
def test_anderson_on_composed_problems(x64, name):
    problem = build_composed(name, True, True)
    reg = get_regularizer("coupled")
    lam = 0.1 * float(lam_max(problem, reg))
    solution = solve(problem, lam, reg=reg, solver=Fista(reg, anderson=4), tol=1e-9)
    assert solution.converged, solution.message
    reference = cvxpy_optimum(name, True, True, "coupled", lam)
    assert abs(float(solution.stats.objective) - reference) <= 1e-6 * abs(reference)
    assert_certified(problem, reg, solution, 1e-9)


def test_anderson_coefficients_solve_the_linear_fixed_point(x64):
    """On an affine map x ↦ M x + b whose error lives in a 3-dimensional invariant subspace,
    four differences of five iterates reach the fixed point exactly (Krylov: the residual
    polynomial needs degree 3 on top of its value 1 at 1), though their Gram matrix is
    singular (the Tikhonov term handles it)."""
    rng = np.random.default_rng(0)
    m, n = 4, 6
    basis = np.linalg.qr(rng.standard_normal((n, 3)))[0]
    M = basis @ np.diag([0.9, 0.5, -0.3]) @ basis.T
    x_star = rng.standard_normal(n)
    b = x_star - M @ x_star
    iterates = [basis @ rng.standard_normal(3) + x_star]
    for _ in range(m):
        iterates.append(M @ iterates[-1] + b)
    stacked = jnp.asarray(np.stack(iterates))
    coeffs = np.asarray(anderson_coefficients(stacked), np.float64)
    assert abs(coeffs.sum() - 1.0) < 1e-12
    mixed = coeffs @ np.stack(iterates[1:])
    np.testing.assert_allclose(mixed, x_star, atol=1e-6)


def test_anderson_is_accepted_only_when_the_objective_decreases(x64):
    """Proximal gradient with Anderson: the objective never increases along the iterates,
    extrapolations included, and some extrapolations were accepted (they do act)."""
    problem = build(BANK_BY_NAME["tall"])
    reg = get_regularizer("coupled")
    lam = jnp.asarray(0.01 * float(lam_max(problem, reg)))
    solver = Fista(reg, anderson=3, momentum=False)
    state = eqx.filter_jit(solver.init)(problem, problem.zeros(), lam)
    step = eqx.filter_jit(solver.step)
    objectives = [float(state.evaluation.primal)]
    for _ in range(120):
        state = step(problem, lam, state)
        objectives.append(float(state.evaluation.primal))
    assert np.all(np.diff(objectives) <= 1e-12 * objectives[0])
    assert int(state.history.accepted) > 0
    plain = Fista(reg, momentum=False)
    ours = solve(problem, float(lam), reg=reg, solver=solver, tol=1e-6, max_iters=20_000)
    slow = solve(problem, float(lam), reg=reg, solver=plain, tol=1e-6, max_iters=20_000)
    assert ours.converged and slow.converged
    assert int(ours.stats.iterations) < int(slow.stats.iterations)


def test_anderson_new_lambda_does_not_recompile():
    problem = build(BANK_BY_NAME["single_output"], dtype="float32")
    solver = Fista(get_regularizer("coupled"), anderson=5)
    solve(problem, lam_frac=0.3, solver=solver, tol=1e-3)
    before = trace_count()
    for frac in (0.2, 0.05):
        solve(problem, lam_frac=frac, solver=solver, tol=1e-3)
    assert trace_count() == before


@pytest.mark.parametrize("options", [dict(anderson=1), dict(anderson=-2)])
def test_bad_anderson_depth_raises(options):
    with pytest.raises(ValueError, match="anderson"):
        Fista(get_regularizer("coupled"), **options)


# ----------------------------------------------------------------------- ADMM along a path
def test_admm_path_factors_the_kernel_once(x64, monkeypatch):
    name, reg = "tall", "coupled"
    problem = build(BANK_BY_NAME[name])
    reg_obj = get_regularizer(reg)
    calls = []
    original = Admm._factor

    def counted(self, problem, rho):
        calls.append(self.linear_solver)
        return original(self, problem, rho)

    monkeypatch.setattr(Admm, "_factor", counted)
    fracs = (0.5, 0.2, 0.1, 0.05)
    solver = Admm(reg_obj, linear_solver="eigh", adapt="balance", adapt_period=2)
    path = solve_path(problem, lam_fracs=fracs, reg=reg, solver=solver, tol=1e-9, progress=False)
    assert calls == ["eigh"]  # one eigendecomposition (traced once) for every λ and ρ
    assert_path_matches_cvxpy(problem, name, reg, fracs, path)


def test_admm_certifying_every_third_iteration_reports_the_returned_weights(x64):
    name, reg = "skip_bias", "one_vs_all"
    problem = build(BANK_BY_NAME[name])
    reg_obj = get_regularizer(reg)
    lam = 0.1 * float(lam_max(problem, reg_obj))
    reference, _ = cvxpy_reference(name, reg, lam)
    every = Admm(reg_obj, certify_every=3)
    solution = solve(problem, lam, reg=reg_obj, solver=every, tol=1e-9, max_iters=50_000)
    assert solution.converged and int(solution.stats.iterations) % 3 == 0
    assert abs(float(solution.stats.objective) - reference) <= 1e-6 * abs(reference)
    assert_certified(problem, reg_obj, solution, 1e-9)
    # Stopped by max_iters between two certificates: the weights are the certified ones.
    short = solve(problem, lam, reg=reg_obj, solver=every, tol=1e-14, max_iters=7)
    assert int(short.stats.iterations) == 7
    assert_certified(problem, reg_obj, short, 1.0)
    always = solve(problem, lam, reg=reg_obj, solver=Admm(reg_obj), tol=1e-14, max_iters=6)
    np.testing.assert_allclose(short.U, always.U, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ cost model
SHAPES = [
    ((1000, 50, 1, 500), "admm"),  # the CPU benchmark problems
    ((5000, 100, 10, 1000), "admm"),
    ((20000, 200, 1, 2000), "fista"),  # no dense kernel
    ((8000, 20, 1, 100), "fista"),  # cheap GEMMs: the kernel would dominate
]


def stand_in(N, d, c, P):
    """What the cost model reads of a problem: shapes only."""
    return SimpleNamespace(X=np.empty((1, N, d)), G=np.empty((d, P)), Y=np.empty((1, N, c)))


@pytest.mark.parametrize(("shape", "expected"), SHAPES)
def test_auto_chooses_by_the_cost_model(shape, expected):
    rates = costs.reference_rates()
    problem = stand_in(*shape)
    assert choose_solver(problem, rates=rates) == expected
    explained = costs.explain(problem, rates=rates)
    assert explained["solver"] == expected
    best = min(explained["predicted_s"], key=explained["predicted_s"].get)
    assert best.startswith(expected)
    assert choose_solver(None) == "fista"
    assert choose_solver(build_composed("head", False, False, dtype="float32")) == "fista"


def test_one_eigendecomposition_wins_on_long_paths():
    rates = costs.reference_rates()
    problem = stand_in(5000, 100, 10, 1000)
    assert costs.choose_linear_solver(problem, 1, rates) == "cholesky"
    assert costs.choose_linear_solver(problem, 10, rates) == "eigh"
    assert costs.choose_linear_solver(stand_in(20000, 20, 1, 100), 10, rates) == "cg"


def test_measured_rates_are_positive_and_cached():
    rates = costs.measured_rates(jax.default_backend(), "float32")
    assert rates.gemm > 0 and rates.cholesky > 0 and rates.eigh > 0
    assert costs.measured_rates(jax.default_backend(), "float32") is rates


def test_pinned_rates_replace_the_measurement(monkeypatch):
    monkeypatch.setenv(costs.RATES_ENV, "1e9,2e-10,4e-10")
    assert costs.default_rates() == costs.Rates(1e9, 2e-10, 4e-10)
    monkeypatch.setenv(costs.RATES_ENV, "reference")
    assert costs.default_rates() == costs.reference_rates()
    monkeypatch.delenv(costs.RATES_ENV)
    assert costs.default_rates() is costs.measured_rates(jax.default_backend(), "float32")
    for bad in ("fast", "1,2", "1,0,3", "1,2,nan"):
        monkeypatch.setenv(costs.RATES_ENV, bad)
        with pytest.raises(ValueError, match=costs.RATES_ENV):
            costs.default_rates()
