"""Operators and problem construction: adjointness, chunking, masks, validation, lam_max."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist import operators
from cvxdist.problems import correlation, lam_max, make_problem
from cvxdist.prox import Coupled


def random_arrays(N=37, d=5, c=3, P=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, d)), rng.standard_normal((N, c)), rng.standard_normal((d, P))


def dense_forward(X, G, U):
    masks = (X @ G >= 0).astype(float)
    return np.einsum("np,npc->nc", masks, np.einsum("nd,pdc->npc", X, U))


def unchunk(problem, A):
    return np.asarray(A).reshape(-1, A.shape[-1])[: problem.num_rows]


# (d, c, P): feature first (c = 1; d·c + P ≥ P·c) and gate first (c > 1, d < P).
SHAPES = [(5, 3, 7), (5, 1, 20), (4, 3, 16)]


@pytest.mark.parametrize("d,c,P", SHAPES)
def test_contraction_order_follows_the_shapes(d, c, P):
    assert operators.gate_first(d, P, c) == (d * c + P < P * c)
    assert [operators.gate_first(d, P, c) for d, c, P in SHAPES] == [False, False, True]


@pytest.mark.parametrize("d,c,P", SHAPES)
@pytest.mark.parametrize("chunk_rows", [None, 8, 37])
@pytest.mark.parametrize("store_masks", [True, False])
def test_forward_matches_dense_and_adjoint_is_adjoint(x64, chunk_rows, store_masks, d, c, P):
    X, Y, G = random_arrays(d=d, c=c, P=P)
    problem = make_problem(X, Y, G, chunk_rows=chunk_rows, store_masks=store_masks)
    assert (problem.masks is None) == (not store_masks)
    rng = np.random.default_rng(1)
    U = rng.standard_normal(problem.weight_shape)
    forward = unchunk(problem, operators.forward(problem, jnp.asarray(U)))
    np.testing.assert_allclose(forward, dense_forward(X, G, U), rtol=1e-12, atol=1e-12)
    R = rng.standard_normal(Y.shape)
    R_chunked = make_problem(X, R, G, chunk_rows=chunk_rows).Y
    adjoint = np.asarray(operators.adjoint(problem, R_chunked))
    np.testing.assert_allclose(np.sum(forward * R), np.sum(U * adjoint), rtol=1e-11)
    masks = (X @ G >= 0).astype(float)
    dense_adjoint = np.einsum("np,nd,nc->pdc", masks, X, R)
    np.testing.assert_allclose(adjoint, dense_adjoint, rtol=1e-12, atol=1e-12)


def test_padded_rows_never_contribute(x64):
    X, Y, G = random_arrays(N=10)
    problem = make_problem(X, Y, G, chunk_rows=4, bias=True)  # 12 slots, 2 padded
    assert problem.X.shape == (3, 4, 5) and problem.num_rows == 10
    r, beta = operators.residual(problem, problem.zeros())
    r = np.asarray(r).reshape(-1, 3)
    assert np.all(r[10:] == 0)
    np.testing.assert_allclose(np.asarray(beta)[-1], Y.mean(0), rtol=1e-12)


def test_projection_removes_skip_and_bias_components(x64):
    X, Y, G = random_arrays()
    problem = make_problem(X, Y, G, skip=True, bias=True)
    r, _ = operators.residual(problem, problem.zeros())
    r = unchunk(problem, r)
    np.testing.assert_allclose(X.T @ r, 0, atol=1e-10)
    np.testing.assert_allclose(r.sum(0), 0, atol=1e-10)


def test_lam_max_is_the_dual_norm_of_the_correlation(x64):
    X, Y, G = random_arrays()
    problem = make_problem(X, Y, G)
    Z = np.einsum("nd,np,nc->pdc", X, (X @ G >= 0).astype(float), Y) / X.shape[0]
    assert float(lam_max(problem, Coupled())) == pytest.approx(
        np.max(np.linalg.norm(Z, axis=(1, 2))), rel=1e-12
    )
    np.testing.assert_allclose(np.asarray(correlation(problem)), Z, rtol=1e-10)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ((np.ones((5, 2)), np.ones((4, 1)), np.ones((2, 3))), "X has 5 rows but Y has 4"),
        ((np.ones((5, 2)), np.ones((5, 1)), np.ones((3, 3))), "G must have shape"),
        ((np.ones((5,)), np.ones((5, 1)), np.ones((1, 3))), "X must be a 2-D array"),
        ((np.full((5, 2), np.nan), np.ones((5, 1)), np.ones((2, 3))), "X contains 10 NaN"),
        ((np.ones((5, 2)), np.full((5, 1), np.inf), np.ones((2, 3))), "Y contains 5 NaN or Inf"),
        ((np.ones((0, 2)), np.ones((0, 1)), np.ones((2, 3))), "X is empty"),
        ((np.array([["a", "b"]]), np.ones((1, 1)), np.ones((2, 3))), "real numeric"),
    ],
)
def test_bad_arrays_raise_clear_errors(arrays, message):
    with pytest.raises(ValueError, match=message):
        make_problem(*arrays)


def test_one_dimensional_targets_and_bad_chunks():
    problem = make_problem(np.ones((6, 2)), np.ones(6), np.ones((2, 3)))
    assert problem.num_outputs == 1
    with pytest.raises(ValueError, match="chunk_rows"):
        make_problem(np.ones((6, 2)), np.ones(6), np.ones((2, 3)), chunk_rows=0)


def test_float64_requires_x64():
    with pytest.raises(ValueError, match="jax_enable_x64"):
        make_problem(np.ones((6, 2)), np.ones(6), np.ones((2, 3)), dtype="float64")
