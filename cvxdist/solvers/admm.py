r"""ADMM for the gated-ReLU problem, with the linear step solved through the N × N kernel.

Splitting. With :math:`f(U) = \|P_\perp(Y - A(U))\|^2/(2N) = \|\tilde Y - BU\|^2/(2N)`,
:math:`B = P_\perp A`, ADMM solves :math:`\min f(U) + \lambda R(W)` s.t. :math:`U = W`
(scaled dual ``Z``, penalty ρ, over-relaxation α; Boyd et al. 2011, §3.4.3)::

    U⁺ = argmin f(U) + ρ/2 ||U - W + Z||²  = (BᵀB/N + ρI)⁻¹ V,   V = Bᵀ Ỹ/N + ρ (W - Z)
    Û  = α U⁺ + (1 - α) W
    W⁺ = prox_{(λ/ρ) R}(Û + Z)
    Z⁺ = Z + Û - W⁺

Kernel. By Woodbury, :math:`(\rho I + B^TB/N)^{-1} = \rho^{-1}(I - B^T(N\rho I + BB^T)^{-1}B)`,
and :math:`BB^T = P_\perp K P_\perp` with the N × N kernel
:math:`K = AA^T = \sum_i D_i X X^T D_i = (XX^T) \odot (MM^T)`. ``A`` acts on each output
column alike, so one kernel serves all ``c`` columns. The U-step is then

    s  = (NρI + P⊥KP⊥)⁻¹ B V,     U⁺ = (V - Bᵀ s)/ρ,     B U⁺ = N s  (exactly, if s is exact).

Per iteration: two adjoint GEMMs (``Bᵀ s`` for the U-step, ``Aᵀ r(W⁺)`` for the
certificate, every ``certify_every`` iterations), one forward GEMM (``A W⁺``), the kernel
solve and the prox; R-FISTA needs two GEMMs plus one per backtrack. ``B V`` needs no GEMM:
``B Z`` is carried and updated linearly. The kernel solve is, by ``linear_solver``:

- ``"cholesky"``: dense ``K``, Cholesky factor of ``NρI + P⊥KP⊥`` (O(N³), once; refactored
  through ``lax.cond`` when an adaptive ρ changes, so at most ``max_rho_updates`` times).
- ``"eigh"``: dense ``K = QΛQᵀ`` once; any ρ is then an exact O(N²c) solve, but the
  decomposition costs ~10-20 Cholesky factorizations.
- ``"cg"``: conjugate gradients, warm-started from the previous ``s``, with a randomized
  Nyström preconditioner (Frangella, Tropp & Udell 2023; CRONOS, Feng, Frangella & Pilanci
  2024) of rank ``nystrom_rank``, built once. The preconditioner of ``μI + K̂`` is analytic
  in μ = Nρ, so ρ may change without rebuilding it. The kernel is dense when
  ``N ≤ dense_max_rows`` (a product is O(N²c)), otherwise matrix-free (one forward and one
  adjoint GEMM per CG step, and a GEMM pair per sketch column to build the preconditioner).

``"auto"`` is ``cholesky`` when the padded row count is at most ``dense_max_rows`` (8000:
the kernel then takes ≤ 256 MiB in float32 and its factorization a few seconds on a CPU),
else ``cg``.

Certificate. The reported iterate is ``W`` (the prox output: exactly sparse), and the
stopping rule is :func:`cvxdist.duality.evaluate` at ``W`` with ``W``'s own residual and
gradient: the gap :func:`cvxdist.duality.certify` recomputes. (The U-step provides a
residual/gradient pair for free, ``r = Ỹ - N s`` and ``∇f(U⁺) = -Bᵀr/N``, whose dual point
is valid and often better; it is not used because then the reported gap would not be the
gap anyone recomputes at ``W``, and that costs the third GEMM.) With ``certify_every = k``
that third GEMM runs every ``k``-th iteration only (``lax.cond``); the solve then stops at
most ``k - 1`` iterations late, and returns the last certified ``W``, so the reported gap is
still the one recomputed at the returned weights.

The kernel, its factorizations and CG live in :mod:`cvxdist.solvers.kernel`.

Paths. ``eigh`` and ``cg`` factorizations do not depend on ρ or λ: :meth:`Admm.factorized`
returns the solver with its :class:`KernelFactor` computed once, and every solve of a λ path
(:func:`cvxdist.solvers.solve_path`) reuses it; residual-balancing ρ then costs no
refactorization either.

Penalty ρ. Initial ρ from λ and the data scales (``rho=None``; see :class:`Admm`), then
``adapt``:

- ``"none"`` (default): fixed ρ. On the benchmark problems a fixed ρ ≈ 0.5 λ (unit-norm
  columns, unit-variance targets) beat both adaptive rules below.
- ``"balance"``: residual balancing on relative residuals (Boyd et al. 2011, §3.4.1;
  Wohlberg 2017) every ``adapt_period`` iterations.
- ``"spectral"``: spectral penalty selection (AADMM, Xu, Figueiredo & Goldstein 2017):
  curvature estimates of f (from ``ΔU``, ``Δ∇f(U)``) and of λR (from ``ΔW``, ``Δ(ρZ)``)
  give ρ = sqrt(α̂ β̂), with their correlation safeguards. On group-lasso problems the zero
  groups inflate the λR estimate and ρ drifts high: measured slower than a fixed ρ.

λ, ρ and ``tol`` are traced; the options of :class:`Admm` are static (a new value recompiles),
except ``rho``, which is stored as an array (a new initial ρ does not recompile).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax
from jax.scipy.linalg import cho_solve

from cvxdist import operators
from cvxdist.duality import Evaluation, evaluate
from cvxdist.problems import GatedReluProblem
from cvxdist.prox import Regularizer
from cvxdist.solvers.common import IterativeSolver, Weights
from cvxdist.solvers.kernel import (
    DENSE_MAX_ROWS,
    KernelFactor,
    apply_kernel,
    apply_kernel_blocks,
    check_kernel_problem,
    dense_kernel,
    flatten,
    nystrom,
    nystrom_precondition,
    pcg,
    project,
    shifted_cholesky,
    unflatten,
)

LINEAR_SOLVERS = ("auto", "cholesky", "eigh", "cg")
ADAPTATIONS = ("none", "balance", "spectral")


def _optional_array(value: Any) -> Any:
    return None if value is None else np.asarray(value, np.float64)


class AdmmState(NamedTuple):
    U: Array  # U-step iterate (P, d, c)
    W: Array  # prox iterate, the certified one (P, d, c)
    Z: Array  # scaled dual (P, d, c)
    BW: Array  # P⊥A(W), (K, n, c)
    BZ: Array  # P⊥A(Z), carried linearly
    s: Array  # last kernel-system solution (Nₚ, c), the CG warm start
    W_certified: Array  # the W that ``evaluation`` certifies (W, or an older one)
    beta: Array | None  # skip/bias least-squares coefficients at W_certified
    rho: Array
    factor: KernelFactor
    corr: Array  # Bᵀ Ỹ / N, (P, d, c)
    B_corr: Array  # B Bᵀ Ỹ / N, (K, n, c)
    Y_tilde: Array  # P⊥ Y, (K, n, c)
    ref_U: Array  # spectral-ρ references: U, ∇f(U), W, ρZ at the last update
    ref_grad: Array
    ref_W: Array
    ref_y: Array
    iteration: Array
    evaluation: Evaluation
    subgrad_sq: Array
    cg_iterations: Array  # total CG steps
    refactors: Array  # Cholesky factorizations after init
    rho_updates: Array


class Admm(IterativeSolver):
    """ADMM with a kernel linear step, over-relaxation and an optional adaptive penalty.

    Attributes:
        reg: the regularizer.
        rho: initial penalty ρ (stored as an array: a new value does not recompile), or
            ``None`` for the default rule ``rho_scale · λ · x / y`` with ``x`` the rms column
            norm of ``X`` and ``y`` the rms entry of ``Ỹ`` (invariant under rescaling ``X``
            or ``Y``; with unit-norm columns and unit-variance targets it is ``0.5 λ``).
        rho_scale: the constant of the default rule (calibrated on the benchmark problems).
        relaxation: over-relaxation α ∈ (0, 2) (1 is plain ADMM).
        adapt: ``"none"`` (default), ``"balance"`` or ``"spectral"`` (module docstring).
        adapt_period: iterations between penalty updates.
        max_rho_updates: penalty updates per solve, at most (then ρ stays fixed, which keeps
            ADMM's convergence guarantee).
        linear_solver: ``"auto"`` (``cholesky`` with a dense kernel, else ``cg``),
            ``"cholesky"``, ``"eigh"`` or ``"cg"``.
        dense_max_rows: form the N × N kernel when the padded row count is at most this.
        nystrom_rank: rank of the Nyström preconditioner (``cg``); default ``2d + 16`` with a
            dense kernel, ``max(32, c)`` matrix-free (each sketch column costs a GEMM pair).
        cg_tol: CG stops once it has reduced the residual of its warm start by this factor
            (default 1e-8 in float64, 1e-4 in float32).
        cg_max_iters: CG steps per ADMM iteration, at most.
        seed: seed of the Nyström sketch.
        certify_every: compute the certificate (one adjoint GEMM of the three an iteration
            needs) every this many iterations (module docstring). 1 by default: ADMM's gap
            can oscillate near ``tol`` (float32, a poor ρ), and sampling it every third
            iteration was seen to miss every crossing.
        factor: a precomputed ρ-independent factorization (``eigh`` or ``cg``) of this
            problem's kernel, from :meth:`factorized` (arrays: a new one does not recompile).
    """

    reg: Regularizer
    rho: Any = eqx.field(default=None, converter=_optional_array)
    rho_scale: float = 0.5
    relaxation: float = 1.8
    adapt: str = "none"
    adapt_period: int = 10
    max_rho_updates: int = 10
    linear_solver: str = "auto"
    dense_max_rows: int = DENSE_MAX_ROWS
    nystrom_rank: int | None = None
    cg_tol: float | None = None
    cg_max_iters: int = 100
    seed: int = 0
    certify_every: int = 1
    factor: KernelFactor | None = None

    def __check_init__(self) -> None:
        if self.linear_solver not in LINEAR_SOLVERS:
            raise ValueError(
                f"linear_solver must be one of {', '.join(LINEAR_SOLVERS)}, "
                f"got {self.linear_solver!r}"
            )
        if self.adapt not in ADAPTATIONS:
            raise ValueError(f"adapt must be one of {', '.join(ADAPTATIONS)}, got {self.adapt!r}")
        if not 0.0 < self.relaxation < 2.0:
            raise ValueError(f"relaxation must be in (0, 2), got {self.relaxation}")
        if self.rho is not None and not (np.all(np.isfinite(self.rho)) and np.all(self.rho > 0)):
            raise ValueError(f"rho must be positive and finite, got {self.rho}")
        if self.certify_every < 1:
            raise ValueError(f"certify_every must be at least 1, got {self.certify_every}")

    def factorized(self, problem: GatedReluProblem) -> Admm:
        """This solver with the kernel factorization of ``problem`` computed once, for every
        λ and ρ of a path. Only ``eigh`` and ``cg`` factorizations are ρ-independent; with
        ``cholesky`` the solver is returned unchanged (each solve factors its own ρ)."""
        check_kernel_problem(problem)
        method, _ = self.resolved_linear_solver(problem)
        if method == "cholesky" or self.factor is not None:
            return self
        rho = jnp.ones((), problem.dtype)
        factor = eqx.filter_jit(self._factor)(problem, rho)
        return eqx.tree_at(lambda s: s.factor, self, factor, is_leaf=lambda x: x is None)

    def unprepared(self) -> Admm:
        """The solver without its precomputed factor (that factor belongs to one problem)."""
        return self if self.factor is None else dataclasses.replace(self, factor=None)

    # ----------------------------------------------------------------- kernel solve
    def resolved_linear_solver(self, problem: GatedReluProblem) -> tuple[str, bool]:
        """(method, dense kernel?) for this problem."""
        rows = problem.num_chunks * problem.chunk_rows
        dense = rows <= self.dense_max_rows
        method = self.linear_solver
        if method == "auto":
            method = "cholesky" if dense else "cg"
        if method in ("cholesky", "eigh") and not dense:
            raise ValueError(
                f"linear_solver={method!r} forms the N × N kernel, but N = {rows} > "
                f"dense_max_rows = {self.dense_max_rows}; use 'cg' or raise dense_max_rows"
            )
        return method, dense

    def _cg_tol(self, dtype: Any) -> float:
        if self.cg_tol is not None:
            return self.cg_tol
        return 1e-8 if dtype == jnp.float64 else 1e-4

    def _factor(self, problem: GatedReluProblem, rho: Array) -> KernelFactor:
        method, dense = self.resolved_linear_solver(problem)
        rows = problem.num_chunks * problem.chunk_rows
        dtype = problem.dtype
        none = KernelFactor(None, None, rho, None, None, None, None)
        kernel = dense_kernel(problem) if dense else None
        if method == "eigh":
            vals, vecs = jnp.linalg.eigh(kernel)
            return none._replace(eigvals=jnp.maximum(vals, 0.0), eigvecs=vecs)
        if method == "cholesky":
            return none._replace(
                kernel=kernel, chol=shifted_cholesky(kernel, problem.num_rows * rho)
            )
        if dense:
            rank = min(self.nystrom_rank or 2 * problem.num_features + 16, rows)
            matmat = lambda V: kernel @ V  # noqa: E731
        else:
            width = problem.num_outputs
            rank = self.nystrom_rank or max(32, width)
            rank = min(width * -(-rank // width), width * (rows // width) or rows)
            matmat = lambda V: apply_kernel_blocks(problem, V, width)  # noqa: E731
        row_mask = None if problem.valid is None else problem.valid.reshape(-1)
        key = jax.random.PRNGKey(self.seed)
        vecs, vals = nystrom(matmat, rows, rank, dtype, key, row_mask)
        return none._replace(kernel=kernel, nys_vecs=vecs, nys_vals=vals)

    def _solve_kernel(
        self,
        problem: GatedReluProblem,
        factor: KernelFactor,
        rho: Array,
        b: Array,
        x0: Array,
    ) -> tuple[Array, Array, Array, KernelFactor, Array]:
        """Solve ``(NρI + P⊥KP⊥) s = b`` for ``b (Nₚ, c)``.

        Returns ``s``, the residual ``b - (NρI + P⊥KP⊥) s`` (zero for the direct solves),
        the CG steps, the factor (refactored if ρ changed) and whether it was refactored.
        """
        method, dense = self.resolved_linear_solver(problem)
        mu = problem.num_rows * rho
        zero = jnp.zeros((), jnp.int32)
        no = jnp.zeros((), bool)
        if method == "eigh":
            coeffs = factor.eigvecs.T @ b
            s = factor.eigvecs @ (coeffs / (factor.eigvals + mu)[:, None])
            return s, jnp.zeros_like(b), zero, factor, no
        if method == "cholesky":
            refactored = no
            if self.adapt != "none":  # static: a fixed ρ never refactors
                refactored = rho != factor.rho_factor
                chol = lax.cond(
                    refactored,
                    lambda: shifted_cholesky(factor.kernel, mu),
                    lambda: factor.chol,
                )
                factor = factor._replace(chol=chol, rho_factor=rho)
            s = cho_solve((factor.chol, True), b)
            return s, jnp.zeros_like(b), zero, factor, refactored

        if dense:

            def matvec(V: Array) -> Array:
                return mu * V + factor.kernel @ V

        else:

            def matvec(V: Array) -> Array:
                return mu * V + flatten(apply_kernel(problem, unflatten(problem, V)))

        def precondition(R: Array) -> Array:
            return nystrom_precondition(factor.nys_vecs, factor.nys_vals, mu, R)

        tol = self._cg_tol(b.dtype)
        s, res, steps = pcg(matvec, precondition, b, x0, tol, self.cg_max_iters)
        return s, res, steps, factor, no

    # ----------------------------------------------------------------- interface
    def _initial_rho(self, problem: GatedReluProblem, lam: Array, Y_tilde: Array) -> Array:
        """``rho`` if given, else ``rho_scale · λ · x / y`` (see the class docstring)."""
        dtype = problem.dtype
        if self.rho is not None:
            return jnp.asarray(self.rho, dtype)
        X = operators.to_device(problem, problem.X)
        x_scale = jnp.sqrt(jnp.sum(X * X) / problem.num_features)
        y_sq = jnp.sum(Y_tilde * Y_tilde) / (problem.num_rows * problem.num_outputs)
        y_scale = jnp.sqrt(jnp.where(y_sq > 0, y_sq, 1.0))
        rho = self.rho_scale * lam * x_scale / y_scale
        # λ = 0 (least squares) still needs a positive penalty: use the curvature scale.
        fallback = jnp.sum(X * X) / (problem.num_rows * problem.num_features)
        return jnp.where(rho > 0, rho, jnp.maximum(fallback, jnp.finfo(dtype).tiny)).astype(dtype)

    def init(self, problem: GatedReluProblem, U0: Array, lam: Array) -> AdmmState:
        check_kernel_problem(problem)
        N = problem.num_rows
        dtype = U0.dtype
        Y_tilde = problem.project(problem.Y)[0]
        rho = self._initial_rho(problem, lam, Y_tilde)
        reuse = self.factor is not None and self.resolved_linear_solver(problem)[0] != "cholesky"
        corr = operators.adjoint(problem, Y_tilde) / N
        B_corr = project(problem, operators.forward(problem, corr))
        r_W, beta = operators.residual(problem, U0)
        grad = -operators.adjoint(problem, r_W) / N
        BW = Y_tilde - r_W
        # Dual-consistent start (at a fixed point ρZ = -∇f(W)): a warm start from a nearby
        # solution keeps its dual.
        Z = -grad / rho
        BZ = project(problem, operators.forward(problem, Z))
        factor = self.factor._replace(rho_factor=rho) if reuse else self._factor(problem, rho)
        rows = problem.num_chunks * problem.chunk_rows
        evaluation = evaluate(problem, self.reg, lam, U0, r_W, grad)
        zero = jnp.zeros((), jnp.int32)
        return AdmmState(
            U=U0,
            W=U0,
            Z=Z,
            BW=BW,
            BZ=BZ,
            s=jnp.zeros((rows, problem.num_outputs), dtype),
            W_certified=U0,
            beta=beta,
            rho=rho,
            factor=factor,
            corr=corr,
            B_corr=B_corr,
            Y_tilde=Y_tilde,
            ref_U=U0,
            ref_grad=grad,
            ref_W=U0,
            ref_y=rho * Z,
            iteration=zero,
            evaluation=evaluation,
            subgrad_sq=self.reg.min_norm_subgradient_sq(U0, grad, lam, 1.0 / rho),
            cg_iterations=zero,
            refactors=zero,
            rho_updates=zero,
        )

    def step(self, problem: GatedReluProblem, lam: Array, state: AdmmState) -> AdmmState:
        N = problem.num_rows
        rho = state.rho
        alpha = self.relaxation
        # U-step through the kernel: s = (NρI + P⊥KP⊥)⁻¹ B V, U = (V - Bᵀs)/ρ, BU = N s.
        V = state.corr + rho * (state.W - state.Z)
        BV = state.B_corr + rho * (state.BW - state.BZ)
        s, res, steps, factor, refactored = self._solve_kernel(
            problem, state.factor, rho, flatten(BV), state.s
        )
        s_proj = project(problem, unflatten(problem, s))
        adj_s = operators.adjoint(problem, s_proj)
        U = (V - adj_s) / rho
        BU = N * s_proj + unflatten(problem, res) / rho
        grad_U = adj_s - state.corr  # ∇f(U) = -Bᵀ(Ỹ - N s)/N
        # Relaxed prox step and dual update.
        U_hat = alpha * U + (1.0 - alpha) * state.W
        BU_hat = alpha * BU + (1.0 - alpha) * state.BW
        W = self.reg.prox(U_hat + state.Z, lam, 1.0 / rho)
        Z = state.Z + U_hat - W
        r_W, beta = operators.residual(problem, W)
        BW = state.Y_tilde - r_W
        BZ = state.BZ + BU_hat - BW
        iteration = state.iteration + 1

        def certified() -> tuple:
            # The certificate at W: its own residual and gradient (what certify computes).
            grad_W = -operators.adjoint(problem, r_W) / N
            evaluation = evaluate(problem, self.reg, lam, W, r_W, grad_W)
            subgrad_sq = self.reg.min_norm_subgradient_sq(W, grad_W, lam, 1.0 / rho)
            return evaluation, subgrad_sq, W, beta

        if self.certify_every == 1:
            evaluation, subgrad_sq, W_certified, beta = certified()
        else:
            evaluation, subgrad_sq, W_certified, beta = lax.cond(
                iteration % self.certify_every == 0,
                certified,
                lambda: (state.evaluation, state.subgrad_sq, state.W_certified, state.beta),
            )
        # Penalty update; the scaled dual is rescaled so that ρZ is unchanged.
        new_rho, refs = self._update_rho(state, iteration, rho, U, grad_U, W, Z)
        scale = rho / new_rho
        return state._replace(
            U=U,
            W=W,
            Z=Z * scale,
            BW=BW,
            BZ=BZ * scale,
            s=s,
            W_certified=W_certified,
            beta=beta,
            rho=new_rho,
            factor=factor,
            ref_U=refs[0],
            ref_grad=refs[1],
            ref_W=refs[2],
            ref_y=refs[3],
            iteration=iteration,
            evaluation=evaluation,
            subgrad_sq=subgrad_sq,
            cg_iterations=state.cg_iterations + steps,
            refactors=state.refactors + refactored.astype(jnp.int32),
            rho_updates=state.rho_updates + (new_rho != rho).astype(jnp.int32),
        )

    def _update_rho(
        self,
        state: AdmmState,
        iteration: Array,
        rho: Array,
        U: Array,
        grad_U: Array,
        W: Array,
        Z: Array,
    ) -> tuple[Array, tuple[Array, Array, Array, Array]]:
        refs = (state.ref_U, state.ref_grad, state.ref_W, state.ref_y)
        if self.adapt == "none":
            return rho, refs
        tiny = jnp.finfo(rho.dtype).tiny
        due = ((iteration % self.adapt_period) == 0) & (state.rho_updates < self.max_rho_updates)
        y = rho * Z
        if self.adapt == "balance":
            # Relative residuals (Wohlberg 2017): ||U - W|| / max(||U||, ||W||) against
            # ||W - W_prev|| / ||Z||; μ = 10, τ = 2 (Boyd et al. §3.4.1).
            primal_res = jnp.linalg.norm(U - W) / jnp.maximum(
                jnp.maximum(jnp.linalg.norm(U), jnp.linalg.norm(W)), tiny
            )
            dual_res = jnp.linalg.norm(W - state.W) / jnp.maximum(jnp.linalg.norm(Z), tiny)
            proposal = jnp.where(
                primal_res > 10.0 * dual_res,
                2.0 * rho,
                jnp.where(dual_res > 10.0 * primal_res, 0.5 * rho, rho),
            )
            return jnp.where(due, proposal, rho), refs
        # Spectral (AADMM): curvature of f from (ΔU, Δ∇f(U)), of λR from (ΔW, Δ(ρZ)).

        def curvature(dx: Array, dg: Array) -> tuple[Array, Array]:
            xg, xx, gg = jnp.sum(dx * dg), jnp.sum(dx * dx), jnp.sum(dg * dg)
            steepest = gg / jnp.where(xg > tiny, xg, 1.0)
            minimum_gradient = xg / jnp.where(xx > tiny, xx, 1.0)
            hybrid = jnp.where(
                2.0 * minimum_gradient > steepest,
                minimum_gradient,
                steepest - 0.5 * minimum_gradient,
            )
            return hybrid, xg / jnp.maximum(jnp.sqrt(xx * gg), tiny)

        alpha_hat, alpha_cor = curvature(U - state.ref_U, grad_U - state.ref_grad)
        beta_hat, beta_cor = curvature(W - state.ref_W, y - state.ref_y)
        good_a = (alpha_cor > 0.2) & (alpha_hat > 0)
        good_b = (beta_cor > 0.2) & (beta_hat > 0)
        proposal = jnp.where(
            good_a & good_b,
            jnp.sqrt(jnp.abs(alpha_hat * beta_hat)),
            jnp.where(good_a, alpha_hat, jnp.where(good_b, beta_hat, rho)),
        )
        new_rho = jnp.where(due & jnp.isfinite(proposal) & (proposal > 0), proposal, rho)
        new_refs = tuple(
            jnp.where(due, new, old) for new, old in zip((U, grad_U, W, y), refs, strict=True)
        )
        return new_rho, new_refs

    def certificate(self, state: AdmmState) -> tuple[Evaluation, Array]:
        return state.evaluation, state.subgrad_sq

    def postprocess(self, problem: GatedReluProblem, lam: Array, state: AdmmState) -> Weights:
        V, b = problem.split_unregularized(state.beta)
        return Weights(state.W_certified, V, b)

    def stats_extra(self, state: AdmmState) -> Array:
        return state.rho


__all__ = [
    "DENSE_MAX_ROWS",
    "Admm",
    "AdmmState",
    "KernelFactor",
    "apply_kernel",
    "check_kernel_problem",
    "dense_kernel",
    "nystrom",
]
