r"""Gap-safe screening of gates (Fercoq, Gramfort & Salmon 2015; Ndiaye et al. 2017).

The dual of every gated-ReLU problem (see :mod:`cvxdist.duality`),

.. math::

    D(w) = -f^*(w) - (\lambda R)^*(-\mathcal A^T w),

is 1-strongly concave in the data fit's dual norm :math:`\|w\|_{C^{-1}}` (for the plain
problem, ``C = 1/N``), so for any dual-feasible ``w`` the optimum lies in the ball

.. math::

    \|w - w^*\|_{C^{-1}} \le \rho = \sqrt{2\,(F(U) - D(w))}

(``F(U) ≥ D(w^*)``). At the optimum, gate ``i`` is zero whenever the dual correlation is
strictly inside the regularizer's dual ball: ``‖𝒜_iᵀ w*‖ < λ`` (Frobenius norm for
``coupled``, per output column for ``one_vs_all``, spectral norm for ``nuclear``, ``< λα``
for ``group_elastic``). Since ``‖𝒜_iᵀ(w - w*)‖ ≤ ‖C^{1/2} 𝒜_i‖₂ ρ``, the test

.. math::

    \|\mathcal A_i^T w\| + \rho \, \|C^{1/2}\mathcal A_i\|_2 < \lambda

proves ``U_i* = 0`` from the current iterate alone. ``w = -s C r`` is the scaled residual of
:func:`cvxdist.duality.evaluate`, so ``𝒜_iᵀ w = -s ∇f(U)_i`` costs nothing extra.

``‖C^{1/2}𝒜_i‖₂`` must be bounded from *above* for the rule to be safe, which power
iterations cannot do (they converge from below): every problem provides
``gate_norm_bounds()`` (for gated rows ``min(‖D_i X‖_F, ‖X‖₂)/√N``, see
:func:`cvxdist.operators.gate_norm_bounds`; composed operators multiply by the norms of
their pooling and head), computed once per problem, with a relative guard of ``√eps``.

Because a screened gate is zero at the optimum, the problem restricted to the surviving gates
has the same optimum and objective, and its duality gap bounds the suboptimality of the full
problem. :mod:`cvxdist.solvers.phases` uses this to shrink the GEMMs during a solve.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import Array

from cvxdist.duality import Problem, certify
from cvxdist.operators import rounding_guard
from cvxdist.prox import Coupled, GroupElastic, Nuclear, OneVsAll, Regularizer

#: Smallest number of gates of a restricted problem (gate counts are bucketed to powers of two
#: times this, so that a solve compiles at most ``log2(P / MIN_BUCKET) + 1`` programs).
MIN_BUCKET = 64


@eqx.filter_jit
def operator_norm_bounds(problem: Problem) -> Array:
    """Upper bounds on ``‖C^{1/2} 𝒜_i‖₂`` for every gate, ``(P,)`` (dead gates: 0)."""
    return problem.gate_norm_bounds()


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
    violation: Array  # (P,) KKT score ‖∇f(U)_i‖° / λ: > 1 means gate i wants to enter


@eqx.filter_jit
def screen(
    problem: Problem, reg: Regularizer, lam: Array, U: Array, bounds: Array | None
) -> ScreenResult:
    """Gap-safe test at ``U``: which gates cannot be proven zero at the optimum.

    Args:
        problem: the (possibly restricted) problem; its gap certifies the full one as long as
            every gate removed so far was removed by this test.
        U: current weights ``(P, d, c)``.
        bounds: ``(P,)`` upper bounds on ``‖C^{1/2}𝒜_i‖₂`` from :func:`operator_norm_bounds`,
            or ``None`` to skip the test (every live gate kept; the gap and the KKT scores of
            the working sets are still computed).

    The residual, gradient and gap are recomputed at full precision (:func:`certify`), so a
    bfloat16 solve screens on float32 numbers. Dead gates (``gate_mask`` False) are never kept.
    ``violation`` is the dual norm of each gate's gradient block against λ (the subdifferential
    test of ``U_i = 0``), with which working sets rank the gates.
    """
    cert = certify(problem, reg, lam, U)
    evaluation = cert.evaluation
    guard = rounding_guard(problem.dtype)
    eps = jnp.finfo(problem.dtype).eps
    scale_of_terms = jnp.abs(evaluation.primal) + jnp.abs(evaluation.dual)
    gap = jnp.maximum(evaluation.primal - evaluation.dual, 0.0) + 16.0 * eps * scale_of_terms
    radius = jnp.sqrt(2.0 * gap / problem.datafit.strong_concavity)
    grad_norms, weight = _dual_correlation_norms(reg, cert.grad)
    if grad_norms.ndim == 2:  # one_vs_all: a gate goes when all of its outputs do
        grad_norms = jnp.max(grad_norms, axis=1)
    norms = cert.scale * grad_norms  # of the dual correlation -s ∇f (norms are homogeneous)
    violation = grad_norms / jnp.where(lam > 0, lam * weight, 1.0)
    threshold = lam * weight * (1.0 - guard)
    live = jnp.ones(norms.shape, bool) if problem.gate_mask is None else problem.gate_mask
    if bounds is None:
        keep, slack = live, jnp.zeros_like(norms)
    else:
        keep = live & ~(norms + radius * bounds < threshold)
        slack = (threshold - norms) / jnp.where(bounds > 0, bounds, 1.0)
    violation = jnp.where(live, violation, -jnp.inf)
    return ScreenResult(keep, radius, gap, evaluation.rel_gap, evaluation.primal, slack, violation)


def gap_to_screen(result: ScreenResult, count: int) -> float:
    """Relative gap at which ``count`` more gates would pass the test, were the dual
    correlations to stay as they are now (``0`` if they never would).

    From ``ρ = √(2 gap)``: gate ``i`` goes once ``gap < slack_i² / 2``. Used to schedule the
    next test where it will pay off, instead of at fixed intervals.
    """
    slack = np.asarray(result.slack)[np.asarray(result.keep)]
    if count <= 0 or count > len(slack):
        return 0.0
    kth = np.sort(slack)[::-1][count - 1]
    if kth <= 0:
        return 0.0
    return float(kth**2 / 2.0 / float(result.primal))


def bucket_size(active: int, num_gates: int, min_bucket: int = MIN_BUCKET) -> int:
    """Gates of the restricted problem holding ``active`` gates: ``min_bucket · 2^k`` ≥ active,
    capped at ``num_gates`` (so at most ``log2(P / min_bucket) + 1`` distinct shapes)."""
    if active >= num_gates:
        return num_gates
    size = min_bucket
    while size < active:
        size *= 2
    return min(size, num_gates)
