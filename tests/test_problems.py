"""The problem's λ_max and certificate against numpy closed forms and CVXPY."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problem_bank import (
    BANK,
    CVXPY_REGS,
    BankProblem,
    build,
    cvxpy_solution,
    dual_norm_numpy,
    regularizer,
)

from cvxdist.problems import certify, lam_max
from cvxdist.solvers import solve


def _lam_max_numpy(spec: BankProblem, reg: str) -> float:
    """λ_max = R°(Aᵀ Ỹ / N) with Ỹ the targets with the skip/bias least squares removed."""
    X, Y, G = spec.arrays()
    N = len(X)
    free = [X] * spec.skip + [np.ones((N, 1))] * spec.bias
    if free:
        F = np.concatenate(free, axis=1)
        Y = Y - F @ np.linalg.lstsq(F, Y, rcond=None)[0]
    masks = (X @ G >= 0).astype(float)
    Z = np.einsum("nd,np,nc->pdc", X, masks, Y) / N
    return dual_norm_numpy(reg, Z)


@pytest.mark.parametrize("reg", CVXPY_REGS)
@pytest.mark.parametrize("spec", BANK, ids=lambda s: s.name)
def test_lam_max_matches_the_closed_form(x64, spec, reg):
    ours = float(lam_max(build(spec), regularizer(reg)))
    np.testing.assert_allclose(ours, _lam_max_numpy(spec, reg), rtol=1e-10)


def test_lam_max_is_where_the_cvxpy_optimum_becomes_zero(x64):
    spec = BANK[2]  # skip and bias: the projection matters
    lmax = _lam_max_numpy(spec, "coupled")
    _, above = cvxpy_solution(spec, "coupled", 1.01 * lmax)
    _, below = cvxpy_solution(spec, "coupled", 0.9 * lmax)
    assert np.abs(above).max() < 1e-3 * np.abs(below).max()  # zero up to CVXPY accuracy


shapes = st.sampled_from([(24, 3, 2, 5), (40, 4, 1, 8)])


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    shape=shapes,
    seed=st.integers(0, 10_000),
    unregularized=st.booleans(),
    reg=st.sampled_from(CVXPY_REGS),
    frac=st.floats(0.01, 0.9),
    solver=st.sampled_from(["fista", "admm"]),
    stop=st.sampled_from([(0.3, 10_000), (1e-2, 10_000), (1e-6, 4)]),
)
def test_reported_gap_bounds_the_true_suboptimality(
    x64, shape, seed, unregularized, reg, frac, solver, stop
):
    # F(U) − F* ≤ F(U) − D = rel_gap · F(U) for any U the solver returns, converged or not
    # (stopped by tol, or after 4 iterations): so (F − F*)/F* ≤ rel_gap / (1 − rel_gap),
    # which is rel_gap to first order. F* comes from CVXPY, F(U) from numpy.
    N, d, c, P = shape
    spec = BankProblem("random", N, d, c, P, skip=unregularized, bias=unregularized, seed=seed)
    problem = build(spec)
    lam = frac * _lam_max_numpy(spec, reg)
    tol, max_iters = stop
    solution = solve(
        problem, lam, reg=regularizer(reg), solver=solver, tol=tol, max_iters=max_iters
    )
    w, stats = solution.weights, solution.stats
    optimum, _ = cvxpy_solution(spec, reg, lam)
    primal = spec.objective(reg, lam, w.U, w.V, w.b)
    gap = float(stats.rel_gap)
    assert abs(float(stats.objective) - primal) <= 1e-9 * primal
    assert float(stats.dual_objective) <= optimum * (1 + 1e-7)  # weak duality
    assert primal - optimum <= gap * primal + 1e-7 * optimum
    if gap < 1:
        assert (primal - optimum) / optimum <= gap / (1 - gap) + 1e-7
    if solution.converged:
        assert gap <= tol
    # certify() at the returned weights reproduces the reported certificate.
    again = certify(problem, regularizer(reg), stats.lam, w.U).evaluation
    np.testing.assert_allclose(float(again.rel_gap), gap, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("path", [False, True])
def test_gates_inside_the_skip_span_give_zero_weights_not_noise(path):
    # Every gate is on for every row (x_0 = 1), so each gate's features are X, which the
    # skip already spans: the data fit does not depend on U and the optimum is U = 0 with the
    # skip's least-squares fit. Before the guard, a float32 R-FISTA at a small λ chased
    # rounding noise (step 6.5e8, NaN after 5 iterations on a pooled-feature student).
    from cvxdist.problems import make_problem
    from cvxdist.solvers import solve_path

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 5)).astype(np.float32)
    X[:, 0] = 1.0
    Y = rng.standard_normal((60, 3)).astype(np.float32)
    G = np.zeros((5, 4), np.float32)
    G[0] = [1.0, 2.0, 0.5, 3.0]
    problem = make_problem(X, Y, G, skip=True, bias=True)
    with pytest.warns(UserWarning, match="rounding"):
        if path:
            sol = solve_path(problem, lam_fracs=[0.1, 0.001], reg="coupled")[-1]
        else:
            sol = solve(problem, lam_frac=0.001, reg="coupled")
    assert np.all(np.asarray(sol.U) == 0)
    features = np.c_[X.astype(np.float64), np.ones(60)]
    fit = features @ np.linalg.lstsq(features, Y.astype(np.float64), rcond=None)[0]
    expected = 0.5 * np.sum((fit - Y) ** 2) / 60
    assert np.isfinite(float(sol.stats.rel_gap))
    assert float(sol.stats.objective) == pytest.approx(expected, rel=1e-5)
