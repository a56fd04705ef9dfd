"""ADMM: the kernel linear step, its three solvers, and the solve contract against CVXPY/FISTA."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problem_bank import BANK_BY_NAME, cvxpy_reference

from cvxdist import operators
from cvxdist.mapping import predict_convex
from cvxdist.problems import evaluate, lam_max, make_problem
from cvxdist.prox import get_regularizer
from cvxdist.solvers import RESULTS, Admm, solve, solve_batch, trace_count
from cvxdist.solvers.kernel import (
    apply_kernel,
    dense_kernel,
    nystrom,
    nystrom_precondition,
    pcg,
)

# Every test runs with 64-bit arrays (the conftest fixture), so checks can be tight.
pytestmark = pytest.mark.usefixtures("x64")

LAM_FRAC = 0.1


def build(name, **overrides):
    spec = BANK_BY_NAME[name]
    X, Y, G = spec.arrays()
    options = dict(
        skip=spec.skip,
        bias=spec.bias,
        chunk_rows=spec.chunk_rows,
        store_masks=spec.store_masks,
        dtype="float64",
    )
    options.update(overrides)
    return make_problem(X, Y, G, **options)


def padded_skip_bias_problem():
    """Skip and bias (projection in the kernel), padded chunks, recomputed masks."""
    X, Y, G = BANK_BY_NAME["skip_bias"].arrays()
    return make_problem(
        X, Y, G, skip=True, bias=True, chunk_rows=16, store_masks=False, dtype="float64"
    )


def lam_for(problem, reg, frac=LAM_FRAC):
    return frac * float(lam_max(problem, get_regularizer(reg)))


def explicit_B(problem):
    """``B = P⊥ A`` as an ``(N, P·d)`` matrix, from numpy (independent of the operators)."""
    X, _ = problem.rows()
    X = np.asarray(X)
    G = np.asarray(problem.G)
    masks = (X @ G >= 0).astype(float)
    A = (masks[:, :, None] * X[:, None, :]).reshape(X.shape[0], -1)
    columns = ([X] if problem.skip else []) + ([np.ones((len(X), 1))] if problem.bias else [])
    if columns:
        F = np.concatenate(columns, axis=1)
        A = A - F @ np.linalg.lstsq(F, A, rcond=None)[0]
    return A


# ------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("make", [lambda: build("tall"), padded_skip_bias_problem])
def test_kernel_is_B_Bt(make):
    problem = make()
    N = problem.num_rows
    B = explicit_B(problem)
    expected = B @ B.T
    kernel = np.asarray(dense_kernel(problem))
    # Padding rows (past N) have zero rows and columns.
    np.testing.assert_allclose(kernel[:N, :N], expected, rtol=1e-10, atol=1e-10)
    assert np.all(kernel[N:] == 0) and np.all(kernel[:, N:] == 0)
    V = np.random.default_rng(0).standard_normal((problem.num_chunks * problem.chunk_rows, 3))
    V[N:] = 0.0
    matrix_free = apply_kernel(
        problem, jnp.asarray(V).reshape(problem.num_chunks, problem.chunk_rows, 3)
    )
    np.testing.assert_allclose(
        np.asarray(matrix_free).reshape(-1, 3)[:N], expected @ V[:N], rtol=1e-9, atol=1e-10
    )


def test_nystrom_of_full_rank_reproduces_the_kernel_and_preconditions_exactly():
    problem = build("tall")
    kernel = dense_kernel(problem)
    rows = kernel.shape[0]
    sketch = jax.jit(
        lambda K, rank: nystrom(lambda V: K @ V, rows, rank, K.dtype, jax.random.PRNGKey(1)),
        static_argnums=1,
    )
    vecs, vals = sketch(kernel, rows)
    approx = (vecs * vals) @ vecs.T
    np.testing.assert_allclose(approx, kernel, atol=1e-8 * float(jnp.max(vals)))
    # Full rank: the preconditioned operator is (λ_min + μ) I, so one CG step solves.
    mu = 0.3
    b = jnp.asarray(np.random.default_rng(2).standard_normal((rows, 2)))
    solution, _, steps = pcg(
        lambda V: mu * V + kernel @ V,
        lambda R: nystrom_precondition(vecs, vals, mu, R),
        b,
        jnp.zeros_like(b),
        1e-10,
        50,
    )
    np.testing.assert_allclose(kernel @ solution + mu * solution, b, atol=1e-8)
    assert int(steps) <= 2
    # A rank-30 sketch captures the top of the spectrum (Frangella et al.: error ≲ tail).
    _, vals30 = sketch(kernel, 30)
    exact = np.sort(np.linalg.eigvalsh(np.asarray(kernel)))[::-1]
    assert np.all(np.asarray(vals30) <= exact[:30] * (1 + 1e-8) + 1e-9)
    assert float(vals30[0]) >= 0.9 * exact[0]


# ------------------------------------------------------------------------ solution quality
@pytest.mark.parametrize("name", ["tall", "skip_bias"])
@pytest.mark.parametrize("reg", ["coupled", "one_vs_all", "nuclear"])
def test_matches_cvxpy(name, reg):
    problem = build(name)
    lam = lam_for(problem, reg)
    reference, U_ref = cvxpy_reference(name, reg, lam)
    solution = solve(problem, lam, reg=reg, solver="admm", tol=1e-9, max_iters=20_000)
    assert solution.converged, solution.message
    assert abs(float(solution.stats.objective) - reference) <= 1e-6 * abs(reference)
    # The reported (W) iterate is exactly sparse where the optimum is.
    norms = np.linalg.norm(np.asarray(solution.U), axis=(1, 2))
    ref_norms = np.linalg.norm(U_ref, axis=(1, 2))
    assert np.all(norms[ref_norms < 1e-6 * ref_norms.max()] < 1e-6)
    assert np.any(norms == 0.0) or np.all(ref_norms > 1e-6 * ref_norms.max())


@pytest.mark.parametrize("reg", ["coupled", "one_vs_all"])
def test_agrees_with_fista_on_objective_and_predictions(reg):
    spec = BANK_BY_NAME["skip_bias"]
    problem = build("skip_bias")
    lam = lam_for(problem, reg)
    admm = solve(problem, lam, reg=reg, solver="admm", tol=1e-10, max_iters=20_000)
    fista = solve(problem, lam, reg=reg, solver="fista", tol=1e-10, max_iters=100_000)
    assert admm.converged and fista.converged
    np.testing.assert_allclose(admm.stats.objective, fista.stats.objective, rtol=1e-9)
    X, _, G = spec.arrays()
    np.testing.assert_allclose(
        predict_convex(admm, G, X), predict_convex(fista, G, X), rtol=1e-4, atol=1e-5
    )
    assert admm.weights.V is not None and admm.weights.b is not None


def test_linear_solvers_give_the_same_iterates():
    """Cholesky, eigendecomposition, Nyström-CG on the dense kernel and matrix-free
    Nyström-CG are the same ADMM: equal iterates after a fixed number of steps."""
    problem = padded_skip_bias_problem()
    reg = get_regularizer("one_vs_all")
    lam = lam_for(problem, "one_vs_all")
    runs = {}
    for method, dense_max_rows in (("cholesky", 8000), ("eigh", 8000), ("cg", 8000), ("cg", 0)):
        solver = Admm(reg=reg, linear_solver=method, dense_max_rows=dense_max_rows)
        assert solver.resolved_linear_solver(problem) == (method, dense_max_rows > 0)
        solution = solve(problem, lam, reg=reg, solver=solver, tol=1e-14, max_iters=40)
        assert int(solution.stats.iterations) == 40
        runs[(method, dense_max_rows)] = solution
    reference = runs[("cholesky", 8000)]
    assert float(reference.stats.rel_gap) < 1e-2  # 40 steps made real progress
    for key, solution in runs.items():
        np.testing.assert_allclose(
            solution.U, reference.U, atol=1e-7, rtol=1e-6, err_msg=f"{key} differs"
        )
        np.testing.assert_allclose(solution.stats.rel_gap, reference.stats.rel_gap, rtol=1e-5)


@pytest.mark.parametrize("adapt", ["none", "balance", "spectral"])
def test_reported_gap_bounds_true_suboptimality(adapt):
    name, reg = "tall", "coupled"
    problem = build(name)
    lam = lam_for(problem, reg)
    optimum, _ = cvxpy_reference(name, reg, lam)
    solver = Admm(reg=get_regularizer(reg), adapt=adapt, adapt_period=3, relaxation=1.5)
    previous = np.inf
    for tol in (1e-1, 1e-3, 1e-8):
        solution = solve(problem, lam, reg=reg, solver=solver, tol=tol, max_iters=20_000)
        assert solution.converged, solution.message
        primal = float(solution.stats.objective)
        gap = float(solution.stats.rel_gap)
        assert gap <= tol
        assert (primal - optimum) / primal <= gap + 1e-9
        assert primal <= previous + 1e-12
        previous = primal
    assert (primal - optimum) / primal < 1e-7


def test_certificate_is_the_gap_at_the_returned_weights():
    """The stopping rule is problems.evaluate at W with W's own residual and gradient."""
    problem = padded_skip_bias_problem()
    reg = get_regularizer("coupled")
    lam = lam_for(problem, "coupled")
    solution = solve(problem, lam, reg=reg, solver="admm", tol=1e-4)
    r, _ = operators.residual(problem, solution.U)
    grad = -operators.adjoint(problem, r) / problem.num_rows
    ev = evaluate(problem, reg, jnp.asarray(lam), solution.U, r, grad)
    np.testing.assert_allclose(solution.stats.rel_gap, ev.rel_gap, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(solution.stats.objective, ev.primal, rtol=1e-12)
    assert float(ev.rel_gap) <= 1e-4


# ----------------------------------------------------------------- compilation and batching
def test_new_lambda_and_rho_do_not_recompile():
    problem = build("single_output", dtype="float32")
    reg = get_regularizer("coupled")
    solve(problem, lam_frac=0.3, solver=Admm(reg=reg, rho=0.01), tol=1e-3)
    before = trace_count()
    for frac, rho in ((0.2, 0.02), (0.05, 0.003), (0.011, 0.05)):
        solution = solve(problem, lam_frac=frac, solver=Admm(reg=reg, rho=rho), tol=1e-3)
        assert solution.converged, solution.message
        np.testing.assert_allclose(solution.stats.step, rho, rtol=1e-6)
    assert trace_count() == before


def test_vmapped_lambda_grid_with_cg_equals_python_loop():
    problem = build("wide")
    reg = get_regularizer("one_vs_all")
    solver = Admm(reg=reg, linear_solver="cg")
    lams = lam_for(problem, "one_vs_all", 1.0) * np.array([0.5, 0.1, 0.02])
    batch = solve_batch(problem, lams, reg=reg, solver=solver, tol=1e-9, max_iters=20_000)
    assert bool(jnp.all(batch.converged))
    iterations = np.asarray(batch.stats.iterations)
    assert len(set(iterations.tolist())) > 1  # lanes stop on their own
    for lane, lam in enumerate(lams):
        single = solve(problem, lam, reg=reg, solver=solver, tol=1e-9, max_iters=20_000)
        assert int(single.stats.iterations) == iterations[lane]
        np.testing.assert_allclose(batch.weights.U[lane], single.weights.U, atol=1e-8)


def test_compiled_loop_equals_python_steps():
    """The bounded lax.while_loop runs exactly the jitted step (guards against loop
    miscompilation: a lax.scan with per-step outputs was seen to miscompile on XLA CPU)."""
    problem = build("chunked_recomputed")
    reg = get_regularizer("coupled")
    lam = jnp.asarray(lam_for(problem, "coupled"))
    solver = Admm(reg=reg, adapt="spectral", adapt_period=2)
    solution = solve(problem, float(lam), reg=reg, solver=solver, tol=1e-14, max_iters=12)
    state = eqx.filter_jit(solver.init)(problem, problem.zeros(), lam)
    step = eqx.filter_jit(solver.step)
    for _ in range(12):
        state = step(problem, lam, state)
    np.testing.assert_allclose(solution.U, state.W, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(solution.stats.step, state.rho, rtol=1e-12)
    # Every penalty change refactors the Cholesky factor at the next step.
    assert int(state.rho_updates) >= 1
    assert int(state.rho_updates) - 1 <= int(state.refactors) <= int(state.rho_updates)


def test_warm_start_at_the_optimum_stops_at_once():
    problem = build("tall")
    lam = lam_for(problem, "one_vs_all")
    first = solve(problem, lam, reg="one_vs_all", solver="admm", tol=1e-10, max_iters=20_000)
    again = solve(problem, lam, reg="one_vs_all", solver="admm", tol=1e-10, init=first)
    assert int(again.stats.iterations) <= 1
    assert again.converged


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(linear_solver="qr"), "linear_solver"),
        (dict(adapt="magic"), "adapt"),
        (dict(relaxation=2.0), "relaxation"),
        (dict(rho=-1.0), "rho"),
        (dict(rho=float("nan")), "rho"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        Admm(reg=get_regularizer("coupled"), **options)


def test_dense_solver_on_too_many_rows_says_what_to_do():
    problem = build("tall")
    solver = Admm(reg=get_regularizer("coupled"), linear_solver="cholesky", dense_max_rows=10)
    with pytest.raises(ValueError, match="dense_max_rows"):
        solve(problem, lam_frac=0.1, solver=solver)
    auto = Admm(reg=get_regularizer("coupled"), dense_max_rows=10)
    assert auto.resolved_linear_solver(problem) == ("cg", False)


def test_nonfinite_start_is_reported():
    problem = build("tall")
    bad = jnp.full(problem.weight_shape, jnp.nan)
    solution = solve(problem, lam_frac=0.1, solver="admm", init=bad)
    assert solution.result == RESULTS.nonfinite
