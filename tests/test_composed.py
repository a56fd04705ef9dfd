"""Composed data terms (pooling, heads, per-group Jacobians, weighted sums) against CVXPY.

Every composition is solved by R-FISTA in float64 and compared with the CVXPY optimum of the
same objective written from scratch in numpy/CVXPY (the readouts as explicit matrices, not
through cvxdist); the objective must agree to 1e-6 relative.
"""

from __future__ import annotations

import functools

import cvxpy as cp
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist.composed import data_term, gated_rows, make_composed, pooled_rows
from cvxdist.duality import certify, lam_max
from cvxdist.problems import make_problem
from cvxdist.prox import get_regularizer
from cvxdist.readouts import Dense, GroupMean, Identity, PerGroup
from cvxdist.solvers import solve, solve_path, trace_count

GROUPS, L, D, C, P, K_OUT = 10, 4, 4, 3, 6, 2


@functools.cache
def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((GROUPS * L, D))
    G = rng.standard_normal((D, P))
    Y = np.tanh(X @ rng.standard_normal((D, C))) + 0.1 * rng.standard_normal((GROUPS * L, C))
    H = rng.standard_normal((C, K_OUT))
    J = rng.standard_normal((GROUPS, K_OUT, L * C)) / L
    return X, G, Y, H, J


def pooled_targets(Y, H):
    return Y.reshape(GROUPS, L, C).mean(axis=1) @ H


def jacobian_targets(Y, J):
    return np.einsum("gal,gl->ga", J, Y.reshape(GROUPS, L * C))


# ---- the compositions, built through cvxdist, and the same objective in CVXPY -------------

COMPOSITIONS = ("pooled", "pooled_features", "head", "pooled_head", "per_group", "weighted_sum")


def build(name: str, skip: bool, bias: bool, dtype="float64"):
    X, G, Y, H, J = data()
    rows = functools.partial(gated_rows, X, G, C, skip=skip, bias=bias, dtype=dtype)
    if name == "pooled":
        pooled = Y.reshape(GROUPS, L, C).mean(axis=1)
        terms = [data_term(rows(group_size=L, chunk_groups=3), GroupMean(L), pooled)]
    elif name == "pooled_features":
        features = pooled_rows(
            X.reshape(GROUPS, L, D), G, C, skip=skip, bias=bias, chunk_groups=4, dtype=dtype
        )
        terms = [data_term(features, Dense(jnp.asarray(H, dtype)), pooled_targets(Y, H))]
    elif name == "head":
        terms = [data_term(rows(chunk_groups=7), Dense(jnp.asarray(H, dtype)), Y @ H)]
    elif name == "pooled_head":
        readout = Dense(jnp.asarray(H, dtype)) @ GroupMean(L)
        terms = [data_term(rows(group_size=L, chunk_groups=4), readout, pooled_targets(Y, H))]
    elif name == "per_group":
        chunked = rows(group_size=L, chunk_groups=5)
        J_chunks = jnp.asarray(J.reshape(2, 5, K_OUT, L * C), dtype)
        terms = [data_term(chunked, PerGroup(J_chunks, L), jacobian_targets(Y, J))]
    else:  # activations + head logits, weighted 1 : 3
        readout = Dense(jnp.asarray(H, dtype)) @ GroupMean(L)
        terms = [
            data_term(rows(chunk_groups=11), Identity(), Y, weight=1.0),
            data_term(rows(group_size=L, chunk_groups=10), readout, pooled_targets(Y, H), 3.0),
        ]
    return make_composed(terms, skip=skip, bias=bias)


def _penalty(reg: str, blocks: list) -> cp.Expression:
    if reg == "coupled":
        return sum(cp.norm(u, "fro") for u in blocks)
    return sum(cp.normNuc(u) for u in blocks)


@functools.cache
def cvxpy_optimum(name: str, skip: bool, bias: bool, reg: str, lam: float) -> float:
    X, G, Y, H, J = data()
    masks = (X @ G >= 0).astype(float)
    blocks = [cp.Variable((D, C)) for _ in range(P)]
    s = sum(cp.multiply(masks[:, [i]], X @ u) for i, u in enumerate(blocks))
    if skip:
        s = s + X @ cp.Variable((D, C))
    if bias:
        s = s + np.ones((GROUPS * L, 1)) @ cp.Variable((1, C))
    pool = np.kron(np.eye(GROUPS), np.full((1, L), 1.0 / L))  # (groups, groups·L)

    def term(readout: cp.Expression, target: np.ndarray) -> cp.Expression:
        return cp.sum_squares(readout - target) / (2 * len(target))

    if name in ("pooled",):
        fit = term(pool @ s, Y.reshape(GROUPS, L, C).mean(axis=1))
    elif name in ("pooled_features", "pooled_head"):
        fit = term(pool @ s @ H, pooled_targets(Y, H))
    elif name == "head":
        fit = term(s @ H, Y @ H)
    elif name == "per_group":
        outputs = cp.vstack(
            [
                sum(J[g][:, l * C : (l + 1) * C] @ s[g * L + l] for l in range(L))
                for g in range(GROUPS)
            ]
        )
        fit = term(outputs, jacobian_targets(Y, J))
    else:
        fit = term(s, Y) + 3.0 * term(pool @ s @ H, pooled_targets(Y, H))
    problem = cp.Problem(cp.Minimize(fit + lam * _penalty(reg, blocks)))
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == cp.OPTIMAL, problem.status
    return float(problem.value)


# By default every composition with skip and bias under `coupled`; the other 18 cases are
# slow (the reference table solves per_group, weighted_sum and pooled_head under several
# regularizers, nuclear included, on every solver path that takes them).
@pytest.mark.parametrize("reg", ["coupled", pytest.param("nuclear", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    ("skip", "bias"), [pytest.param(False, False, marks=pytest.mark.slow), (True, True)]
)
@pytest.mark.parametrize("name", COMPOSITIONS)
def test_composition_matches_cvxpy(x64, name, skip, bias, reg):
    problem = build(name, skip, bias)
    regularizer = get_regularizer(reg)
    lam = 0.1 * float(lam_max(problem, regularizer))
    solution = solve(problem, lam, reg=regularizer, solver="auto", tol=1e-8, max_iters=50_000)
    assert solution.converged, solution.message
    reference = cvxpy_optimum(name, skip, bias, reg, lam)
    objective = float(solution.stats.objective)
    assert abs(objective - reference) <= 1e-6 * abs(reference)
    # The reported gap bounds the true suboptimality (CVXPY is accurate to ~1e-8 here).
    assert objective - reference <= float(solution.stats.rel_gap) * objective + 1e-8 * reference


def test_one_identity_term_is_the_plain_problem(x64):
    X, G, Y, *_ = data()
    plain = make_problem(X, Y, G, skip=True, bias=True, chunk_rows=13)
    composed = make_composed(
        [data_term(gated_rows(X, G, C, skip=True, bias=True, chunk_groups=13), Identity(), Y)],
        skip=True,
        bias=True,
    )
    reg = get_regularizer("coupled")
    np.testing.assert_allclose(lam_max(composed, reg), lam_max(plain, reg), rtol=1e-12)
    U = jnp.asarray(np.random.default_rng(1).standard_normal((P, D, C)))
    a, b = certify(plain, reg, 0.05, U), certify(composed, reg, 0.05, U)
    for field in ("primal", "dual", "rel_gap"):
        np.testing.assert_allclose(getattr(b.evaluation, field), getattr(a.evaluation, field))
    np.testing.assert_allclose(b.grad, a.grad, atol=1e-12)
    np.testing.assert_allclose(b.beta, a.beta, atol=1e-12)


def test_pooled_features_equal_pooling_the_location_rows(x64):
    X, G, *_ = data()
    features = pooled_rows(X.reshape(GROUPS, L, D), G, C, skip=True, bias=True, chunk_groups=4)
    locations = gated_rows(X, G, C, group_size=L, chunk_groups=4, skip=True, bias=True)
    # Both: 3 chunks of 4 groups, the last two groups padding.
    U = jnp.asarray(np.random.default_rng(2).standard_normal((P, D, C)))
    pooled = GroupMean(L).mv(locations.forward(U))
    np.testing.assert_allclose(features.forward(U), pooled, atol=1e-12)
    R = np.random.default_rng(3).standard_normal((3, 4, C)) * np.asarray(features.valid)[..., None]
    expected = locations.adjoint(GroupMean(L).transpose_mv(jnp.asarray(R)))
    np.testing.assert_allclose(features.adjoint(jnp.asarray(R)), expected, atol=1e-12)
    beta = jnp.asarray(np.random.default_rng(5).standard_normal((D + 1, C)))
    np.testing.assert_allclose(
        features.unregularized_forward(beta),
        GroupMean(L).mv(locations.unregularized_forward(beta)),
        atol=1e-12,
    )


READOUTS = {
    "identity": lambda: Identity(),
    "mean": lambda: GroupMean(L),
    "dense": lambda: Dense(jnp.asarray(data()[3])),
    "dense_mean": lambda: Dense(jnp.asarray(data()[3])) @ GroupMean(L),
    "per_group": lambda: PerGroup(jnp.asarray(data()[4].reshape(2, 5, K_OUT, L * C)), L),
}


@pytest.mark.parametrize("name", READOUTS)
def test_readout_adjoint_matrix_and_norm_bound(x64, name):
    readout = READOUTS[name]()  # built under x64
    shape = (2, 5 * L, C)
    matrix = np.asarray(readout.as_matrix(shape))
    rng = np.random.default_rng(4)
    s = rng.standard_normal(shape)
    out = np.asarray(readout.mv(jnp.asarray(s)))
    np.testing.assert_allclose(out.ravel(), matrix @ s.ravel(), atol=1e-12)
    r = rng.standard_normal(out.shape)
    np.testing.assert_allclose(
        np.asarray(readout.transpose_mv(jnp.asarray(r))).ravel(), matrix.T @ r.ravel(), atol=1e-12
    )
    true_norm = np.linalg.norm(matrix, 2)
    assert true_norm <= float(readout.norm_bound()) * (1 + 1e-9)
    assert float(readout.norm_bound()) <= true_norm * (1 + 1e-9) + 1e-12  # tight for these


@pytest.mark.parametrize("name", ["pooled_head", "weighted_sum", "per_group"])
def test_lam_max_is_where_the_zero_model_becomes_optimal(x64, name):
    problem = build(name, True, True)
    reg = get_regularizer("coupled")
    lmax = float(lam_max(problem, reg))
    with pytest.warns(UserWarning, match="every gate is pruned"):
        above = solve(problem, 1.0001 * lmax, reg=reg, tol=1e-9)
    below = solve(problem, 0.98 * lmax, reg=reg, tol=1e-9)
    assert int(above.stats.active_gates) == 0 and bool(above.converged)
    assert int(below.stats.active_gates) > 0 and bool(below.converged)


def test_gate_norm_bounds_bound_the_weighted_gate_operators(x64):
    problem = build("weighted_sum", False, False)
    bounds = np.asarray(problem.gate_norm_bounds())
    for i in range(P):
        columns = []
        for e in np.eye(D * C):  # the gate's operator, one weight at a time
            U = np.zeros((P, D, C))
            U[i] = e.reshape(D, C)
            out = problem.forward(jnp.asarray(U))
            scales = problem.datafit.scales
            columns.append(np.concatenate([np.sqrt(c) * np.ravel(o) for c, o in zip(scales, out)]))
        exact = np.linalg.norm(np.stack(columns, axis=1), 2)
        assert exact <= bounds[i] * (1 + 1e-9)


def test_screened_composed_solve_keeps_the_optimum(x64):
    problem = build("pooled_head", True, True)
    reg = get_regularizer("coupled")
    lam = 0.3 * float(lam_max(problem, reg))
    screened = solve(problem, lam, reg=reg, tol=1e-10, screen=True, max_iters=50_000)
    reference = cvxpy_optimum("pooled_head", True, True, "coupled", lam)
    assert screened.converged
    assert abs(float(screened.stats.objective) - reference) <= 1e-6 * reference
    assert int(screened.stats.screened) > 0


def test_a_new_lambda_does_not_recompile():
    problem = build("weighted_sum", True, True, dtype="float32")
    solve(problem, lam_frac=0.2, tol=1e-3)
    before = trace_count()
    solve(problem, lam_frac=0.1, tol=1e-3)
    assert trace_count() == before


def test_admm_refuses_composed_problems():
    """Every ADMM route refuses composed terms with one message; ``auto`` gives them R-FISTA
    (on a path too, where R-FISTA uses the strong rule)."""
    problem = build("head", False, False, dtype="float32")
    refusal = "ADMM solves plain gated-row problems only"
    for options in ({}, {"working_set": True}, {"screen": True}, {"certify_every": 3}):
        with pytest.raises(ValueError, match=refusal):
            solve(problem, lam_frac=0.1, solver="admm", **options)
    for linear_solver in ("auto", "eigh"):
        with pytest.raises(ValueError, match=refusal):
            solve_path(problem, lam_fracs=[0.5, 0.1], solver="admm", linear_solver=linear_solver)
    path = solve_path(problem, lam_fracs=[0.5, 0.1], solver="auto", tol=1e-3, progress=False)
    assert all(bool(s.converged) for s in path)


def test_data_term_rejects_mismatched_targets():
    X, G, Y, H, _ = data()
    rows = gated_rows(X, G, C, group_size=L)
    with pytest.raises(ValueError, match="targets for"):
        data_term(rows, GroupMean(L), Y)  # one target per row, not per group
    with pytest.raises(ValueError, match="finite"):
        data_term(rows, GroupMean(L), np.full((GROUPS, C), np.nan))
    with pytest.raises(ValueError, match="values per group"):
        data_term(rows, Dense(jnp.asarray(H)) @ GroupMean(L), Y.reshape(GROUPS, L, C).mean(1))
    term = data_term(rows, GroupMean(L), Y.reshape(GROUPS, L, C).mean(axis=1))
    other = data_term(gated_rows(X, G, C + 1), Identity(), np.zeros((GROUPS * L, C + 1)))
    with pytest.raises(ValueError, match="same width"):
        make_composed([term, other])
