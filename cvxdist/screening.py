r"""Gap-safe screening of gates (Fercoq, Gramfort & Salmon 2015; Ndiaye et al. 2017).

The dual of the gated-ReLU problem (see :mod:`cvxdist.problems`),

.. math::

    D(w) = \langle w, \tilde Y\rangle - \frac{N}{2}\|w\|^2 - (\lambda R)^*(A^T w),

is ``N``-strongly concave, so for any dual-feasible ``w`` the optimum lies in the ball

.. math::

    \|w - w^*\| \le \rho = \sqrt{2\,(F(U) - D(w)) / N}

(``F(U) ≥ D(w^*)``). At the optimum, gate ``i`` is zero whenever the dual correlation is
strictly inside the regularizer's dual ball: ``‖A_iᵀ w*‖ < λ`` (Frobenius norm for ``coupled``,
per output column for ``one_vs_all``, spectral norm for ``nuclear``, ``< λα`` for
``group_elastic``). Since ``‖A_iᵀ(w - w*)‖ ≤ ‖A_i‖₂ ρ``, the test

.. math::

    \|A_i^T w\| + \rho \, \|A_i\|_2 < \lambda

proves ``U_i* = 0`` from the current iterate alone. ``w = s r / N`` is the scaled residual of
:func:`cvxdist.problems.evaluate`, so ``A_iᵀ w = -s ∇f(U)_i`` costs nothing extra.

``‖A_i‖₂ = ‖D_i X‖₂`` (``D_i`` the 0/1 diagonal of gate ``i``'s mask) must be bounded from
*above* for the rule to be safe, which power iterations cannot do (they converge from below).
:func:`operator_norm_bounds` uses ``min(‖D_i X‖_F, ‖X‖₂)``: the Frobenius norm per gate is one
pass over the rows (``masksᵀ · rownorms²``) and ``‖X‖₂`` is the top eigenvalue of the
``d × d`` Gram matrix, both computed once per problem; a relative guard of ``√eps`` covers
rounding. ``‖X‖₂`` is the tighter of the two except for gates that fire on very few rows.

Because a screened gate is zero at the optimum, the problem restricted to the surviving gates
has the same optimum and objective, and its duality gap bounds the suboptimality of the full
problem. :mod:`cvxdist.phases` uses this to shrink the GEMMs during a solve.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from cvxdist import operators
from cvxdist.problems import GatedReluProblem, certify
from cvxdist.prox import Coupled, GroupElastic, Nuclear, OneVsAll, Regularizer

#: Smallest number of gates of a restricted problem (gate counts are bucketed to powers of two
#: times this, so that a solve compiles at most ``log2(P / MIN_BUCKET) + 1`` programs).
MIN_BUCKET = 64


def _guard(dtype: jnp.dtype) -> float:
    """Relative rounding guard used on both sides of the test: √eps of the dtype."""
    return math.sqrt(float(jnp.finfo(dtype).eps))


@eqx.filter_jit
def operator_norm_bounds(problem: GatedReluProblem) -> Array:
    """Upper bounds on ``‖A_i‖₂ = ‖D_i X‖₂`` for every gate, shape ``(P,)``.

    ``min(‖D_i X‖_F, ‖X‖₂)``, inflated by a ``√eps`` rounding guard; dead gates
    (``gate_mask`` False) get 0. One pass over the rows, GEMMs at full precision.
    """
    highest = lax.Precision.HIGHEST

    def chunk(X_k: Array, M_k: Array | None) -> tuple[Array, Array]:
        masks = operators.chunk_masks(problem, X_k, M_k).astype(X_k.dtype)
        row_sq = jnp.sum(X_k * X_k, axis=1)
        return jnp.matmul(row_sq, masks, precision=highest), jnp.matmul(
            X_k.T, X_k, precision=highest
        )

    fro_sq, gram = operators.sum_chunks(problem, chunk)
    spectral_sq = jnp.linalg.eigvalsh(gram)[-1]
    bound_sq = jnp.minimum(fro_sq, spectral_sq) * (1.0 + _guard(problem.dtype))
    return jnp.sqrt(jnp.maximum(bound_sq, 0.0))


def _dual_correlation_norms(reg: Regularizer, Z: Array) -> tuple[Array, Array | float]:
    """Per-group dual norms of ``Z = Aᵀw`` and the multiplier of λ they are compared with.

    Returns ``(norms, weight)`` with ``norms`` of shape ``(P,)`` or ``(P, c)`` (one_vs_all).
    """
    if isinstance(reg, GroupElastic):
        return jnp.sqrt(jnp.sum(Z * Z, axis=(1, 2))), reg.alpha
    if isinstance(reg, Coupled):
        return jnp.sqrt(jnp.sum(Z * Z, axis=(1, 2))), 1.0
    if isinstance(reg, OneVsAll):
        return jnp.sqrt(jnp.sum(Z * Z, axis=1)), 1.0
    if isinstance(reg, Nuclear):
        return jnp.linalg.svd(Z, compute_uv=False)[..., 0], 1.0
    raise TypeError(f"no screening rule for regularizer {type(reg).__name__}")


class ScreenResult(eqx.Module):
    """Outcome of one screening test (arrays; see :func:`screen`)."""

    keep: Array  # (P,) bool: gates that may be non-zero at the optimum
    radius: Array  # ρ, the radius of the safe ball around the dual point
    gap: Array  # F(U) - D(w) used for ρ (with the rounding guard)
    rel_gap: Array  # the relative duality gap at U (full-precision GEMMs)
    primal: Array  # F(U)
    slack: Array  # (P,) ρ below which each gate would be screened (≤ 0: not with these norms)


@eqx.filter_jit
def screen(
    problem: GatedReluProblem, reg: Regularizer, lam: Array, U: Array, bounds: Array
) -> ScreenResult:
    """Gap-safe test at ``U``: which gates cannot be proven zero at the optimum.

    Args:
        problem: the (possibly restricted) problem; its gap certifies the full one as long as
            every gate removed so far was removed by this test.
        U: current weights ``(P, d, c)``.
        bounds: ``(P,)`` upper bounds on ``‖A_i‖₂`` from :func:`operator_norm_bounds`.

    The residual, gradient and gap are recomputed at full precision (:func:`certify`), so a
    bfloat16 solve screens on float32 numbers. Dead gates (``gate_mask`` False) are never kept.
    """
    cert = certify(problem, reg, lam, U)
    evaluation = cert.evaluation
    guard = _guard(problem.dtype)
    eps = jnp.finfo(problem.dtype).eps
    scale_of_terms = jnp.abs(evaluation.primal) + jnp.abs(evaluation.dual)
    gap = jnp.maximum(evaluation.primal - evaluation.dual, 0.0) + 16.0 * eps * scale_of_terms
    radius = jnp.sqrt(2.0 * gap / problem.num_rows)
    norms, weight = _dual_correlation_norms(reg, -cert.scale * cert.grad)
    if norms.ndim == 2:  # one_vs_all: a gate goes when all of its outputs do
        norms = jnp.max(norms, axis=1)
    threshold = lam * weight * (1.0 - guard)
    zero = norms + radius * bounds < threshold
    keep = ~zero
    if problem.gate_mask is not None:
        keep = keep & problem.gate_mask
    slack = (threshold - norms) / jnp.where(bounds > 0, bounds, 1.0)
    return ScreenResult(keep, radius, gap, evaluation.rel_gap, evaluation.primal, slack)


def gap_to_screen(result: ScreenResult, num_rows: int, count: int) -> float:
    """Relative gap at which ``count`` more gates would pass the test, were the dual
    correlations to stay as they are now (``0`` if they never would).

    From ``ρ = √(2 gap / N)``: gate ``i`` goes once ``gap < N slack_i² / 2``. Used to schedule
    the next test where it will pay off, instead of at fixed intervals.
    """
    slack = np.asarray(result.slack)[np.asarray(result.keep)]
    if count <= 0 or count > len(slack):
        return 0.0
    kth = np.sort(slack)[::-1][count - 1]
    if kth <= 0:
        return 0.0
    return float(num_rows * kth**2 / 2.0 / float(result.primal))


def bucket_size(active: int, num_gates: int, min_bucket: int = MIN_BUCKET) -> int:
    """Gates of the restricted problem holding ``active`` gates: ``min_bucket · 2^k`` ≥ active,
    capped at ``num_gates`` (so at most ``log2(P / min_bucket) + 1`` distinct shapes)."""
    if active >= num_gates:
        return num_gates
    size = min_bucket
    while size < active:
        size *= 2
    return min(size, num_gates)
