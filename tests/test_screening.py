"""Gap-safe screening: never removes a gate of the optimum, and shrinks the solve."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from problem_bank import BANK, BANK_BY_NAME, CVXPY_REGS, build, cvxpy_reference, regularizer

from cvxdist import operators
from cvxdist.cli import main
from cvxdist.problems import lam_max, make_problem, restrict_gates
from cvxdist.screening import bucket_size, operator_norm_bounds, screen
from cvxdist.solvers import RESULTS, make_solver, solve
from cvxdist.solvers.phases import solve_phased

# At this λ a good part of the bank's gates is zero at the optimum.
LAM_FRAC = 0.3


def test_operator_norm_bounds_are_upper_bounds(x64):
    spec = BANK[0]
    X, _, G = spec.arrays()
    # Bounds on ||C^{1/2} A_i|| with C = 1/N: the data fit's metric.
    bounds = np.asarray(operator_norm_bounds(build(spec))) * np.sqrt(X.shape[0])
    masks = X @ G >= 0
    exact = np.array([np.linalg.norm(X * masks[:, [i]], 2) for i in range(G.shape[1])])
    frobenius = np.sqrt(masks.T.astype(float) @ np.sum(X * X, axis=1))
    assert np.all(bounds >= exact)
    np.testing.assert_allclose(bounds, np.minimum(frobenius, np.linalg.norm(X, 2)), rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "reg"),
    [("tall", reg) for reg in CVXPY_REGS]
    + [("skip_bias", "coupled"), ("chunked_recomputed", "one_vs_all")],
)
def test_never_screens_a_gate_of_the_cvxpy_optimum(x64, name, reg):
    full = build(BANK_BY_NAME[name])
    # The same problem with an all-live gate mask: the structure the screened solve compiles.
    problem = restrict_gates(full, np.arange(full.num_gates), full.num_gates)
    reg_obj = regularizer(reg)
    lam = jnp.asarray(LAM_FRAC * float(lam_max(full, reg_obj)))
    reference, U_star = cvxpy_reference(name, reg, float(lam))
    group_norms = np.linalg.norm(U_star, axis=(1, 2))
    nonzero = group_norms > 1e-3 * group_norms.max()  # CVXPY's zeros are ~1e-7, not 0
    bounds = operator_norm_bounds(problem)
    solver = make_solver("fista", reg_obj, problem)
    U = problem.zeros()
    for tol in (1e-2, 1e-5, 1e-10):  # iterates ever closer to the optimum
        U = solve_phased(solver, problem, lam, U, tol, 50_000, screen_gates=False).U
        test = screen(problem, reg_obj, lam, U, bounds)
        keep = np.asarray(test.keep)
        assert np.all(keep[nonzero]), (tol, np.flatnonzero(~keep & nonzero))
    # Not vacuous: at a 1e-10 gap, every zero gate whose dual constraint is not (nearly)
    # active at the optimum is removed.
    slack = np.asarray(test.slack) * np.asarray(bounds) / float(lam)
    assert np.sum(~nonzero) > 0 and np.all(~keep[~nonzero & (slack > 1e-3)])
    # And the screened solve reaches the CVXPY objective.
    solution = solve_phased(solver, full, lam, full.zeros(), 1e-9, 50_000)
    assert solution.result == RESULTS.successful
    assert abs(float(solution.stats.objective) - reference) <= 1e-6 * abs(reference)
    assert 0 < int(solution.stats.screened) <= int(np.sum(~nonzero))


def test_restricted_problem_pads_with_dead_gates(x64):
    problem = build(BANK[0])
    index = np.array([6, 1, 3])
    sub = restrict_gates(problem, index, 5)
    assert sub.num_gates == 5 and sub.X is problem.X
    np.testing.assert_array_equal(np.asarray(sub.gate_mask), [True, True, True, False, False])
    rng = np.random.default_rng(0)
    U = jnp.asarray(rng.standard_normal(sub.weight_shape))  # garbage in the dead slots
    full = jnp.zeros(problem.weight_shape).at[index].set(U[:3])
    np.testing.assert_allclose(operators.forward(sub, U), operators.forward(problem, full))
    R = operators.forward(problem, full)
    adjoint = np.asarray(operators.adjoint(sub, R))
    np.testing.assert_allclose(adjoint[:3], np.asarray(operators.adjoint(problem, R))[index])
    assert np.all(adjoint[3:] == 0)  # dead gates get no gradient: they stay at zero
    # Restricting twice composes (dead gates stay dead).
    again = restrict_gates(sub, np.array([0, 3]), 2)
    np.testing.assert_array_equal(np.asarray(again.gate_mask), [True, False])


def test_bucket_sizes():
    assert bucket_size(2000, 2000) == 2000
    assert bucket_size(1500, 2000) == 2000
    assert bucket_size(1000, 2000) == 1024
    assert bucket_size(65, 2000) == 128
    assert bucket_size(3, 2000) == 64
    assert bucket_size(3, 40) == 40
    assert bucket_size(3, 40, min_bucket=2) == 4


def planted(N=600, d=8, c=1, P=256, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    G_true = rng.standard_normal((d, 3))
    W_true = rng.standard_normal((3, d, c))
    Y = np.einsum(
        "np,npc->nc", (X @ G_true >= 0).astype(float), np.einsum("nd,pdc->npc", X, W_true)
    )
    Y = Y + 0.3 * rng.standard_normal(Y.shape)
    return X, Y, rng.standard_normal((d, P))


@pytest.mark.parametrize("reg", ["coupled"])
def test_screening_shrinks_the_problem_and_keeps_the_optimum(reg):
    X, Y, G = planted(c=2, P=64)
    problem = make_problem(X, Y, G)
    plain = solve(problem, lam_frac=0.3, reg=reg, tol=1e-5, max_iters=20_000)
    solver = make_solver("fista", reg, problem)
    lam = jnp.asarray(plain.stats.lam)
    screened = solve_phased(solver, problem, lam, problem.zeros(), 1e-5, 20_000, min_bucket=16)
    assert plain.converged and screened.result == plain.result
    assert float(screened.stats.rel_gap) <= 1e-5  # the full problem's certificate
    np.testing.assert_allclose(screened.stats.objective, plain.stats.objective, rtol=2e-5)
    assert int(screened.stats.screened) > problem.num_gates // 2
    # Screened gates are zero in the returned weights; active ones match the plain solve.
    norms = np.linalg.norm(np.asarray(screened.U), axis=(1, 2))
    assert np.sum(norms > 0) <= problem.num_gates - int(screened.stats.screened)
    assert int(screened.stats.active_gates) == int(plain.stats.active_gates)


def solve_on_the_command_line(tmp_path, capsys, arrays, tol, *flags):
    """``cvxdist solve`` at λ = 0.3 λ_max with ``flags``: its JSON record and the written U,
    after checking that the reported objective is that of the written weights (recomputed in
    numpy on the full problem)."""
    X, Y, G = arrays
    path = tmp_path / "problem.npz"
    np.savez(path, X=X, Y=Y, G=G)
    out = tmp_path / "sol.npz"
    args = ["solve", str(path), "--lam-frac", "0.3", "--tol", str(tol), "--out", str(out)]
    assert main([*args, *flags]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["converged"] and record["certificate"] <= tol
    U = np.load(out)["U"]
    pred = np.einsum("np,npc->nc", (X @ G >= 0), np.einsum("nd,pdc->npc", X, U))
    objective = 0.5 * np.sum((pred - Y) ** 2) / len(X)
    objective += record["lam"] * np.linalg.norm(U, axis=(1, 2)).sum()
    assert record["objective"] == pytest.approx(objective, rel=1e-4)
    return record, U


def test_cli_reports_screened(tmp_path, capsys):
    record, U = solve_on_the_command_line(tmp_path, capsys, planted(N=200, P=64), 1e-5, "--screen")
    assert 0 < record["screened"] < 64
    assert U.shape == (64, 8, 1)
    assert record["active_gates"] == int(np.sum(np.linalg.norm(U, axis=(1, 2)) > 0))
