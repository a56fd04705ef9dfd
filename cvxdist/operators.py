r"""Matrix-free operators of the gated-ReLU problem.

With rows ``X (N, d)``, gates ``G (d, P)`` and masks ``M = 1[X G >= 0] (N, P)``:

.. math::

    A(U) = \sum_i M_{:, i} \odot (X U_i) \in R^{N \times c}, \qquad
    A^T(R)_i = X^T (M_{:, i} \odot R) \in R^{d \times c}.

Each is one GEMM plus an elementwise reduction, in one of two contraction orders chosen from
the static shapes (:func:`gate_first`):

- *feature first*: ``X_k @ U`` viewed as ``(d, P·c)``, then the masked sum over gates; the
  intermediate is ``(n, P, c)``;
- *gate first*: ``M_k @ U`` viewed as ``(P, d·c)``, then the row-wise dot with ``X_k``
  (adjoint: ``M_kᵀ @ (X_k ⊗ R_k)``); the intermediate is ``(n, d, c)``.

Both cost ``2·n·d·P·c`` flops in the GEMM; they differ in the memory-bound elementwise
part, ``n·P·c`` against ``n·(d·c + P)``, so gate first wins when ``c > 1`` and ``d < P``
(pyscnn's order). Rows live in
``K`` chunks of ``n`` rows (``problem.X`` has shape ``(K, n, d)``); the chunk loop is a
``lax.scan`` (``K`` is static), so the ``(n, P, c)`` intermediate is the peak memory. Masks
are either stored as booleans per chunk or recomputed from ``X_k G`` inside the loop; never
stored as an ``N × P`` float array.

The unregularized linear skip ``V`` and bias ``b`` are eliminated exactly: for fixed ``U`` they
are the least-squares fit of the remaining residual, so the solvers see the *projected*
residual :math:`r(U) = P_\perp (Y - A(U))` with :math:`P_\perp` the projector onto the
orthogonal complement of the columns of ``[X 1]``.

Placement and precision (static fields of the problem, see :mod:`cvxdist.problems`): with
``problem.stream`` each ``X_k`` is copied from host memory to the device at the top of the
chunk body; ``problem.precision`` selects the GEMMs of :func:`forward` and :func:`adjoint`
(``"bf16"``: bfloat16 operands, float32 accumulation). Masks and the skip/bias projection use
the problem dtype whatever the precision. Sharded rows need nothing here (see
:mod:`cvxdist.sharding`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import Array, lax


class GatedRows(Protocol):
    """The fields of :class:`cvxdist.problems.GatedRows` the operators read."""

    X: Array  # (K, n, d), in host memory when ``stream``
    G: Array  # (d, P)
    masks: Array | None  # (K, n, P) booleans, or None (recomputed per chunk)
    valid: Array | None  # (K, n) 1/0 row weights of padded rows
    gram_pinv: Array | None  # pseudo-inverse of the skip/bias Gram matrix
    gate_mask: Array | None  # (P,) live gates
    num_rows: int
    skip: bool
    bias: bool
    precision: str
    stream: bool

    @property
    def num_chunks(self) -> int: ...
    @property
    def num_gates(self) -> int: ...
    @property
    def num_features(self) -> int: ...


try:  # jax >= 0.6
    _DEVICE_MEMORY = jax.memory.Space.Device
except AttributeError:  # pragma: no cover - older jax
    _DEVICE_MEMORY = jax.sharding.TransferToMemoryKind("device")


def chunk_masks(problem: GatedRows, X_chunk: Array, mask_chunk: Array | None) -> Array:
    """Boolean masks ``(n, P)`` of one chunk, stored or recomputed from ``X_chunk @ G``.

    Gates switched off by ``problem.gate_mask`` get an all-``False`` column.
    """
    masks = mask_chunk if mask_chunk is not None else (X_chunk @ problem.G) >= 0
    if problem.gate_mask is not None:
        masks = masks & problem.gate_mask
    return masks


def matmul(problem: GatedRows, a: Array, b: Array) -> Array:
    """``a @ b`` with the problem's GEMM precision; the result has the operands' dtype.

    ``"bf16"`` rounds both operands to bfloat16 and accumulates in float32
    (``preferred_element_type``): the tensor-core path of accelerators.
    """
    if problem.precision == "bf16":
        out = jnp.matmul(
            a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        )
        return out.astype(jnp.result_type(a, b))
    precision = lax.Precision.HIGHEST if problem.precision == "highest" else None
    return jnp.matmul(a, b, precision=precision)


def _chunk_inputs(problem: GatedRows) -> tuple[Array, Array | None]:
    return problem.X, problem.masks


def to_device(problem: GatedRows, X: Array) -> Array:
    """``X`` (all of it or a chunk) in device memory: a host→device copy when streaming.

    Works eagerly and under ``jit`` (where a host array is typed ``f32<host>`` and cannot
    enter any computation before this copy).
    """
    return jax.device_put(X, _DEVICE_MEMORY) if problem.stream else X


def _fetching(problem: GatedRows, fn: Callable) -> Callable:
    """``fn`` with its ``X_k`` argument copied to device memory first when streaming."""
    if not problem.stream:
        return fn

    def fetched(X_k: Array, *args: Array | None):
        return fn(to_device(problem, X_k), *args)

    return fetched


def map_chunks(problem: GatedRows, fn: Callable, *chunked: Array | None) -> Array:
    """Apply ``fn(X_k, M_k, *args_k)`` to every chunk; outputs stacked along axis 0."""
    X, masks = _chunk_inputs(problem)
    fn = _fetching(problem, fn)
    if problem.num_chunks == 1:
        args = [None if a is None else a[0] for a in (X, masks, *chunked)]
        return jax.tree.map(lambda y: y[None], fn(*args))
    return lax.map(lambda args: fn(*args), (X, masks, *chunked))


def sum_chunks(problem: GatedRows, fn: Callable, *chunked: Array | None) -> Array:
    """Sum of ``fn(X_k, M_k, *args_k)`` over chunks, accumulated (never stacked)."""
    X, masks = _chunk_inputs(problem)
    fn = _fetching(problem, fn)
    if problem.num_chunks == 1:
        return fn(*[None if a is None else a[0] for a in (X, masks, *chunked)])

    def body(total: Array, args: tuple) -> tuple[Array, None]:
        return jax.tree.map(jnp.add, total, fn(*args)), None

    first_args = [None if a is None else a[0] for a in (X, masks, *chunked)]
    shapes = jax.eval_shape(fn, *first_args)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = lax.scan(body, zeros, (X, masks, *chunked))
    return total


def gate_first(num_features: int, num_gates: int, num_outputs: int) -> bool:
    """Whether the gate-first contraction order moves less memory (static shapes).

    Feature first streams an ``(n, P, c)`` intermediate, gate first an ``(n, d, c)`` one plus
    the ``(n, P)`` float masks.
    """
    return num_features * num_outputs + num_gates < num_gates * num_outputs


def forward(problem: GatedRows, U: Array) -> Array:
    """:math:`A(U)`: the gated part of the prediction, shape ``(K, n, c)``."""
    P, d, c = U.shape
    if gate_first(d, P, c):
        U_gates = U.reshape(P, d * c)

        def chunk(X_k: Array, M_k: Array | None) -> Array:
            masks = chunk_masks(problem, X_k, M_k).astype(X_k.dtype)
            mixed = matmul(problem, masks, U_gates).reshape(-1, d, c)
            return jnp.einsum("nd,ndc->nc", X_k, mixed)

        return map_chunks(problem, chunk)

    U_flat = jnp.transpose(U, (1, 0, 2)).reshape(d, P * c)

    def chunk(X_k: Array, M_k: Array | None) -> Array:
        masks = chunk_masks(problem, X_k, M_k)
        hidden = matmul(problem, X_k, U_flat).reshape(-1, P, c)
        return jnp.sum(hidden * masks[:, :, None].astype(hidden.dtype), axis=1)

    return map_chunks(problem, chunk)


def adjoint(problem: GatedRows, R: Array) -> Array:
    """:math:`A^T(R)` for residuals ``R (K, n, c)``; returns ``(P, d, c)``."""
    P = problem.num_gates
    c = R.shape[-1]
    d = problem.X.shape[-1]
    if gate_first(d, P, c):

        def chunk(X_k: Array, M_k: Array | None, R_k: Array) -> Array:
            masks = chunk_masks(problem, X_k, M_k).astype(X_k.dtype)
            outer = (X_k[:, :, None] * R_k[:, None, :]).reshape(-1, d * c)
            return matmul(problem, masks.T, outer)

        return sum_chunks(problem, chunk, R).reshape(P, d, c)

    def chunk(X_k: Array, M_k: Array | None, R_k: Array) -> Array:
        masks = chunk_masks(problem, X_k, M_k)
        masked = masks[:, :, None].astype(R_k.dtype) * R_k[:, None, :]
        return matmul(problem, X_k.T, masked.reshape(-1, P * c))

    flat = sum_chunks(problem, chunk, R)
    return jnp.transpose(flat.reshape(d, P, c), (1, 0, 2))


def _unregularized_features(problem: GatedRows, X_k: Array) -> Array:
    """Columns of the unregularized part for one chunk: ``[X_k, 1]``, ``X_k`` or ``1``."""
    parts = []
    if problem.skip:
        parts.append(X_k)
    if problem.bias:
        parts.append(jnp.ones((X_k.shape[0], 1), X_k.dtype))
    return jnp.concatenate(parts, axis=1)


def unregularized_forward(problem: GatedRows, beta: Array) -> Array:
    """``[X 1] β`` (the enabled columns), ``(K, n, c)``, zero on padding rows."""

    def chunk(X_k: Array, M_k: Array | None, valid_k: Array | None) -> Array:
        del M_k
        fitted = _unregularized_features(problem, X_k) @ beta
        return fitted if valid_k is None else fitted * valid_k[:, None]

    return map_chunks(problem, chunk, problem.valid)


def unregularized_adjoint(problem: GatedRows, R: Array) -> Array:
    """``[X 1]ᵀ R`` over the real rows, ``(d + 1, c)`` (the enabled columns)."""

    def chunk(X_k: Array, M_k: Array | None, R_k: Array, valid_k: Array | None) -> Array:
        del M_k
        if valid_k is not None:
            R_k = R_k * valid_k[:, None]
        return _unregularized_features(problem, X_k).T @ R_k

    return sum_chunks(problem, chunk, R, problem.valid)


def fit_unregularized(problem: GatedRows, R: Array) -> Array:
    """Least-squares coefficients ``beta`` of the skip/bias columns for residual ``R``.

    Returns ``beta`` of shape ``(d + 1, c)`` (skip rows first, bias last; only the parts
    that are enabled).
    """
    return problem.gram_pinv @ unregularized_adjoint(problem, R)


def project_out_unregularized(problem: GatedRows, R: Array) -> tuple[Array, Array | None]:
    """:math:`P_\\perp R` and the fitted skip/bias coefficients (``None`` without them)."""
    if not (problem.skip or problem.bias):
        return R, None
    beta = fit_unregularized(problem, R)
    return R - unregularized_forward(problem, beta), beta


def residual(problem: GatedRows, U: Array) -> tuple[Array, Array | None]:
    """:math:`r(U) = P_\\perp(Y - A(U))`, shape ``(K, n, c)``, and the skip/bias fit."""
    return project_out_unregularized(problem, problem.Y - forward(problem, U))


def split_unregularized(problem: GatedRows, beta: Array | None) -> tuple[Any, Any]:
    """Skip ``V (d, c)`` and bias ``b (c,)`` from the stacked least-squares coefficients."""
    if beta is None:
        return None, None
    d = problem.num_features
    V = beta[:d] if problem.skip else None
    b = beta[-1] if problem.bias else None
    return V, b


def rounding_guard(dtype: Any) -> float:
    """Relative rounding guard of safe bounds and tests: √eps of the dtype."""
    return math.sqrt(float(jnp.finfo(dtype).eps))


def gate_norm_bounds(problem: GatedRows) -> Array:
    """Upper bounds on ``‖A_i‖₂ = ‖D_i X‖₂`` for every gate, shape ``(P,)``.

    ``min(‖D_i X‖_F, ‖X‖₂)``, inflated by a ``√eps`` rounding guard; dead gates
    (``gate_mask`` False) get 0. One pass over the rows, GEMMs at full precision. (Power
    iterations would converge from below: not safe.) ``‖X‖₂`` is the tighter of the two
    except for gates that fire on very few rows.
    """
    highest = lax.Precision.HIGHEST

    def chunk(X_k: Array, M_k: Array | None) -> tuple[Array, Array]:
        masks = chunk_masks(problem, X_k, M_k).astype(X_k.dtype)
        row_sq = jnp.sum(X_k * X_k, axis=1)
        return jnp.matmul(row_sq, masks, precision=highest), jnp.matmul(
            X_k.T, X_k, precision=highest
        )

    fro_sq, gram = sum_chunks(problem, chunk)
    spectral_sq = jnp.linalg.eigvalsh(gram)[-1]
    bound_sq = jnp.minimum(fro_sq, spectral_sq) * (1.0 + rounding_guard(problem.X.dtype))
    return jnp.sqrt(jnp.maximum(bound_sq, 0.0))
