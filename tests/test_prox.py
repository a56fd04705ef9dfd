"""Regularizers: prox against CVXPY, dual norms, conjugates and subgradients."""

from __future__ import annotations

import cvxpy as cp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvxdist.prox import REGULARIZERS, Coupled, GroupElastic, Nuclear, OneVsAll, get_regularizer

ALL = (Coupled(), OneVsAll(), Nuclear(), GroupElastic(alpha=0.3))


def cvxpy_prox(reg, V: np.ndarray, t: float) -> np.ndarray:
    blocks = [cp.Variable(V.shape[1:]) for _ in range(V.shape[0])]
    if isinstance(reg, Coupled):
        penalty = sum(cp.norm(u, "fro") for u in blocks)
    elif isinstance(reg, OneVsAll):
        penalty = sum(cp.sum(cp.norm(u, 2, axis=0)) for u in blocks)
    elif isinstance(reg, Nuclear):
        penalty = sum(cp.normNuc(u) for u in blocks)
    else:
        a = reg.alpha
        penalty = sum(a * cp.norm(u, "fro") + 0.5 * (1 - a) * cp.sum_squares(u) for u in blocks)
    fit = sum(cp.sum_squares(u - v) for u, v in zip(blocks, V))
    cp.Problem(cp.Minimize(0.5 * fit + t * penalty)).solve(solver=cp.CLARABEL)
    return np.stack([u.value for u in blocks])


@pytest.mark.parametrize("reg", ALL, ids=lambda r: r.name)
def test_prox_matches_cvxpy(x64, reg):
    rng = np.random.default_rng(0)
    V = rng.standard_normal((5, 4, 3))
    V[1] *= 0.01  # a block that the prox zeroes
    lam, scaling = 0.7, 0.5
    ours = np.asarray(reg.prox(jnp.asarray(V), lam, scaling))
    np.testing.assert_allclose(ours, cvxpy_prox(reg, V, lam * scaling), atol=1e-6)
    if not isinstance(reg, Nuclear):
        assert np.all(ours[1] == 0)


def _norm_part(reg, U: np.ndarray) -> float:
    """The norm whose dual ``reg.dual_norm`` is, in numpy (α Σ‖U_i‖_F for group_elastic:
    its subdifferential at zero, which sets λ_max)."""
    if isinstance(reg, OneVsAll):
        return float(np.sum(np.linalg.norm(U, axis=1)))
    if isinstance(reg, Nuclear):
        return float(np.sum(np.linalg.svd(U, compute_uv=False)))
    alpha = reg.alpha if isinstance(reg, GroupElastic) else 1.0
    return alpha * float(np.sum(np.linalg.norm(U, axis=(1, 2))))


def _dual_maximizer(reg, Z: np.ndarray) -> np.ndarray:
    """A U of norm one (one block, column or rank-one term) maximizing <U, Z>."""
    U = np.zeros_like(Z)
    if isinstance(reg, OneVsAll):
        norms = np.linalg.norm(Z, axis=1)  # (P, c)
        i, k = np.unravel_index(np.argmax(norms), norms.shape)
        U[i, :, k] = Z[i, :, k] / norms[i, k]
    elif isinstance(reg, Nuclear):
        left, sigma, right = np.linalg.svd(Z)
        i = int(np.argmax(sigma[:, 0]))
        U[i] = np.outer(left[i, :, 0], right[i, 0])
    else:
        norms = np.linalg.norm(Z, axis=(1, 2))
        i = int(np.argmax(norms))
        U[i] = Z[i] / norms[i]
    return U / _norm_part(reg, U)


@pytest.mark.parametrize("reg", ALL, ids=lambda r: r.name)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 10.0))
def test_dual_norm_is_the_definition(reg, seed, scale):
    # R°(Z) = max_{R(U) ≤ 1} <U, Z>: Hölder (<U, Z> ≤ R(U) R°(Z) for every U) bounds it from
    # above and a maximizer attains it, so a dual norm that over- or under-estimates fails.
    rng = np.random.default_rng(seed)
    Z = scale * rng.standard_normal((4, 3, 2))
    ours = float(reg.dual_norm(jnp.asarray(Z, jnp.float32)))
    for _ in range(5):
        U = rng.standard_normal((4, 3, 2))
        assert np.sum(U * Z) <= _norm_part(reg, U) * ours * (1 + 1e-5)
    best = _dual_maximizer(reg, Z)
    np.testing.assert_allclose(_norm_part(reg, best), 1.0, rtol=1e-12)
    np.testing.assert_allclose(ours, np.sum(best * Z), rtol=1e-5)


@pytest.mark.parametrize("reg", ALL, ids=lambda r: r.name)
def test_moreau_identity_gives_the_conjugate(x64, reg):
    # Fenchel-Young holds with equality at the prox: for W = prox_{λR}(V), Z = V - W,
    # λR(W) + (λR)*(Z) = <W, Z>, and Z is dual feasible for norms (R°(Z) <= λ).
    rng = np.random.default_rng(3)
    V = jnp.asarray(rng.standard_normal((6, 3, 2)))
    lam = 0.8
    W = reg.prox(V, lam)
    Z = V - W
    lhs = lam * reg.value(W) + reg.conjugate(Z, lam)
    np.testing.assert_allclose(float(lhs), float(jnp.sum(W * Z)), rtol=1e-10, atol=1e-12)
    if not reg.finite_conjugate:
        assert float(reg.dual_norm(Z)) <= lam * (1 + 1e-10)


@pytest.mark.parametrize("reg", ALL, ids=lambda r: r.name)
def test_min_norm_subgradient_vanishes_at_prox_fixed_point(x64, reg):
    # U = prox(U - t g) <=> 0 ∈ g + λ∂R(U); build such a pair and check the criterion is ~0.
    rng = np.random.default_rng(5)
    V = jnp.asarray(rng.standard_normal((6, 3, 2)))
    lam, t = 0.9, 1.0
    U = reg.prox(V, lam, t)
    grad = (V - U) / t * -1.0  # g = (U - V)/t ... chosen so that U - t g = V
    grad = (U - V) / t
    assert float(reg.min_norm_subgradient_sq(U, grad, lam, t)) < 1e-18
    assert float(reg.min_norm_subgradient_sq(U, grad + 0.1, lam, t)) > 1e-4


def test_lam_max_of_elastic_scales_with_alpha():
    Z = jnp.ones((2, 3, 1))
    assert float(GroupElastic(alpha=0.5).lam_max(Z)) == pytest.approx(
        2 * float(Coupled().lam_max(Z))
    )


def test_registry_and_errors():
    assert set(REGULARIZERS) == {"coupled", "one_vs_all", "nuclear", "group_elastic"}
    assert isinstance(get_regularizer("nuclear"), Nuclear)
    with pytest.raises(ValueError, match="unknown regularizer 'l1'"):
        get_regularizer("l1")
    with pytest.raises(ValueError, match="alpha"):
        GroupElastic(alpha=0.0)
