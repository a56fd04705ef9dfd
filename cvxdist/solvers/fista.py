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

Anderson extrapolation (``anderson=m``; Anderson 1965, as skglm's ``AndersonCD``): the last
``m + 1`` iterates ``U_0..U_m`` of the proximal-gradient fixed point are mixed as
``U_acc = Σ_j c_j U_{j+1}`` with ``c = (DᵀD)⁻¹1 / 1ᵀ(DᵀD)⁻¹1`` (``D`` the ``m`` successive
differences), every ``m + 1`` iterations. Its residual is recomputed (one forward GEMM, on
those iterations only) so that the objective check is exact; ``U_acc`` replaces the iterate
only when its objective is lower (the safeguard), and then its gradient is recomputed too (one
adjoint GEMM; a mixture of the stored gradients, exact in exact arithmetic, was measured to
stall the line search near a 1e-9 gap) and the momentum restarts there. The certified iterate
is always the output of a proximal-gradient step (residual and gradient recomputed exactly),
so the certificate is unchanged. ``momentum=False`` gives plain proximal gradient (ISTA with
the same line search), the fixed-point map Anderson acceleration is designed for.
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


class AndersonHistory(NamedTuple):
    """The last ``m + 1`` iterates, oldest first."""

    U: Array  # (m + 1, P, d, c)
    count: Array  # iterates stored since the last extrapolation
    accepted: Array  # extrapolations accepted so far


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
    max_step: Array  # the cap on η: ``max_step_growth / L̄``, L̄ ≥ L (gate norm bounds)
    iteration: Array
    evaluation: Evaluation
    subgrad_sq: Array
    backtracks: Array  # total number of rejected trial steps
    restarts: Array
    linesearch_failed: Array
    history: AndersonHistory | None = None  # with ``anderson > 0``


def _stack(value: Array, depth: int) -> Array:
    """``value`` repeated on a new leading axis of ``depth``."""
    return jnp.broadcast_to(value, (depth, *value.shape))


def _mix(coeffs: Array, stacked: Array) -> Array:
    """``Σ_j c_j x_{j+1}`` over the stacked iterates ``x_0..x_m``."""
    return jnp.tensordot(coeffs, stacked[1:], axes=1)


def anderson_coefficients(iterates: Array) -> Array:
    """Anderson mixing weights ``c (m,)`` of ``iterates (m + 1, ...)`` (they sum to one).

    ``c ∝ (DᵀD + δI)⁻¹ 1`` with ``D`` the successive differences; ``δ`` is a Tikhonov term of
    ``10 eps`` relative to the Gram matrix that keeps the system solvable when the differences
    are collinear (a bad mixture is then caught by the objective check).
    """
    diffs = jnp.diff(iterates.reshape(iterates.shape[0], -1), axis=0)
    gram = diffs @ diffs.T
    m = gram.shape[0]
    jitter = 10.0 * jnp.finfo(gram.dtype).eps * jnp.trace(gram) / m
    z = jnp.linalg.solve(gram + jitter * jnp.eye(m, dtype=gram.dtype), jnp.ones(m, gram.dtype))
    return z / jnp.sum(z)


def _lipschitz_bound(problem: Problem) -> Array:
    """``L̄ = Σ_i ‖A_i‖²`` (gate norm bounds in the data fit's metric): at least the data
    term's Lipschitz constant, since ``‖Σ_i A_i U_i‖ ≤ Σ_i ‖A_i‖ ‖U_i‖``."""
    bounds = problem.gate_norm_bounds()
    return jnp.maximum(jnp.sum(bounds * bounds), jnp.finfo(bounds.dtype).tiny)


class Fista(IterativeSolver):
    """R-FISTA with backtracking, step growth and gradient-mapping restarts.

    Attributes (static): the regularizer, ``growth`` (step multiplier tried each iteration),
    ``shrink`` (multiplier on a rejected step), ``max_backtracks`` per iteration,
    ``max_step_growth`` (the step never exceeds this multiple of a safe ``1/L̄``),
    ``anderson`` (``m``: Anderson extrapolation from the last ``m + 1`` iterates every ``m + 1``
    iterations, 0 = off; see the module docstring) and ``momentum`` (False: proximal gradient
    without Nesterov's extrapolation).
    """

    reg: Regularizer
    growth: float = 1.25
    shrink: float = 0.5
    max_backtracks: int = 60
    anderson: int = 0
    momentum: bool = True
    # Along a direction the data term does not see (a gate whose features the skip already
    # spans) ``dr`` is rounding noise and the line search accepts any step: uncapped, the step
    # grew to 6.5e8 and float32 iterates reached NaN. ``1/L̄`` with L̄ = Σ_i ‖A_i‖² ≥ L is a
    # safe step; a step beyond ``max_step_growth / L̄`` helps no solve.
    max_step_growth: float = 1e4

    def __check_init__(self) -> None:
        if not (self.growth >= 1.0 and 0.0 < self.shrink < 1.0 and self.growth * self.shrink < 1):
            raise ValueError(
                "R-FISTA needs growth >= 1, 0 < shrink < 1 and growth * shrink < 1 (so that one "
                f"rejected trial shortens the step); got growth={self.growth}, "
                f"shrink={self.shrink}"
            )
        if self.max_backtracks < 1:
            raise ValueError(f"max_backtracks must be at least 1, got {self.max_backtracks}")
        if self.anderson < 0 or self.anderson == 1:
            raise ValueError(f"anderson must be 0 (off) or at least 2, got {self.anderson}")

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
        history = None
        if self.anderson:
            depth = self.anderson + 1
            history = AndersonHistory(_stack(U0, depth), zero + 1, zero)
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
            max_step=self.max_step_growth / _lipschitz_bound(problem),
            iteration=zero,
            evaluation=evaluation,
            subgrad_sq=subgrad_sq,
            backtracks=zero,
            restarts=zero,
            linesearch_failed=jnp.zeros((), bool),
            history=history,
        )

    def _anderson(self, problem: Problem, lam: Array, state: FistaState) -> FistaState:
        """Replace the iterate by the Anderson mixture of the history when that lowers the
        objective (every ``m + 1`` iterations; a forward GEMM, and an adjoint if accepted)."""
        history = state.history

        def extrapolate(state: FistaState) -> FistaState:
            U = _mix(anderson_coefficients(history.U), history.U)
            r, beta = problem.residual(U)
            primal = problem.datafit.value(r) + lam * self.reg.value(U)
            better = jnp.isfinite(primal) & (primal < state.evaluation.primal)
            history_reset = history._replace(count=jnp.zeros_like(history.count))

            def accept(state: FistaState) -> FistaState:
                grad = problem.gradient(r)
                return state._replace(
                    U=U,
                    U_prev=U,
                    r=r,
                    r_prev=r,
                    grad=grad,
                    grad_prev=grad,
                    beta=beta,
                    momentum=jnp.ones_like(state.momentum),
                    history=history_reset._replace(accepted=history.accepted + 1),
                )

            return lax.cond(better, accept, lambda s: s._replace(history=history_reset), state)

        return lax.cond(history.count > self.anderson, extrapolate, lambda s: s, state)

    @staticmethod
    def _remember(history: AndersonHistory, U: Array) -> AndersonHistory:
        """``history`` with the new iterate stored at slot ``count``."""
        return history._replace(U=history.U.at[history.count].set(U), count=history.count + 1)

    def step(self, problem: Problem, lam: Array, state: FistaState) -> FistaState:
        datafit = problem.datafit
        if self.anderson:
            state = self._anderson(problem, lam, state)
        t = state.momentum
        t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        if not self.momentum:
            t_next = jnp.ones_like(t)
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
        grown = jnp.minimum(state.step * self.growth, state.max_step)
        start = (grown, V, r_V, state.beta, jnp.zeros((), jnp.int32), no)
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
            max_step=state.max_step,
            iteration=state.iteration + 1,
            evaluation=evaluation,
            subgrad_sq=subgrad_sq,
            backtracks=state.backtracks + count - 1,
            restarts=state.restarts + restart.astype(jnp.int32),
            linesearch_failed=~accepted,
            history=None if state.history is None else self._remember(state.history, U_new),
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
