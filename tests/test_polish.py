"""A float32 solve ends honestly: it reaches float32's accuracy, and a tol below what float32
can certify is finished and certified in float64 (or stops at that floor, saying so)."""

from __future__ import annotations

import json

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist.cli import main
from cvxdist.problems import lam_max, make_problem
from cvxdist.prox import Coupled
from cvxdist.solvers import RESULTS, Fista, iterate, solve, solve_path
from cvxdist.solvers.polish import certifiable_gap


def issue_arrays(skip: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The problem of the float32 floor: N=200 d=8 c=2 P=16, rounded to float32 (the data the
    float32 solve sees; the references below work on these values in float64)."""
    rng = np.random.default_rng(0)
    X, Y, G = (
        rng.standard_normal((200, 8)),
        rng.standard_normal((200, 2)),
        rng.standard_normal((8, 16)),
    )
    if skip:  # a target with a linear part, so that the skip and bias matter
        Y = Y + X @ rng.standard_normal((8, 2)) + 3.0
    return tuple(np.asarray(a, np.float32).astype(np.float64) for a in (X, Y, G))


def reference_gap(X, Y, G, U, lam, skip=False, bias=False) -> tuple[float, float]:
    """Relative duality gap and objective of ``coupled`` at ``U``, in float64 numpy."""
    U = np.asarray(U, np.float64)
    N = len(X)
    masks = (X @ G >= 0).astype(float)
    r = Y - np.einsum("np,npc->nc", masks, np.einsum("nd,pdc->npc", X, U))
    columns = ([X] if skip else []) + ([np.ones((N, 1))] if bias else [])
    if columns:  # the skip and bias are the least-squares fit of the residual
        F = np.concatenate(columns, axis=1)
        r = r - F @ np.linalg.lstsq(F, r, rcond=None)[0]
    loss = 0.5 * np.sum(r * r) / N
    primal = loss + lam * np.linalg.norm(U, axis=(1, 2)).sum()
    grad = -np.einsum("nd,np,nc->pdc", X, masks, r) / N
    feasible = min(1.0, lam / np.linalg.norm(grad, axis=(1, 2)).max())
    s = np.clip(np.sum(r * Y) / np.sum(r * r), 0.0, feasible)
    dual = s * np.sum(r * Y) / N - s * s * loss
    return (primal - dual) / primal, primal


@pytest.fixture(scope="module")
def float32_problem():
    X, Y, G = issue_arrays()
    problem = make_problem(X, Y, G, dtype="float32")
    # The reference must see the same masks as the float32 problem.
    np.testing.assert_array_equal(problem.masks[0], X @ G >= 0)
    lam = float(jnp.float32(0.1 * float(lam_max(problem, Coupled()))))
    return problem, (X, Y, G), lam


def test_float32_iterates_reach_float32_accuracy(float32_problem):
    """R-FISTA's line search does not decide on rounding noise: run past convergence, the
    float32 iterate stays at float32 accuracy (it used to wander between gaps of 1e-6 and 7e-3,
    3e-4 after 600 iterations)."""
    problem, (X, Y, G), lam = float32_problem
    run = eqx.filter_jit(iterate)  # ints are static
    solution = run(
        Fista(Coupled()), problem, jnp.float32(lam), problem.zeros(), jnp.float32(-1), 600
    )
    assert int(solution.stats.iterations) == 600 and solution.U.dtype == jnp.float32
    gap, _ = reference_gap(X, Y, G, solution.U, lam)
    assert gap <= 1e-5


def test_tol_below_the_float32_floor_is_certified_in_float64(tmp_path, capsys):
    """The issue's command: float32, tol 1e-7 (10,000 iterations and 'not converged' before)."""
    X, Y, G = issue_arrays()
    path, out = tmp_path / "problem.npz", tmp_path / "sol.npz"
    np.savez(path, X=X, Y=Y, G=G)
    args = ["solve", str(path), "--lam-frac", "0.1", "--tol", "1e-7", "--out", str(out)]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["converged"] and record["certificate"] <= 1e-7
    assert record["certificate_dtype"] == "float64" and record["dtype"] == "float32"
    assert record["iterations"] <= 400  # float64 alone needs 207
    U = np.load(out)["U"]
    assert U.dtype == np.float64
    gap, objective = reference_gap(X, Y, G, U, record["lam"])
    assert gap <= 1.01e-7
    assert record["objective"] == pytest.approx(objective, rel=1e-12)


def test_skip_and_bias_are_polished_with_a_float64_projection():
    X, Y, G = issue_arrays(skip=True)
    problem = make_problem(X, Y, G, skip=True, bias=True, dtype="float32")
    solution = solve(problem, lam_frac=0.1, tol=1e-9, max_iters=2000)
    assert solution.converged, solution.message
    assert solution.U.dtype == jnp.float64 and float(solution.stats.rel_gap) <= 1e-9
    gap, objective = reference_gap(X, Y, G, solution.U, float(solution.stats.lam), True, True)
    assert gap <= 1.01e-9
    np.testing.assert_allclose(float(solution.stats.objective), objective, rtol=1e-12)


def test_without_polish_the_solve_stops_at_the_floor_and_says_so(float32_problem):
    problem, (X, Y, G), lam = float32_problem
    solution = solve(problem, lam, tol=1e-7, polish=False)
    assert solution.result == RESULTS.precision_floor and not solution.converged
    assert "float32" in solution.message and "1.5e-5" in solution.message
    assert int(solution.stats.iterations) <= 300 and solution.U.dtype == jnp.float32
    gap, _ = reference_gap(X, Y, G, solution.U, lam)
    assert gap <= 1.1 * certifiable_gap(jnp.float32)


def test_default_tol_stays_in_float32_and_is_honest(float32_problem):
    problem, (X, Y, G), lam = float32_problem
    solution = solve(problem, lam)
    assert solution.converged and solution.U.dtype == jnp.float32
    assert int(solution.stats.iterations) <= 100
    gap, _ = reference_gap(X, Y, G, solution.U, lam)
    assert gap <= 1e-3
    np.testing.assert_allclose(gap, float(solution.stats.rel_gap), rtol=1e-3)


def test_path_polishes_every_lambda_and_warm_starts_in_float32(float32_problem):
    problem, (X, Y, G), _ = float32_problem
    path = solve_path(problem, lam_fracs=[0.2, 0.1], tol=1e-8, progress=False)
    for solution in path:
        assert solution.converged and solution.U.dtype == jnp.float64
        gap, _ = reference_gap(X, Y, G, solution.U, float(solution.stats.lam))
        assert gap <= 1.01e-8
