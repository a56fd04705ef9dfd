r"""Duality of every gated-ReLU problem: objective, dual point, relative gap, λ_max.

A problem (:class:`Problem`: :class:`cvxdist.problems.GatedReluProblem`, or a composed one
from :mod:`cvxdist.composed`) is a linear operator :math:`\mathcal A` from the weights ``U``
to predictions, targets ``T``, a quadratic data fit with weights ``C``
(:class:`cvxdist.datafit.Quadratic`) and the unregularized skip/bias columns, eliminated by
the ``C``-orthogonal projector :math:`P_\perp`. With the projected residual
:math:`r = P_\perp(T - \mathcal A U)`:

.. math::

    F(U) = \tfrac12 \|r\|_C^2 + \lambda R(U), \qquad
    D(w) = -f^*(w) - (\lambda R)^*(-\mathcal A^T w),

and the dual point is the scaled residual :math:`w = -s\, C r`, for which
:math:`D = s \langle r, T\rangle_C - \frac{s^2}{2}\|r\|_C^2 - (\lambda R)^*(-s\,\nabla f)`
with :math:`\nabla f(U) = -\mathcal A^T C r`. For norms the best feasible ``s`` has a
closed form; the relative gap :math:`(F(U) - D(w)) / F(U)` bounds the relative
suboptimality of ``U``. Nothing here knows which composition of operators it got.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import equinox as eqx
import jax.numpy as jnp
from jax import Array

from cvxdist.datafit import Quadratic
from cvxdist.prox import Regularizer


class Problem(Protocol):
    """What solvers, duality and screening use of a problem (no solver needs more).

    ``R`` below is a pytree shaped like ``targets`` (an array for a plain problem, a tuple
    of arrays, one per term, for a composed one).
    """

    G: Array  # gates (d, P)
    gate_mask: Array | None
    precision: str

    @property
    def datafit(self) -> Quadratic: ...
    @property
    def targets(self) -> Any: ...
    @property
    def dtype(self) -> Any: ...
    @property
    def num_gates(self) -> int: ...
    @property
    def weight_shape(self) -> tuple[int, int, int]: ...
    def zeros(self) -> Array: ...
    def forward(self, U: Array) -> Any: ...
    def adjoint(self, R: Any) -> Array: ...
    def project(self, R: Any) -> tuple[Any, Array | None]: ...
    def residual(self, U: Array) -> tuple[Any, Array | None]: ...
    def gradient(self, r: Any) -> Array: ...
    def with_precision(self, precision: str) -> Problem: ...
    def split_unregularized(self, beta: Array | None) -> tuple[Any, Any]: ...


class Evaluation(NamedTuple):
    """Primal and dual quantities of the problem at one ``U``."""

    primal: Array  # F(U)
    dual: Array  # D(w) at the scaled-residual dual point
    rel_gap: Array  # (F - D) / F
    loss: Array  # data term ½||r||²_C
    penalty: Array  # R(U) (without λ)


def evaluate(
    problem: Problem, reg: Regularizer, lam: Array, U: Array, r: Any, grad: Array
) -> Evaluation:
    """Objective, dual objective and relative duality gap at ``U``.

    Args:
        r: projected residual :math:`P_\\perp(T - \\mathcal A U)` (shaped like the targets).
        grad: gradient of the data term at ``U``, :math:`-\\mathcal A^T C r`, ``(P, d, c)``.
    """
    datafit = problem.datafit
    loss = datafit.value(r)
    penalty = reg.value(U)
    primal = loss + lam * penalty
    # <r, T>_C = <r, P⊥T>_C because r is already projected (P⊥ is C-self-adjoint).
    linear = datafit.inner(r, problem.targets)
    s = _dual_scaling(reg, lam, grad, linear, loss)
    dual = s * linear - s * s * loss - reg.conjugate(s * grad, lam)
    floor = jnp.finfo(primal.dtype).eps * datafit.value(problem.targets)
    rel_gap = jnp.maximum(primal - dual, 0.0) / jnp.maximum(primal, floor)
    return Evaluation(primal, dual, rel_gap, loss, penalty)


def _dual_scaling(reg: Regularizer, lam: Array, grad: Array, linear: Array, loss: Array) -> Array:
    """The scaling ``s`` of the dual point ``w = -s C r`` (see :func:`evaluate`)."""
    if reg.finite_conjugate:
        return jnp.ones((), loss.dtype)
    s_best = linear / jnp.where(loss > 0, 2.0 * loss, 1.0)
    return jnp.clip(s_best, 0.0, reg.dual_scale(grad, lam))


def dual_scaling(problem: Problem, reg: Regularizer, lam: Array, r: Any, grad: Array) -> Array:
    """The ``s`` of the dual point that :func:`evaluate` uses.

    ``𝒜ᵀ w = -s · grad``, so ``-s · grad`` is the dual correlation that gap-safe screening
    tests (:mod:`cvxdist.screening`).
    """
    datafit = problem.datafit
    loss = datafit.value(r)
    return _dual_scaling(reg, lam, grad, datafit.inner(r, problem.targets), loss)


class Certificate(NamedTuple):
    """Everything the duality gap at ``U`` is made of (see :func:`certify`)."""

    evaluation: Evaluation
    residual: Any  # r = P⊥(T - 𝒜U), shaped like the targets
    grad: Array  # -𝒜ᵀ C r, (P, d, c)
    beta: Array | None  # skip/bias least-squares coefficients
    scale: Array  # s of the dual point w = -s C r


@eqx.filter_jit
def certify(
    problem: Problem, reg: Regularizer, lam: Array, U: Array, precision: str = "highest"
) -> Certificate:
    """Residual, gradient and duality gap at ``U``, with ``precision`` GEMMs.

    The default recomputes the certificate with true float32/float64 GEMMs whatever precision
    the solve used, so the reported gap is honest (``precision`` is static).
    """
    problem = problem.with_precision(precision)
    r, beta = problem.residual(U)
    grad = problem.gradient(r)
    evaluation = evaluate(problem, reg, lam, U, r, grad)
    scale = dual_scaling(problem, reg, lam, r, grad)
    return Certificate(evaluation, r, grad, beta, scale)


def target_energy(problem: Problem) -> Array:
    """:math:`\\frac12\\|P_\\perp T\\|_C^2`: the objective of the zero model."""
    return problem.datafit.value(problem.project(problem.targets)[0])


def correlation(problem: Problem) -> Array:
    """:math:`\\mathcal A^T C P_\\perp T`, ``(P, d, c)``: the negative gradient at ``U = 0``."""
    return -problem.gradient(problem.project(problem.targets)[0])


@eqx.filter_jit
def lam_max(problem: Problem, reg: Regularizer) -> Array:
    """Smallest λ at which ``U = 0`` is optimal for ``reg`` (full-precision GEMMs)."""
    return reg.lam_max(correlation(problem.with_precision("highest")))


def _alignment(exact: Problem, corr: Array) -> Array:
    norms = jnp.sqrt(jnp.sum(corr * corr, axis=(1, 2)))
    scale = jnp.sqrt(2.0 * target_energy(exact)) * exact.gate_norm_bounds()
    ratios = jnp.where(scale > 0, norms / jnp.where(scale > 0, scale, 1.0), 0.0)
    return jnp.max(ratios)


@eqx.filter_jit
def gate_alignment(problem: Problem) -> Array:
    """:math:`\\max_i \\|\\mathcal A_i^T C P_\\perp T\\|_F / (\\bar a_i \\|P_\\perp T\\|_C)`,
    in ``[0, 1]`` (``ā_i`` the gate norm bounds): how well the best gate's features correlate
    with what the skip and bias leave of the targets. At rounding level the gates see nothing
    the skip and bias do not (e.g. a gate on for every row, with the skip): the only optimum
    the float arithmetic can certify is ``U = 0``; a small λ would chase rounding noise."""
    exact = problem.with_precision("highest")
    return _alignment(exact, correlation(exact))


@eqx.filter_jit
def lam_max_and_alignment(problem: Problem, reg: Regularizer) -> tuple[Array, Array]:
    """`lam_max` and `gate_alignment` from one correlation pass."""
    exact = problem.with_precision("highest")
    corr = correlation(exact)
    return reg.lam_max(corr), _alignment(exact, corr)
