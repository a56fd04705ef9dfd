r"""The convex gated-ReLU problem.

Rows :math:`a_j \in R^d` (``X``, ``N × d``), targets :math:`y_j \in R^c` (``Y``), fixed gates
:math:`g_i \in R^d` (``G``, ``d × P``), masks :math:`m_{ij} = 1[g_i \cdot a_j \ge 0]`:

.. math::

    \min_{U, V, b} \; F(U) = \frac{1}{2N} \sum_j \Big\| \sum_i m_{ij} U_i^T a_j + V^T a_j + b
    - y_j \Big\|^2 + \lambda R(U)

with ``U`` of shape ``(P, d, c)``; the linear skip ``V`` and bias ``b`` are optional and
unregularized (eliminated by projection, see :mod:`cvxdist.operators`).

Duality gap. With :math:`\tilde Y = P_\perp Y` and :math:`r = P_\perp(Y - A(U))`, the dual is

.. math::

    D(w) = \langle w, \tilde Y\rangle - \frac{N}{2}\|w\|^2 - (\lambda R)^*(A^T w),

and the dual point is the scaled residual :math:`w = s\, r / N`, with :math:`s` the best
feasible scaling. The relative gap :math:`(F(U) - D(w)) / F(U)` bounds the relative
suboptimality of ``U``.

Static vs traced: array shapes, the chunking, whether masks are stored, and whether the skip
and bias exist are static (they set shapes); λ is always a traced argument.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from cvxdist import operators
from cvxdist.prox import Regularizer

#: Largest ``n · P · c`` intermediate (elements) a chunk may create by default (256 MiB f32).
DEFAULT_CHUNK_ELEMENTS = 2**26
#: Masks are stored as booleans when ``N · P`` is at most this many bytes.
DEFAULT_MASK_BYTES = 2**31


class GatedReluProblem(eqx.Module):
    """Data of one gated-ReLU problem, rows split in ``K`` chunks of ``n`` rows.

    Attributes:
        X: rows, ``(K, n, d)``, zero-padded past the last real row.
        Y: targets, ``(K, n, c)``, zero-padded.
        G: gate vectors, ``(d, P)``.
        masks: ``(K, n, P)`` booleans, or ``None`` to recompute them from ``X G`` per chunk.
        valid: ``(K, n)`` 1/0 row weights when rows were padded, else ``None``.
        gram_pinv: pseudo-inverse of the Gram matrix of the skip/bias columns, or ``None``.
        num_rows: the true ``N`` (static).
        skip, bias: whether the unregularized linear skip / bias are part of the model.
    """

    X: Array
    Y: Array
    G: Array
    masks: Array | None
    valid: Array | None
    gram_pinv: Array | None
    num_rows: int = eqx.field(static=True)
    skip: bool = eqx.field(static=True, default=False)
    bias: bool = eqx.field(static=True, default=False)

    @property
    def num_chunks(self) -> int:
        return self.X.shape[0]

    @property
    def chunk_rows(self) -> int:
        return self.X.shape[1]

    @property
    def num_features(self) -> int:
        return self.X.shape[2]

    @property
    def num_outputs(self) -> int:
        return self.Y.shape[2]

    @property
    def num_gates(self) -> int:
        return self.G.shape[1]

    @property
    def dtype(self) -> jnp.dtype:
        return self.X.dtype

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return (self.num_gates, self.num_features, self.num_outputs)

    def zeros(self) -> Array:
        """All-zero weights ``U`` of shape ``(P, d, c)``."""
        return jnp.zeros(self.weight_shape, self.dtype)

    def rows(self) -> tuple[Array, Array]:
        """The unpadded ``X (N, d)`` and ``Y (N, c)``."""
        X = self.X.reshape(-1, self.num_features)[: self.num_rows]
        Y = self.Y.reshape(-1, self.num_outputs)[: self.num_rows]
        return X, Y


def _as_2d(name: str, array: np.ndarray) -> np.ndarray:
    if array.ndim == 1 and name == "Y":
        return array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {array.shape}")
    return array


def validate_arrays(X: object, Y: object, G: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes and finiteness of host arrays; returns them as 2-D numpy arrays.

    Raises:
        ValueError: with one line naming the array and the problem.
    """
    arrays = {}
    for name, value in (("X", X), ("Y", Y), ("G", G)):
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise ValueError(f"{name} must be a real numeric array, got dtype {array.dtype}")
        array = _as_2d(name, array)
        if array.size == 0:
            raise ValueError(f"{name} is empty (shape {array.shape})")
        if not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise ValueError(f"{name} contains {bad} NaN or Inf value(s)")
        arrays[name] = array
    X, Y, G = arrays["X"], arrays["Y"], arrays["G"]
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; they must match")
    if G.shape[0] != X.shape[1]:
        raise ValueError(
            f"G must have shape (d, P) with d = {X.shape[1]} (the columns of X), got {G.shape}"
        )
    return X, Y, G


def default_chunk_rows(num_rows: int, num_gates: int, num_outputs: int) -> int:
    """Rows per chunk so that the ``(n, P, c)`` intermediate stays under the default budget."""
    per_row = max(1, num_gates * num_outputs)
    return max(1, min(num_rows, DEFAULT_CHUNK_ELEMENTS // per_row))


def make_problem(
    X: object,
    Y: object,
    G: object,
    *,
    skip: bool = False,
    bias: bool = False,
    chunk_rows: int | None = None,
    store_masks: bool | None = None,
    dtype: jnp.dtype | str | None = None,
) -> GatedReluProblem:
    """Build a :class:`GatedReluProblem` from host or device arrays.

    Args:
        X: rows ``(N, d)``.
        Y: targets ``(N, c)`` or ``(N,)``.
        G: gates ``(d, P)`` (a zero column gives the all-ones, i.e. linear, pattern).
        skip: add an unregularized linear skip ``V (d, c)``.
        bias: add an unregularized bias ``b (c,)``.
        chunk_rows: rows per chunk; default keeps the ``(n, P, c)`` intermediate ≤ 256 MiB.
        store_masks: store boolean masks (default: when ``N · P`` ≤ 2 GiB).
        dtype: float dtype (default: X's float dtype, canonicalized as JAX does).

    Raises:
        ValueError: wrong shapes, NaN/Inf, empty arrays, bad chunk size.
    """
    X, Y, G = validate_arrays(X, Y, G)
    if dtype is None:  # follow JAX: float64 input becomes float32 unless x64 is enabled
        floating = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float32
        dtype = jax.dtypes.canonicalize_dtype(floating)
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError("float64 problems need jax.config.update('jax_enable_x64', True)")
    N = X.shape[0]
    c = Y.shape[1]
    P = G.shape[1]
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(N, P, c)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows}")
    chunk_rows = min(int(chunk_rows), N)
    K = math.ceil(N / chunk_rows)
    padded = K * chunk_rows
    if store_masks is None:
        store_masks = N * P <= DEFAULT_MASK_BYTES

    def chunked(a: np.ndarray) -> Array:
        a = jnp.asarray(a, dtype)
        if padded > N:
            a = jnp.concatenate([a, jnp.zeros((padded - N, a.shape[1]), dtype)])
        return a.reshape(K, chunk_rows, a.shape[1])

    Xc, Yc, Gd = chunked(X), chunked(Y), jnp.asarray(G, dtype)
    masks = _compute_masks(Xc, Gd) if store_masks else None
    valid = None
    if padded > N:
        valid = (jnp.arange(padded) < N).astype(dtype).reshape(K, chunk_rows)
    gram_pinv = _unregularized_gram_pinv(X, skip, bias, dtype)
    return GatedReluProblem(Xc, Yc, Gd, masks, valid, gram_pinv, N, bool(skip), bool(bias))


@jax.jit
def _compute_masks(X: Array, G: Array) -> Array:
    return jax.lax.map(lambda X_k: (X_k @ G) >= 0, X)


def _unregularized_gram_pinv(
    X: np.ndarray, skip: bool, bias: bool, dtype: jnp.dtype
) -> Array | None:
    if not (skip or bias):
        return None
    columns = []
    if skip:
        columns.append(np.asarray(X, np.float64))
    if bias:
        columns.append(np.ones((X.shape[0], 1)))
    features = np.concatenate(columns, axis=1)
    gram = features.T @ features
    return jnp.asarray(np.linalg.pinv(gram, rcond=1e-10, hermitian=True), dtype)


class Evaluation(NamedTuple):
    """Primal and dual quantities of the problem at one ``U``."""

    primal: Array  # F(U)
    dual: Array  # D(w) at the scaled-residual dual point
    rel_gap: Array  # (F - D) / F
    loss: Array  # data term 1/(2N)||r||^2
    penalty: Array  # R(U) (without λ)


def evaluate(
    problem: GatedReluProblem,
    reg: Regularizer,
    lam: Array,
    U: Array,
    r: Array,
    grad: Array,
) -> Evaluation:
    """Objective, dual objective and relative duality gap at ``U``.

    Args:
        r: projected residual :math:`P_\\perp(Y - A(U))`, ``(K, n, c)``.
        grad: gradient of the data term at ``U``, :math:`-A^T(r)/N`, ``(P, d, c)``.
    """
    N = problem.num_rows
    loss = 0.5 * jnp.sum(r * r) / N
    penalty = reg.value(U)
    primal = loss + lam * penalty
    # D(s r / N) = s <r, Ỹ>/N - s² ||r||²/(2N) - (λR)*(-s grad), and <r, Ỹ> = <r, Y> because
    # r is already projected. For norms, the best s in [0, s_max] has a closed form.
    linear = jnp.sum(r * problem.Y) / N
    if reg.finite_conjugate:
        s = jnp.ones((), r.dtype)
    else:
        s_best = linear / jnp.where(loss > 0, 2.0 * loss, 1.0)
        s = jnp.clip(s_best, 0.0, reg.dual_scale(grad, lam))
    dual = s * linear - s * s * loss - reg.conjugate(s * grad, lam)
    floor = jnp.finfo(primal.dtype).eps * 0.5 * jnp.sum(problem.Y * problem.Y) / N
    rel_gap = jnp.maximum(primal - dual, 0.0) / jnp.maximum(primal, floor)
    return Evaluation(primal, dual, rel_gap, loss, penalty)


def target_projected(problem: GatedReluProblem) -> Array:
    """:math:`\\tilde Y = P_\\perp Y`, ``(K, n, c)``."""
    return operators.project_out_unregularized(problem, problem.Y)[0]


def target_energy(problem: GatedReluProblem) -> Array:
    """:math:`\\|\\tilde Y\\|^2 / (2N)`: the objective of the zero model."""
    Y_tilde = target_projected(problem)
    return 0.5 * jnp.sum(Y_tilde * Y_tilde) / problem.num_rows


def correlation(problem: GatedReluProblem) -> Array:
    """:math:`A^T(\\tilde Y)/N`, ``(P, d, c)``: the negative gradient at ``U = 0``."""
    return operators.adjoint(problem, target_projected(problem)) / problem.num_rows


@eqx.filter_jit
def lam_max(problem: GatedReluProblem, reg: Regularizer) -> Array:
    """Smallest λ at which ``U = 0`` is optimal for ``reg``."""
    return reg.lam_max(correlation(problem))
