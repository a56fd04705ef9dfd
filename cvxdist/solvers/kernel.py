r"""The N × N row kernel of ADMM's U-step (:mod:`cvxdist.solvers.admm`) and its solves.

:math:`P_\perp K P_\perp` with :math:`K = (XX^T) \odot (MM^T)`: formed densely
(:func:`dense_kernel`) or applied matrix-free (:func:`apply_kernel`, one adjoint and one
forward GEMM), factored by Cholesky or eigendecomposition (:class:`KernelFactor`), or solved
by conjugate gradients (:func:`pcg`) with a randomized Nyström preconditioner
(:func:`nystrom`). Plain gated rows only (:func:`check_kernel_problem`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.scipy.linalg import solve_triangular

from cvxdist import operators
from cvxdist.problems import GatedReluProblem

#: Largest number of (padded) rows for which the N × N kernel is formed by default.
DENSE_MAX_ROWS = 8000


class KernelFactor(NamedTuple):
    """What the kernel solve needs; unused members are ``None`` (fixed by static options)."""

    kernel: Array | None  # P⊥KP⊥, (Nₚ, Nₚ), when dense
    chol: Array | None  # lower Cholesky factor of N ρ_f I + P⊥KP⊥
    rho_factor: Array  # the ρ of ``chol``
    eigvals: Array | None  # eigendecomposition of P⊥KP⊥
    eigvecs: Array | None
    nys_vecs: Array | None  # Nyström approximation of P⊥KP⊥: vecs diag(vals) vecsᵀ
    nys_vals: Array | None


def flatten(R: Array) -> Array:
    return R.reshape(-1, R.shape[-1])


def unflatten(problem: GatedReluProblem, R: Array) -> Array:
    return R.reshape(problem.num_chunks, problem.chunk_rows, R.shape[-1])


def project(problem: GatedReluProblem, R: Array) -> Array:
    return operators.project_out_unregularized(problem, R)[0]


def dense_kernel(problem: GatedReluProblem) -> Array:
    """:math:`P_\\perp K P_\\perp` with :math:`K = (XX^T) \\odot (MM^T)`, ``(Nₚ, Nₚ)``.

    ``Nₚ = K · n`` counts the padding rows, whose rows and columns are zero.
    """
    X_flat = operators.to_device(problem, problem.X).reshape(-1, problem.num_features)
    masks = operators.map_chunks(
        problem, lambda X_k, M_k: operators.chunk_masks(problem, X_k, M_k).astype(X_k.dtype)
    )
    M = masks.reshape(X_flat.shape[0], -1)
    highest = lax.Precision.HIGHEST
    kernel = jnp.matmul(X_flat, X_flat.T, precision=highest) * jnp.matmul(M, M.T, precision=highest)
    if problem.skip or problem.bias:
        kernel = flatten(project(problem, unflatten(problem, kernel)))
        kernel = flatten(project(problem, unflatten(problem, kernel.T)))
    return 0.5 * (kernel + kernel.T)


def apply_kernel(problem: GatedReluProblem, V: Array) -> Array:
    """Matrix-free :math:`P_\\perp K P_\\perp V` for ``V (K, n, m)``: one adjoint and one
    forward GEMM with ``m`` columns."""
    V = project(problem, V)
    return project(problem, operators.forward(problem, operators.adjoint(problem, V)))


def apply_kernel_blocks(problem: GatedReluProblem, V: Array, width: int) -> Array:
    """``apply_kernel`` on the ``m`` columns of ``V (Nₚ, m)``, ``width`` columns at a time
    (``m`` a multiple of ``width``), so the chunk intermediate stays ``(n, P, width)``."""
    m = V.shape[1]
    blocks = V.reshape(V.shape[0], m // width, width).transpose(1, 0, 2)

    def one(block: Array) -> Array:
        return flatten(apply_kernel(problem, unflatten(problem, block)))

    out = lax.map(one, blocks)
    return out.transpose(1, 0, 2).reshape(V.shape[0], m)


def nystrom(
    matmat: Any,
    num_rows: int,
    rank: int,
    dtype: Any,
    key: Array,
    row_mask: Array | None = None,
) -> tuple[Array, Array]:
    """Randomized Nyström approximation ``vecs diag(vals) vecsᵀ`` of a PSD operator.

    Frangella, Tropp & Udell, "Randomized Nyström preconditioning" (2023), Algorithm 2.1,
    with the shift ν = √N ε ||Y||_F for stability. ``row_mask`` (1/0 per row) restricts the
    test matrix to the real rows (the operators assume zero padding rows).
    """
    omega = jax.random.normal(key, (num_rows, rank), dtype)
    if row_mask is not None:
        omega = omega * row_mask[:, None]
    omega, _ = jnp.linalg.qr(omega)
    sketch = matmat(omega)
    nu = jnp.sqrt(num_rows) * jnp.finfo(dtype).eps * jnp.linalg.norm(sketch)
    sketch = sketch + nu * omega
    core = omega.T @ sketch
    core = 0.5 * (core + core.T)
    # A tiny relative jitter keeps the Cholesky alive when the sketch is rank-deficient.
    jitter = jnp.finfo(dtype).eps * jnp.trace(core) * jnp.eye(rank, dtype=dtype)
    chol = jnp.linalg.cholesky(core + jitter)
    factor = solve_triangular(chol, sketch.T, lower=True).T
    vecs, sigma, _ = jnp.linalg.svd(factor, full_matrices=False)
    vals = jnp.maximum(sigma * sigma - nu, 0.0)
    return vecs, vals


def nystrom_precondition(vecs: Array, vals: Array, mu: Array, R: Array) -> Array:
    """Inverse Nyström preconditioner of ``μI + K``: ``(λ_ℓ + μ) V (Λ + μ)⁻¹ Vᵀ + I - VVᵀ``."""
    coeffs = vecs.T @ R
    scale = (vals[-1] + mu) / (vals + mu) - 1.0
    return R + vecs @ (scale[:, None] * coeffs)


def pcg(
    matvec: Any,
    precondition: Any,
    b: Array,
    x0: Array,
    tol: Array,
    max_iters: int,
) -> tuple[Array, Array, Array]:
    """Preconditioned CG on every column of ``b (Nₚ, c)`` at once (per-column step sizes).

    Stops when every column has reduced its warm-start residual ``r₀ = b - A x₀`` by
    ``tol`` (or reached rounding level, ``10 ε ||b||``), or after ``max_iters`` steps.
    Relative to ``r₀`` and not to ``b``: near convergence ``b`` barely changes between ADMM
    iterations, and a ``||b||``-relative test would skip the solve and stall ADMM.
    Returns the solution, its (recursive) residual ``b - A x`` and the number of steps.
    """
    r = b - matvec(x0)
    floor = 10.0 * jnp.finfo(b.dtype).eps * jnp.linalg.norm(b, axis=0)
    target = jnp.maximum(tol * jnp.linalg.norm(r, axis=0), floor)
    z = precondition(r)
    p = z
    rz = jnp.sum(r * z, axis=0)
    tiny = jnp.finfo(b.dtype).tiny

    def unfinished(carry: tuple) -> Array:
        _, r, _, _, k = carry
        return (k < max_iters) & jnp.any(jnp.linalg.norm(r, axis=0) > target)

    def body(carry: tuple) -> tuple:
        x, r, p, rz, k = carry
        Ap = matvec(p)
        curvature = jnp.sum(p * Ap, axis=0)
        alpha = jnp.where(curvature > tiny, rz / jnp.where(curvature > tiny, curvature, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * Ap
        z = precondition(r)
        rz_new = jnp.sum(r * z, axis=0)
        beta = jnp.where(rz > tiny, rz_new / jnp.where(rz > tiny, rz, 1.0), 0.0)
        return x, r, z + beta * p, rz_new, k + 1

    x, r, _, _, k = lax.while_loop(unfinished, body, (x0, r, p, rz, jnp.zeros((), jnp.int32)))
    return x, r, k


def check_kernel_problem(problem: object) -> None:
    """ADMM's U-step goes through the N × N row kernel of plain gated rows.

    Composed data terms (pooled rows, a head, per-group Jacobians, weighted sums of terms,
    :mod:`cvxdist.composed`) mix output columns and rows, so their kernel is not
    ``(XXᵀ) ⊙ (MMᵀ)`` acting on each column alike; they are solved by R-FISTA.
    """
    if not isinstance(problem, GatedReluProblem):
        raise ValueError(
            f"ADMM solves plain gated-row problems only, not a {type(problem).__name__} "
            "(composed data terms mix rows and outputs); use solver='fista'"
        )


def shifted_cholesky(kernel: Array, mu: Array) -> Array:
    """Lower Cholesky factor of ``μI + kernel``."""
    return jnp.linalg.cholesky(kernel + mu * jnp.eye(kernel.shape[0], dtype=kernel.dtype))


__all__ = [
    "DENSE_MAX_ROWS",
    "KernelFactor",
    "apply_kernel",
    "apply_kernel_blocks",
    "check_kernel_problem",
    "dense_kernel",
    "flatten",
    "nystrom",
    "nystrom_precondition",
    "pcg",
    "project",
    "shifted_cholesky",
    "unflatten",
]
