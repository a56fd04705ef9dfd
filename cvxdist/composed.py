r"""Composed data terms: fit what the rest of the network reads (DESIGN §2a).

The student's output at row ``r`` is linear in its weights, :math:`s_r = \sum_i m_{ir} U_i^T a_r
+ V^T a_r + b`. A *data term* compares a fixed linear readout of the outputs
(:mod:`cvxdist.readouts`: pooling ``S``, a head ``H``, per-group Jacobians) with targets:

.. math::

    f_t(U, \beta) = \tfrac12 c_t \|H_t S_t (A_t U + F_t \beta) - T_t\|^2,
    \qquad c_t = w_t / N_t,

and a :class:`ComposedProblem` minimises a weighted sum of terms that share ``U`` and the
skip/bias ``β = (V, b)``, plus :math:`\lambda R(U)`. Its operator is
:math:`\mathcal A = (H_t S_t A_t)_t`, its data fit :class:`cvxdist.datafit.Quadratic` with
scales ``c_t``; through the :class:`cvxdist.duality.Problem` interface the duality gap,
λ_max, R-FISTA, gap-safe screening and the phases apply unchanged.

The rows of a term (its ``A_t``) are either

- a :class:`cvxdist.problems.GatedReluProblem` over location rows, chunked so that chunks hold
  whole groups (images), whose own targets are unused (:func:`gated_rows`); or
- :class:`PooledRows`: the per-gate pooled features :math:`\Phi_i(x_n) = \frac1L \sum_l m_{il}
  a_l` (``N × P × d``), formed once (:func:`pooled_rows`). Then ``S A`` costs one GEMM of
  ``N·P·d·c`` instead of a pass over all ``N·L`` location rows: use it when ``N·P·d`` fits.

Skip and bias are eliminated exactly, as in the plain problem, by the ``C``-orthogonal
projection onto the complement of the range of :math:`\beta \mapsto (H_t S_t F_t \beta)_t`.
Its ``(d+1)c × (d+1)c`` Gram matrix is formed once (one application of the normal map per
basis vector), so a composed problem with a skip needs ``(d+1)·c`` up to a few thousand.

ADMM does not apply: its U-step needs the row kernel acting on every output column alike,
which a head or a Jacobian mixes; :func:`cvxdist.solvers.choose_solver` picks R-FISTA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from cvxdist import operators
from cvxdist.datafit import Quadratic
from cvxdist.problems import (
    PRECISIONS,
    GatedReluProblem,
    default_chunk_rows,
    make_problem,
    padded_index,
)
from cvxdist.readouts import Readout


class PooledRows(eqx.Module):
    """Per-gate pooled features as the row operator of a data term.

    ``A(U)_n = Σ_i Φ_i(x_n)ᵀ U_i`` with ``Φ (K, n, P, d)``; the unregularized features are the
    pooled rows ``x̄_n = mean_l a_l`` (``Xbar (K, n, d)``) and a one.

    Attributes:
        Phi: ``(K, n, P, d)`` per-gate pooled features, zero-padded past the last group.
        Xbar: ``(K, n, d)`` pooled rows.
        G: ``(d, P)`` the gates the features were pooled with (kept for restrictions).
        valid: ``(K, n)`` 1/0 weights of padded groups, or ``None``.
        gate_mask: ``(P,)`` live gates, or ``None``.
        num_rows: the number of real groups (static).
        num_outputs: ``c``, the width of the student's outputs (static).
    """

    Phi: Array
    Xbar: Array
    G: Array
    valid: Array | None
    gate_mask: Array | None
    num_rows: int = eqx.field(static=True)
    num_outputs: int = eqx.field(static=True)
    skip: bool = eqx.field(static=True, default=False)
    bias: bool = eqx.field(static=True, default=False)
    precision: str = eqx.field(static=True, default="default")

    @property
    def num_gates(self) -> int:
        return self.Phi.shape[2]

    @property
    def num_features(self) -> int:
        return self.Phi.shape[3]

    def _live(self, U: Array) -> Array:
        return U if self.gate_mask is None else U * self.gate_mask[:, None, None]

    def forward(self, U: Array) -> Array:
        """:math:`\\sum_i \\Phi_i^T U_i`, ``(K, n, c)``: one GEMM."""
        K, n, P, d = self.Phi.shape
        flat = operators.matmul(
            self, self.Phi.reshape(K * n, P * d), self._live(U).reshape(P * d, -1)
        )
        return flat.reshape(K, n, -1)

    def adjoint(self, R: Array) -> Array:
        """:math:`(\\sum_n \\Phi_{n,i} R_n^T)_i`, ``(P, d, c)``: one GEMM."""
        K, n, P, d = self.Phi.shape
        flat = operators.matmul(self, self.Phi.reshape(K * n, P * d).T, R.reshape(K * n, -1))
        return self._live(flat.reshape(P, d, -1))

    def _features(self) -> Array:
        parts = ([self.Xbar] if self.skip else []) + (
            [jnp.ones((*self.Xbar.shape[:2], 1), self.Xbar.dtype)] if self.bias else []
        )
        features = jnp.concatenate(parts, axis=2)
        return features if self.valid is None else features * self.valid[..., None]

    def unregularized_forward(self, beta: Array) -> Array:
        """``[x̄ 1] β``, ``(K, n, c)``, zero on padding groups."""
        return self._features() @ beta

    def unregularized_adjoint(self, R: Array) -> Array:
        """``[x̄ 1]ᵀ R`` over the real groups, ``(d + 1, c)`` (the enabled columns)."""
        features = self._features()
        return features.reshape(-1, features.shape[-1]).T @ R.reshape(-1, R.shape[-1])

    def operator_norms(self) -> Array:
        """``‖Φ_i‖_F ≥ ‖A_i‖₂`` per gate, with a rounding guard; dead gates 0."""
        norms_sq = jnp.sum(self.Phi * self.Phi, axis=(0, 1, 3))
        norms = jnp.sqrt(norms_sq * (1.0 + operators.rounding_guard(self.Phi.dtype)))
        return norms if self.gate_mask is None else norms * self.gate_mask

    def restrict_gates(self, index: np.ndarray, size: int) -> PooledRows:
        """The features of gates ``index`` only, padded with dead gates to ``size``."""
        take, live = padded_index(index, size)
        if self.gate_mask is not None:
            live = live & np.asarray(self.gate_mask)[take]
        return dataclasses.replace(
            self, Phi=self.Phi[:, :, take], G=self.G[:, take], gate_mask=jnp.asarray(live)
        )

    def with_precision(self, precision: str) -> PooledRows:
        return (
            self if precision == self.precision else dataclasses.replace(self, precision=precision)
        )


RowOperator = GatedReluProblem | PooledRows


class DataTerm(eqx.Module):
    """``½ c ‖readout(A U + F β) − T‖²`` over one set of rows (see the module docstring).

    Attributes:
        rows: the row operator ``A`` (and its unregularized features ``F``).
        readout: ``H S``, a :class:`cvxdist.readouts.Readout` from the rows' outputs
            ``(K, n, c)`` to the targets' shape.
        targets: ``T (K, m, k)``, zero-padded like the rows.
        scale: ``c = weight / N`` with ``N`` the number of real groups (static).
    """

    rows: RowOperator
    readout: Readout
    targets: Array
    scale: float = eqx.field(static=True)


class ComposedProblem(eqx.Module):
    """A weighted sum of data terms sharing the weights (see the module docstring).

    Attributes:
        terms: the data terms.
        G: ``(d, P)`` the shared gates.
        gram_pinv: pseudo-inverse of the weighted Gram matrix of the skip/bias map,
            ``((d+1)c, (d+1)c)``, or ``None`` without skip and bias.
        num_outputs: ``c``, the width of the student's outputs that every readout reads.
        gate_mask: ``(P,)`` live gates, or ``None``.
        skip, bias: the unregularized linear skip / bias (static).
        precision: GEMM precision of every term (static).
    """

    terms: tuple[DataTerm, ...]
    G: Array
    gram_pinv: Array | None
    num_outputs: int = eqx.field(static=True)
    gate_mask: Array | None = None
    skip: bool = eqx.field(static=True, default=False)
    bias: bool = eqx.field(static=True, default=False)
    precision: str = eqx.field(static=True, default="default")

    @property
    def num_features(self) -> int:
        return self.G.shape[0]

    @property
    def num_gates(self) -> int:
        return self.G.shape[1]

    @property
    def dtype(self) -> jnp.dtype:
        return self.G.dtype

    @property
    def weight_shape(self) -> tuple[int, int, int]:
        return (self.num_gates, self.num_features, self.num_outputs)

    def zeros(self) -> Array:
        return jnp.zeros(self.weight_shape, self.dtype)

    # ------------------------------------------------ the Problem interface (cvxdist.duality)
    @property
    def targets(self) -> tuple[Array, ...]:
        return tuple(term.targets for term in self.terms)

    @property
    def datafit(self) -> Quadratic:
        return Quadratic(tuple(term.scale for term in self.terms))

    def forward(self, U: Array) -> tuple[Array, ...]:
        """:math:`(H_t S_t A_t U)_t`."""
        return tuple(term.readout.mv(term.rows.forward(U)) for term in self.terms)

    def adjoint(self, R: Sequence[Array]) -> Array:
        """:math:`\\sum_t A_t^T S_t^T H_t^T R_t`, ``(P, d, c)``."""
        parts = [t.rows.adjoint(t.readout.transpose_mv(R_t)) for t, R_t in zip(self.terms, R)]
        return sum(parts[1:], parts[0])

    def unregularized_forward(self, beta: Array) -> tuple[Array, ...]:
        """:math:`(H_t S_t F_t \\beta)_t`."""
        return tuple(t.readout.mv(t.rows.unregularized_forward(beta)) for t in self.terms)

    def unregularized_moments(self, R: Sequence[Array]) -> Array:
        """:math:`\\sum_t c_t F_t^T S_t^T H_t^T R_t`, ``(d + 1, c)``."""
        parts = [
            t.scale * t.rows.unregularized_adjoint(t.readout.transpose_mv(R_t))
            for t, R_t in zip(self.terms, R)
        ]
        return sum(parts[1:], parts[0])

    def project(self, R: Sequence[Array]) -> tuple[tuple[Array, ...], Array | None]:
        """:math:`P_\\perp R` (``C``-orthogonal to the skip/bias range) and the fitted β."""
        R = tuple(R)
        if self.gram_pinv is None:
            return R, None
        moments = self.unregularized_moments(R)
        beta = (self.gram_pinv @ moments.reshape(-1)).reshape(moments.shape)
        fitted = self.unregularized_forward(beta)
        return tuple(R_t - f_t for R_t, f_t in zip(R, fitted)), beta

    def residual(self, U: Array) -> tuple[tuple[Array, ...], Array | None]:
        prediction = self.forward(U)
        return self.project(tuple(T - p for T, p in zip(self.targets, prediction)))

    def gradient(self, r: Sequence[Array]) -> Array:
        return -self.adjoint(self.datafit.weighted(tuple(r)))

    def with_precision(self, precision: str) -> ComposedProblem:
        if precision == self.precision:
            return self
        terms = tuple(
            dataclasses.replace(t, rows=t.rows.with_precision(precision)) for t in self.terms
        )
        return dataclasses.replace(self, terms=terms, precision=precision)

    def with_exact_projection(self) -> ComposedProblem:
        """The problem with its skip/bias projection recomputed in float64 (x64 scoped)."""
        if self.gram_pinv is None:
            return self
        width = self.gram_pinv.shape[0] // self.num_outputs
        with jax.enable_x64(True):
            gram = _unregularized_gram_pinv(self.terms, width, self.num_outputs)
        return dataclasses.replace(self, gram_pinv=jnp.asarray(gram, self.dtype))

    def split_unregularized(self, beta: Array | None) -> tuple[Any, Any]:
        if beta is None:
            return None, None
        V = beta[: self.num_features] if self.skip else None
        b = beta[-1] if self.bias else None
        return V, b

    def restrict_gates(self, index: np.ndarray, size: int) -> ComposedProblem:
        """The problem on the gates ``index`` only, padded with dead gates to ``size``."""
        take, live = padded_index(index, size)
        if self.gate_mask is not None:
            live = live & np.asarray(self.gate_mask)[take]
        terms = tuple(
            dataclasses.replace(t, rows=t.rows.restrict_gates(index, size)) for t in self.terms
        )
        return dataclasses.replace(
            self, terms=terms, G=self.G[:, take], gate_mask=jnp.asarray(live)
        )

    def gate_norm_bounds(self) -> Array:
        """Upper bounds on :math:`\\|C^{1/2}\\mathcal A_i\\|_2`, ``(P,)``: the stacked terms'
        norms, each at most the product of its readout's and its rows' norms."""
        squares = [
            t.scale * (t.readout.norm_bound() * t.rows.operator_norms()) ** 2 for t in self.terms
        ]
        bound = jnp.sqrt(sum(squares[1:], squares[0]))
        return bound * (1.0 + operators.rounding_guard(self.dtype))


# ----------------------------------------------------------------------------- builders


def gated_rows(
    X: Any,
    G: Any,
    num_outputs: int,
    *,
    group_size: int = 1,
    skip: bool = False,
    bias: bool = False,
    chunk_groups: int | None = None,
    dtype: Any = None,
    stream: bool = False,
    devices: Any = None,
    precision: str = "default",
) -> GatedReluProblem:
    """Location rows ``X (N·L, d)`` as the row operator of a data term, ``L = group_size``
    consecutive rows per group (image), chunks holding ``chunk_groups`` whole groups."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] % group_size:
        raise ValueError(
            f"rows must be (N·L, d) with L = {group_size} rows per group, got {X.shape}"
        )
    num_groups = X.shape[0] // group_size
    if chunk_groups is None:
        rows = default_chunk_rows(X.shape[0], np.shape(G)[1], max(num_outputs, X.shape[1]))
        chunk_groups = max(1, rows // group_size)
    num_devices = _device_count(devices)
    chunk_groups = num_devices * math.ceil(min(chunk_groups, num_groups) / num_devices)
    zeros = np.zeros((X.shape[0], num_outputs), X.dtype)
    return make_problem(
        X,
        zeros,
        G,
        skip=skip,
        bias=bias,
        chunk_rows=chunk_groups * group_size,
        dtype=dtype,
        stream=stream,
        devices=devices,
        precision=precision,
    )


def _device_count(devices: Any) -> int:
    if devices is None:
        return 1
    if isinstance(devices, int):
        return devices
    return int(getattr(devices, "size", None) or len(devices))


@jax.jit
def _pool_chunk(rows: Array, G: Array) -> tuple[Array, Array]:
    """``Φ (m, P, d)`` and ``x̄ (m, d)`` of ``rows (m, L, d)``."""
    masks = (rows @ G >= 0).astype(rows.dtype)
    L = rows.shape[1]
    return jnp.einsum("mlp,mld->mpd", masks, rows) / L, rows.mean(axis=1)


def pooled_rows(
    rows: Any,
    G: Any,
    num_outputs: int,
    *,
    skip: bool = False,
    bias: bool = False,
    chunk_groups: int | None = None,
    dtype: Any = None,
    precision: str = "default",
) -> PooledRows:
    """:class:`PooledRows` of location rows ``rows (N, L, d)`` grouped by image, for a
    student with ``num_outputs`` outputs.

    The masks of the pooled features are those of the location rows, ``1[a_l · g_i ≥ 0]``,
    so ``S A(U)`` of the location rows equals ``A(U)`` of the pooled rows exactly.
    """
    rows = np.asarray(rows)
    G = np.asarray(G)
    if rows.ndim != 3 or G.ndim != 2 or G.shape[0] != rows.shape[2]:
        raise ValueError(f"need rows (N, L, d) and G (d, P), got {rows.shape} and {G.shape}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = jnp.dtype(dtype or jax.dtypes.canonicalize_dtype(rows.dtype))
    N, _, d = rows.shape
    P = G.shape[1]
    chunk_groups = min(chunk_groups or max(1, 2**26 // max(1, P * d)), N)
    K = math.ceil(N / chunk_groups)
    Gd = jnp.asarray(G, dtype)
    Phi = np.zeros((K * chunk_groups, P, d), dtype)
    Xbar = np.zeros((K * chunk_groups, d), dtype)
    for start in range(0, N, chunk_groups):
        stop = min(start + chunk_groups, N)
        phi, xbar = _pool_chunk(jnp.asarray(rows[start:stop], dtype), Gd)
        Phi[start:stop], Xbar[start:stop] = np.asarray(phi), np.asarray(xbar)
    valid = None
    if K * chunk_groups > N:
        valid = jnp.asarray((np.arange(K * chunk_groups) < N).astype(dtype).reshape(K, -1))
    return PooledRows(
        jnp.asarray(Phi.reshape(K, chunk_groups, P, d)),
        jnp.asarray(Xbar.reshape(K, chunk_groups, d)),
        Gd,
        valid,
        None,
        N,
        int(num_outputs),
        bool(skip),
        bool(bias),
        precision,
    )


def data_term(rows: RowOperator, readout: Readout, targets: Any, weight: float = 1.0) -> DataTerm:
    """A term comparing ``readout(rows' outputs)`` with ``targets (N, k)`` (one row per
    group, in the rows' group order), weighted ``weight / N``."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        targets = targets[:, None]
    if targets.ndim != 2 or not np.all(np.isfinite(targets)):
        raise ValueError(f"targets must be a finite (N, k) array, got shape {targets.shape}")
    if not weight > 0:
        raise ValueError(f"a data term's weight must be positive, got {weight}")
    K, n, _ = shape = _rows_output_shape(rows)
    _, m, k = readout.out_shape(shape)
    if targets.shape[1] != k:
        raise ValueError(f"the readout gives {k} values per group, the targets {targets.shape[1]}")
    num_groups = rows.num_rows * m // n  # readouts map whole groups of n // m rows
    if len(targets) != num_groups:
        raise ValueError(f"{len(targets)} targets for {num_groups} groups of rows")
    dtype = rows.G.dtype
    padded = np.zeros((K * m, targets.shape[1]), dtype)
    padded[: len(targets)] = targets
    return DataTerm(rows, readout, jnp.asarray(padded.reshape(K, m, -1)), weight / num_groups)


def _rows_output_shape(rows: RowOperator) -> tuple[int, int, int]:
    """``(K, n, c)`` of the rows' outputs."""
    if isinstance(rows, PooledRows):
        return (*rows.Phi.shape[:2], rows.num_outputs)
    return (rows.num_chunks, rows.chunk_rows, rows.num_outputs)


def make_composed(
    terms: Sequence[DataTerm], *, skip: bool = False, bias: bool = False
) -> ComposedProblem:
    """A :class:`ComposedProblem` from terms sharing the gates, the skip/bias and the width
    ``c`` of the student's outputs.

    Raises:
        ValueError: terms that disagree on the gates, skip/bias or output width.
    """
    terms = tuple(terms)
    if not terms:
        raise ValueError("a composed problem needs at least one data term")
    G = terms[0].rows.G
    for term in terms:
        if term.rows.G.shape != G.shape or not bool(jnp.all(term.rows.G == G)):
            raise ValueError("every data term must use the same gates")
        if (term.rows.skip, term.rows.bias) != (skip, bias):
            raise ValueError("every data term's rows must have the problem's skip and bias")
    num_outputs = terms[0].rows.num_outputs
    if any(term.rows.num_outputs != num_outputs for term in terms):
        raise ValueError("every data term must read outputs of the same width")
    gram_pinv = None
    if skip or bias:
        width = (G.shape[0] if skip else 0) + (1 if bias else 0)
        gram = _unregularized_gram_pinv(terms, width, num_outputs)
        gram_pinv = jnp.asarray(gram, G.dtype)
    return ComposedProblem(terms, G, gram_pinv, num_outputs, None, bool(skip), bool(bias))


def _unregularized_gram_pinv(terms: tuple[DataTerm, ...], width: int, c: int) -> np.ndarray:
    """Pseudo-inverse of :math:`\\sum_t c_t (H_t S_t F_t)^T (H_t S_t F_t)` on ``vec(β)``,
    formed by one application of the normal map per basis vector (in batches)."""
    problem = ComposedProblem(terms, terms[0].rows.G, None, c)

    def normal(e: Array) -> Array:
        beta = e.reshape(width, c)
        return problem.unregularized_moments(problem.unregularized_forward(beta)).reshape(-1)

    size = width * c
    basis = jnp.eye(size, dtype=problem.dtype)
    gram = np.asarray(jax.jit(lambda E: jax.lax.map(normal, E, batch_size=16))(basis), np.float64)
    gram = 0.5 * (gram + gram.T)
    # The normal map was applied in the problem's dtype: the Gram's null space (a head that
    # reads fewer logits than outputs) comes back as eigenvalues at that dtype's rounding
    # level (1e-8 relative in float32), which the cut-off must treat as zero.
    rcond = max(1e-10, 10.0 * size * float(jnp.finfo(problem.dtype).eps))
    return np.linalg.pinv(gram, rcond=rcond, hermitian=True)
