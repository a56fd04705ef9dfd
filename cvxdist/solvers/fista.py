r"""R-FISTA: restarted accelerated proximal gradient with line search.

Solves :math:`\min_U f(U) + \lambda R(U)` with :math:`f(U) = \frac12\|P_\perp(T - \mathcal A
U)\|_C^2`, for any problem of the :class:`cvxdist.duality.Problem` interface (plain rows or a
composition of pooling, heads and weighted terms: FISTA never knows which).

Iteration ``k`` (Beck & Teboulle 2009; O'Donoghue & Candès 2015 restarts)::

    t'   = (1 + sqrt(1 + 4 t²)) / 2,   β = (t - 1) / t'
    V    = U_k + β (U_k - U_{k-1})                        (extrapolation)
    η   ← η · growth;  repeat η ← η · shrink until
          f(U⁺) ≤ f(V) + <∇f(V), U⁺ - V> + ||U⁺ - V||² / (2η),   U⁺ = prox_{ηλR}(V - η∇f(V))
    restart (t' ← 1) when <V - U⁺, U⁺ - U_k> > 0

Cost. ``r(U)`` and ``∇f(U)`` are affine in ``U``, so the state keeps them for the last two
iterates and forms ``r(V)``, ``∇f(V)`` by the same linear combination as ``V``. An iteration
then needs exactly one forward operator application (the line-search trial, plus one per
backtrack) and one adjoint (``∇f(U⁺)``); the duality gap at ``U⁺`` comes for free from those
two. Residuals are pytrees shaped like the targets (one leaf per data term).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from cvxdist.datafit import Quadratic
from cvxdist.duality import Evaluation, Problem, evaluate
from cvxdist.prox import Regularizer
from cvxdist.solvers.common import RESULTS, IterativeSolver, Weights


def _extrapolate(current: Any, previous: Any, alpha: Array) -> Any:
    """``current + alpha (current - previous)`` leaf by leaf (for affine quantities of U)."""
    return jax.tree.map(lambda x, y: x + alpha * (x - y), current, previous)


def majorized(datafit: Quadratic, dr: Any, dU: Array, step: Array) -> Array:
    r"""The line-search test ``f(U⁺) ≤ f(V) + <∇f(V), U⁺ - V> + ||U⁺ - V||² / (2η)``, written
    without cancellation.

    The data term is quadratic, so ``f(U⁺) - f(V) - <∇f(V), U⁺ - V> = ½||r(U⁺) - r(V)||²_C``
    exactly, and the test is ``||dr||²_C ≤ ||dU||²/η`` with ``dr = r(U⁺) - r(V)`` (shaped like
    the targets) and ``dU = U⁺ - V`` ``(P, d, c)``: two small quantities, each computed to the
    precision of the dtype.

    The textbook form compares ``f(U⁺)`` with the model, two sums of size ``f`` whose
    difference near the optimum (``≈ ||dU||²/η``) falls below ``eps · f``: the test is then
    decided by rounding. That was the float32 gap floor: on N=200 d=8 c=2 P=16 (``coupled``,
    λ = 0.1 λ_max) a float32 R-FISTA never reached a gap of 1e-7 in 10,000 iterations; its
    gap wandered between 1e-6 and 7e-3 (a slack of 32 eps · f accepted steps that were too
    long; without the slack, good steps were rejected and the step collapsed), while the
    float32 gap of the float64 optimum is below 1e-7 and the float64 gap of the float32 iterate
    matched its float32 gap (the certificate was right, the iterate wandered). With this test
    the float32 gap reaches 1e-7 in 236 iterations (float64: 207); that iterate's float64 gap
    is 4.5e-7, the resolution of a float32 gap (:mod:`cvxdist.solvers.polish`).
    """
    return 2.0 * datafit.value(dr) <= jnp.sum(dU * dU) / step


class FistaState(NamedTuple):
    U: Array  # current iterate, (P, d, c)
    r: Any  # projected residual at U, shaped like the targets
    grad: Array  # ∇f(U), (P, d, c)
    U_prev: Array
    r_prev: Any
    grad_prev: Array
    beta: Array | None  # skip/bias least-squares coefficients at U
    momentum: Array  # t
    step: Array  # η
    iteration: Array
    evaluation: Evaluation
    subgrad_sq: Array
    backtracks: Array  # total number of rejected trial steps
    restarts: Array
    linesearch_failed: Array


class Fista(IterativeSolver):
    """R-FISTA with backtracking, step growth and gradient-mapping restarts.

    Attributes (static): the regularizer, ``growth`` (step multiplier tried each iteration),
    ``shrink`` (multiplier on a rejected step) and ``max_backtracks`` per iteration.
    """

    reg: Regularizer
    growth: float = 1.25
    shrink: float = 0.5
    max_backtracks: int = 60

    def __check_init__(self) -> None:
        if not (self.growth >= 1.0 and 0.0 < self.shrink < 1.0 and self.growth * self.shrink < 1):
            raise ValueError(
                "R-FISTA needs growth >= 1, 0 < shrink < 1 and growth * shrink < 1 (so that one "
                f"rejected trial shortens the step); got growth={self.growth}, "
                f"shrink={self.shrink}"
            )
        if self.max_backtracks < 1:
            raise ValueError(f"max_backtracks must be at least 1, got {self.max_backtracks}")

    def _certify(
        self, problem: Problem, lam: Array, U: Array, r: Array, grad: Array, step: Array
    ) -> tuple[Evaluation, Array]:
        evaluation = evaluate(problem, self.reg, lam, U, r, grad)
        return evaluation, self.reg.min_norm_subgradient_sq(U, grad, lam, step)

    def init(self, problem: Problem, U0: Array, lam: Array) -> FistaState:
        r, beta = problem.residual(U0)
        grad = problem.gradient(r)
        # Initial step: the inverse Rayleigh quotient of the data term along the gradient
        # (a lower bound on the Lipschitz constant, so backtracking corrects it if too long).
        curvature_r, _ = problem.project(problem.forward(grad))
        grad_sq = jnp.sum(grad * grad)
        curvature = 2.0 * problem.datafit.value(curvature_r) / grad_sq
        step = jnp.where((grad_sq > 0) & (curvature > 0), 1.0 / curvature, 1.0).astype(U0.dtype)
        evaluation, subgrad_sq = self._certify(problem, lam, U0, r, grad, step)
        zero = jnp.zeros((), jnp.int32)
        return FistaState(
            U=U0,
            r=r,
            grad=grad,
            U_prev=U0,
            r_prev=r,
            grad_prev=grad,
            beta=beta,
            momentum=jnp.ones((), U0.dtype),
            step=step,
            iteration=zero,
            evaluation=evaluation,
            subgrad_sq=subgrad_sq,
            backtracks=zero,
            restarts=zero,
            linesearch_failed=jnp.zeros((), bool),
        )

    def step(self, problem: Problem, lam: Array, state: FistaState) -> FistaState:
        datafit = problem.datafit
        t = state.momentum
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        extrapolation = (t - 1.0) / t_next
        V = state.U + extrapolation * (state.U - state.U_prev)
        r_V = _extrapolate(state.r, state.r_prev, extrapolation)
        grad_V = state.grad + extrapolation * (state.grad - state.grad_prev)

        def trial(carry: tuple) -> tuple:
            step, _, _, _, count, _ = carry
            step = jnp.where(count == 0, step, step * self.shrink)
            U_new = self.reg.prox(V - step * grad_V, lam, step)
            r_new, beta_new = problem.residual(U_new)
            dr = jax.tree.map(jnp.subtract, r_new, r_V)
            accepted = majorized(datafit, dr, U_new - V, step)
            return step, U_new, r_new, beta_new, count + 1, accepted

        def rejected(carry: tuple) -> Array:
            *_, count, accepted = carry
            return (~accepted) & (count < self.max_backtracks)

        no = jnp.zeros((), bool)
        start = (state.step * self.growth, V, r_V, state.beta, jnp.zeros((), jnp.int32), no)
        step, U_new, r_new, beta_new, count, accepted = lax.while_loop(rejected, trial, start)
        grad_new = problem.gradient(r_new)
        evaluation, subgrad_sq = self._certify(problem, lam, U_new, r_new, grad_new, step)
        restart = jnp.sum((V - U_new) * (U_new - state.U)) > 0
        return FistaState(
            U=U_new,
            r=r_new,
            grad=grad_new,
            U_prev=state.U,
            r_prev=state.r,
            grad_prev=state.grad,
            beta=beta_new,
            momentum=jnp.where(restart, jnp.ones_like(t_next), t_next),
            step=step,
            iteration=state.iteration + 1,
            evaluation=evaluation,
            subgrad_sq=subgrad_sq,
            backtracks=state.backtracks + count - 1,
            restarts=state.restarts + restart.astype(jnp.int32),
            linesearch_failed=~accepted,
        )

    def certificate(self, state: FistaState) -> tuple[Evaluation, Array]:
        return state.evaluation, state.subgrad_sq

    def failed(self, state: FistaState) -> tuple[Array, RESULTS]:
        nonfinite = ~jnp.isfinite(state.evaluation.primal)
        why = RESULTS.where(nonfinite, RESULTS.nonfinite, RESULTS.linesearch_failed)
        return nonfinite | state.linesearch_failed, why

    def postprocess(self, problem: Problem, lam: Array, state: FistaState) -> Weights:
        V, b = problem.split_unregularized(state.beta)
        return Weights(state.U, V, b)

    def stats_extra(self, state: FistaState) -> Array:
        return state.step
