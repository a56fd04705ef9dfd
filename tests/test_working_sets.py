"""Working sets and strong-rule paths: against CVXPY, with exact certificates, few compiles."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from problem_bank import BANK_BY_NAME, ELASTIC_ALPHA, cvxpy_reference
from test_composed import build as build_composed
from test_composed import cvxpy_optimum
from test_screening import build, planted, solve_on_the_command_line

from cvxdist.duality import certify, lam_max
from cvxdist.problems import make_problem
from cvxdist.prox import GroupElastic, get_regularizer
from cvxdist.solvers import make_solver, solve, solve_path, trace_count
from cvxdist.solvers.phases import solve_phased


def regularizer(name):
    return GroupElastic(alpha=ELASTIC_ALPHA) if name == "group_elastic" else get_regularizer(name)


def phased(problem, reg, lam, tol, **options):
    solver = make_solver("fista", reg, problem)
    options.setdefault("min_bucket", 2)  # the bank's problems have 6-12 gates
    return solve_phased(solver, problem, jnp.asarray(lam), problem.zeros(), tol, 50_000, **options)


def assert_certified(problem, reg, solution, tol):
    """The reported gap is the one recomputed on the full problem at the returned weights."""
    again = certify(problem, reg, solution.stats.lam, solution.U).evaluation
    np.testing.assert_allclose(solution.stats.rel_gap, again.rel_gap, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(solution.stats.objective, again.primal, rtol=1e-12)
    assert float(again.rel_gap) <= tol


def assert_path_matches_cvxpy(problem, name, reg, fracs, path, tol=1e-9):
    """Every solution of a λ path (``fracs`` of λ_max) at the CVXPY optimum, certified."""
    reg_obj = regularizer(reg)
    lmax = float(lam_max(problem, reg_obj))
    for frac, solution in zip(fracs, path):
        reference, _ = cvxpy_reference(name, reg, frac * lmax)
        assert solution.converged, solution.message
        assert abs(float(solution.stats.objective) - reference) <= 1e-6 * abs(reference)
        assert_certified(problem, reg_obj, solution, tol)


@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.parametrize(
    ("name", "reg"),
    [
        # the reference table's fista-working-set rows solve `tall` (every regularizer), its
        # fista-working-set-narrow rows `single_output` with screening, against CVXPY
        pytest.param("tall", "coupled", marks=pytest.mark.slow),
        pytest.param("tall", "nuclear", marks=pytest.mark.slow),
        pytest.param("single_output", "one_vs_all", marks=pytest.mark.slow),
        ("skip_bias", "group_elastic"),
        ("chunked_recomputed", "coupled"),
    ],
)
def test_working_sets_reach_the_cvxpy_optimum(x64, name, reg, screen):
    problem = build(BANK_BY_NAME[name])
    reg_obj = regularizer(reg)
    lam = 0.1 * float(lam_max(problem, reg_obj))
    reference, _ = cvxpy_reference(name, reg, lam)
    solution = phased(problem, reg_obj, lam, 1e-9, working_set=True, screen_gates=screen)
    assert solution.converged, solution.message
    assert abs(float(solution.stats.objective) - reference) <= 1e-6 * abs(reference)
    assert_certified(problem, reg_obj, solution, 1e-9)
    # Narrower phases ran, and the work is counted in full-width iterations.
    assert 0 < int(solution.stats.working_set) <= problem.num_gates
    assert 0 < float(solution.stats.iteration_equivalents)


@pytest.mark.parametrize(  # the reference table's fista-working-set rows solve all three
    "name",
    [
        pytest.param("pooled_head", marks=pytest.mark.slow),
        "weighted_sum",
        pytest.param("per_group", marks=pytest.mark.slow),
    ],
)
def test_working_sets_on_composed_problems(x64, name):
    problem = build_composed(name, True, True)
    reg = get_regularizer("coupled")
    lam = 0.1 * float(lam_max(problem, reg))
    solution = phased(problem, reg, lam, 1e-9, working_set=True, screen_gates=True)
    assert solution.converged, solution.message
    reference = cvxpy_optimum(name, True, True, "coupled", lam)
    assert abs(float(solution.stats.objective) - reference) <= 1e-6 * abs(reference)
    assert_certified(problem, reg, solution, 1e-9)
    assert 0 < int(solution.stats.working_set) <= problem.num_gates


def test_working_sets_narrow_the_solve_of_a_sparse_problem():
    X, Y, G = planted(N=600, d=8, c=2, P=512)
    problem = make_problem(X, Y, G)
    plain = solve(problem, lam_frac=0.2, tol=1e-4)
    narrow = solve(problem, lam_frac=0.2, tol=1e-4, working_set=True)
    assert plain.converged and narrow.converged, narrow.message
    assert float(narrow.stats.rel_gap) <= 1e-4
    np.testing.assert_allclose(narrow.stats.objective, plain.stats.objective, rtol=2e-4)
    # Every phase ran on at most a quarter of the gates: less than half the full-width work.
    assert int(narrow.stats.working_set) <= 128
    assert float(narrow.stats.iteration_equivalents) < 0.5 * int(plain.stats.iterations)


def test_recompiles_are_bounded_by_the_buckets():
    """A new λ compiles at most one program per gate bucket (64, 128, 256 here): once every
    bucket has been seen, further λ compile nothing."""
    X, Y, G = planted(N=400, d=8, c=1, P=256, seed=1)
    problem = make_problem(X, Y, G)
    solve(problem, lam_frac=0.5, tol=1e-3, working_set=True)
    before = trace_count()
    fracs = (0.3, 0.1, 0.05, 0.02)
    for frac in fracs:
        solve(problem, lam_frac=frac, tol=1e-3, working_set=True)
    assert trace_count() - before <= 3
    settled = trace_count()
    for frac in fracs:
        solve(problem, lam_frac=frac * 1.1, tol=1e-3, working_set=True)
    assert trace_count() == settled


@pytest.mark.parametrize("reg", ["coupled", "one_vs_all"])
def test_strong_rule_path_matches_cvxpy(x64, reg):
    problem = build(BANK_BY_NAME["single_output"])
    fracs = (0.5, 0.2, 0.1)
    path = solve_path(problem, lam_fracs=fracs, reg=reg, tol=1e-9, progress=False)
    assert_path_matches_cvxpy(problem, "single_output", reg, fracs, path)


def test_strong_rule_path_on_a_composed_problem(x64):
    problem = build_composed("pooled", False, True)
    reg = get_regularizer("nuclear")
    lmax = float(lam_max(problem, reg))
    path = solve_path(problem, lam_fracs=(0.4, 0.1), reg=reg, tol=1e-9, progress=False)
    for frac, solution in zip((0.4, 0.1), path):
        reference = cvxpy_optimum("pooled", False, True, "nuclear", frac * lmax)
        assert abs(float(solution.stats.objective) - reference) <= 1e-6 * abs(reference)
        assert_certified(problem, reg, solution, 1e-9)


def test_strong_rule_path_solves_narrow_and_equals_the_full_width_path():
    X, Y, G = planted(N=500, d=8, c=2, P=512, seed=2)
    problem = make_problem(X, Y, G)
    fracs = (0.5, 0.45, 0.4)  # a fine grid, as the strong rule wants
    strong = solve_path(problem, lam_fracs=fracs, tol=1e-5, progress=False)
    full = solve_path(problem, lam_fracs=fracs, tol=1e-5, progress=False, strong=False)
    for a, b in zip(strong, full):
        assert a.converged and b.converged
        np.testing.assert_allclose(a.stats.objective, b.stats.objective, rtol=2e-5)
    # From λ_max to 0.5 λ_max the strong set is every gate (2λ - λ_prev = 0); after that the
    # strong sets are narrow, and so is the work.
    for a, b in zip(strong[1:], full[1:]):
        assert 0 < int(a.stats.working_set) < problem.num_gates
        assert float(a.stats.iteration_equivalents) < int(b.stats.iterations)


def test_cli_solves_on_working_sets(tmp_path, capsys):
    arrays = planted(N=300, d=6, c=1, P=256, seed=3)
    record, _ = solve_on_the_command_line(tmp_path, capsys, arrays, 1e-4, "--working-set")
    assert 0 < record["working_set"] < 256 and record["iteration_equivalents"] > 0
