r"""The convex gated-ReLU problem.

Rows :math:`a_j \in R^d` (``X``, ``N × d``), targets :math:`y_j \in R^c` (``Y``), fixed gates
:math:`g_i \in R^d` (``G``, ``d × P``), masks :math:`m_{ij} = 1[g_i \cdot a_j \ge 0]`:

.. math::

    \min_{U, V, b} \; F(U) = \frac{1}{2N} \sum_j \Big\| \sum_i m_{ij} U_i^T a_j + V^T a_j + b
    - y_j \Big\|^2 + \lambda R(U)

with ``U`` of shape ``(P, d, c)``; the linear skip ``V`` and bias ``b`` are optional and
unregularized (eliminated by projection, see :mod:`cvxdist.operators`).

The data fit is :class:`cvxdist.datafit.Quadratic` with the single scale ``1/N``; the
objective, dual point and duality gap are those of :mod:`cvxdist.duality`, which sees this
class only through the methods of its :class:`~cvxdist.duality.Problem` interface
(``forward``, ``adjoint``, ``project``, ``residual``, ``gradient``, …). Composed data terms
(pooled rows, a fixed head, per-group Jacobians, weighted sums) are in
:mod:`cvxdist.composed`.

Static vs traced: array shapes, the chunking, whether masks are stored, whether the skip
and bias exist, where the rows live (``stream``) and the GEMM ``precision`` are static (they
set shapes or the compiled program); λ is always a traced argument.

Scale (see :mod:`cvxdist.sharding` for the multi-device and multi-host layout):

- ``chunk_rows``: rows are processed ``n`` at a time by a ``lax.scan`` over ``K`` chunks, so
  the ``(n, P, c)`` intermediate bounds the working memory.
- ``stream=True``: ``X`` stays in host memory (memory kind ``pinned_host``) and each chunk is
  copied to the device inside the scan (``jax.device_put(X_k, jax.memory.Space.Device)``);
  masks are then recomputed per chunk. Only ``Y``, the residual and ``(n, ·)`` chunk
  temporaries live on the device. Cost: one host→device copy of ``X`` (``N·d`` elements) per
  operator application, i.e. two per FISTA iteration (forward and adjoint) plus one per
  backtrack; at ~25 GB/s of PCIe/NVLink-C2C bandwidth that is the floor of an iteration.
  JAX types the host array as ``f32<host>`` and refuses any computation on it, so the only
  way ``X`` reaches the device is these per-chunk copies (the tests check the traced program).
  On GPU/TPU XLA's host-offloading pass lowers each one to an asynchronous host→device copy
  of one chunk; on CPU host and device memory coincide and the copy is free. This has not
  been run on an accelerator yet; ``pinned_host`` memory is page-locked, so the host must
  allow that much locked memory.
- ``devices``: rows sharded over a 1-D device mesh (data parallel; XLA inserts the all-reduces).
- ``precision``: ``"default"`` (XLA's default GEMM precision for the dtype; on GPU this may be
  TF32 for float32), ``"highest"`` (true float32/float64 GEMMs) or ``"bf16"`` (bfloat16 GEMM
  operands with float32 accumulation). Masks are computed the same way whatever the GEMM
  precision, so every precision solves the same problem, and :func:`certify` recomputes the
  certificate with ``"highest"`` GEMMs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from cvxdist import operators, sharding
from cvxdist.datafit import Quadratic
from cvxdist.duality import (  # noqa: F401  (re-exported: the historical home of these)
    Certificate,
    Evaluation,
    certify,
    correlation,
    dual_scaling,
    evaluate,
    lam_max,
    target_energy,
)

if TYPE_CHECKING:
    from jax.sharding import Mesh

#: Largest ``n · P · c`` intermediate (elements) a chunk may create by default (256 MiB f32).
DEFAULT_CHUNK_ELEMENTS = 2**26
#: Masks are stored as booleans when ``N · P`` is at most this many bytes.
DEFAULT_MASK_BYTES = 2**31
#: GEMM precisions (see the module docstring).
PRECISIONS = ("default", "highest", "bf16")


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
        gate_mask: ``(P,)`` booleans, or ``None`` (all gates live). A ``False`` gate has an
            all-zero mask column, so it contributes nothing (padding of screened problems).
        precision: GEMM precision, one of :data:`PRECISIONS` (static).
        stream: ``X`` lives in host memory and chunks are copied to the device (static).
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
    gate_mask: Array | None = None
    precision: str = eqx.field(static=True, default="default")
    stream: bool = eqx.field(static=True, default=False)

    def __check_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )

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
        """The unpadded ``X (N, d)`` and ``Y (N, c)`` (on the device, even when streaming)."""
        X = operators.to_device(self, self.X)
        X = X.reshape(-1, self.num_features)[: self.num_rows]
        Y = self.Y.reshape(-1, self.num_outputs)[: self.num_rows]
        return X, Y

    # ------------------------------------------------ the Problem interface (cvxdist.duality)
    @property
    def targets(self) -> Array:
        """``Y (K, n, c)``: what the prediction is fitted to."""
        return self.Y

    @property
    def datafit(self) -> Quadratic:
        """``½ ||r||² / N``."""
        return Quadratic((1.0 / self.num_rows,))

    def forward(self, U: Array) -> Array:
        """:math:`A(U)`, ``(K, n, c)``."""
        return operators.forward(self, U)

    def adjoint(self, R: Array) -> Array:
        """:math:`A^T(R)`, ``(P, d, c)``."""
        return operators.adjoint(self, R)

    def project(self, R: Array) -> tuple[Array, Array | None]:
        """:math:`P_\\perp R` and the skip/bias coefficients fitted to ``R``."""
        return operators.project_out_unregularized(self, R)

    def residual(self, U: Array) -> tuple[Array, Array | None]:
        """:math:`r = P_\\perp(Y - A(U))` and the skip/bias fit."""
        return operators.residual(self, U)

    def gradient(self, r: Array) -> Array:
        """Gradient of the data term from the projected residual: :math:`-A^T(r)/N`."""
        return -operators.adjoint(self, r) / self.num_rows

    def with_precision(self, precision: str) -> GatedReluProblem:
        """The same problem (same arrays, no copy) with another GEMM precision."""
        if precision == self.precision:
            return self
        return dataclasses.replace(self, precision=precision)

    def split_unregularized(self, beta: Array | None) -> tuple[Any, Any]:
        """Skip ``V (d, c)`` and bias ``b (c,)`` from the stacked least-squares coefficients."""
        return operators.split_unregularized(self, beta)

    def with_exact_projection(self) -> GatedReluProblem:
        """The problem with its skip/bias Gram pseudo-inverse recomputed from its own rows in
        float64 (e.g. after an upcast, :mod:`cvxdist.solvers.polish`)."""
        if self.gram_pinv is None:
            return self
        gram_pinv = unregularized_gram_pinv(self).astype(self.dtype)
        return dataclasses.replace(self, gram_pinv=gram_pinv)

    def restrict_gates(self, index: np.ndarray, size: int) -> GatedReluProblem:
        """The problem on the gates ``index`` only, padded with dead gates to ``size`` gates.

        Rows, targets and their chunking are shared (no copy of ``X``); ``G`` and stored masks
        are gathered. The padding gates have ``gate_mask = False``: their mask column is zero,
        so their weights get a zero gradient and stay zero from a zero start.

        Args:
            index: ``(p,)`` host integer array of gate indices, ``p ≤ size``.
            size: the number of gates of the result (static; bucket it to limit recompiles).
        """
        take, live = padded_index(index, size)
        G, masks, gate_mask = _gather_gates(self.G, self.masks, self.gate_mask, take, live)
        return dataclasses.replace(self, G=G, masks=masks, gate_mask=gate_mask)

    def gate_norm_bounds(self) -> Array:
        """Upper bounds on :math:`\\|A_i\\|_2 / \\sqrt N` per gate, ``(P,)`` (the operator
        norms in the data fit's metric, as gap-safe screening needs them)."""
        return self.operator_norms() / math.sqrt(self.num_rows)

    # ------------------------------------- as the row operator of a composed data term
    def operator_norms(self) -> Array:
        """Upper bounds on :math:`\\|A_i\\|_2` per gate, ``(P,)``."""
        return operators.gate_norm_bounds(self)

    def unregularized_forward(self, beta: Array) -> Array:
        """``[X 1] β``, ``(K, n, c)``."""
        return operators.unregularized_forward(self, beta)

    def unregularized_adjoint(self, R: Array) -> Array:
        """``[X 1]ᵀ R``, ``(d + 1, c)`` (the enabled columns)."""
        return operators.unregularized_adjoint(self, R)


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


def problem_dtype(X: np.ndarray, dtype: jnp.dtype | str | None) -> jnp.dtype:
    """The float dtype of a problem with rows ``X``: ``dtype``, or X's float dtype as JAX
    canonicalizes it (float64 becomes float32 unless x64 is enabled).

    Raises:
        ValueError: float64 asked for while x64 is disabled.
    """
    if dtype is None:
        floating = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float32
        dtype = jax.dtypes.canonicalize_dtype(floating)
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError("float64 problems need jax.config.update('jax_enable_x64', True)")
    return dtype


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
    stream: bool = False,
    devices: int | Sequence[jax.Device] | Mesh | None = None,
    precision: str = "default",
) -> GatedReluProblem:
    """Build a :class:`GatedReluProblem` from host or device arrays.

    Args:
        X: rows ``(N, d)``.
        Y: targets ``(N, c)`` or ``(N,)``.
        G: gates ``(d, P)`` (a zero column gives the all-ones, i.e. linear, pattern).
        skip: add an unregularized linear skip ``V (d, c)``.
        bias: add an unregularized bias ``b (c,)``.
        chunk_rows: rows per chunk; default keeps the ``(n, P, c)`` intermediate ≤ 256 MiB.
            Rounded up to a multiple of the number of devices when sharded.
        store_masks: store boolean masks (default: when ``N · P`` ≤ 2 GiB and not streaming).
        dtype: float dtype (default: X's float dtype, canonicalized as JAX does).
        stream: keep ``X`` in host memory and copy one chunk at a time to the device inside
            the solve (for data larger than device memory; masks are then recomputed).
        devices: shard rows over these devices (a count, a list, or a 1-D
            :class:`jax.sharding.Mesh`); ``None`` keeps everything on the default device.
            See :mod:`cvxdist.sharding`.
        precision: GEMM precision, ``"default"``, ``"highest"`` or ``"bf16"``.

    Raises:
        ValueError: wrong shapes, NaN/Inf, empty arrays, bad chunk size or options.
    """
    X, Y, G = validate_arrays(X, Y, G)
    dtype = problem_dtype(X, dtype)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if stream and store_masks:
        raise ValueError(
            "store_masks=True cannot be combined with stream=True (masks are "
            "recomputed per chunk when X stays on the host)"
        )
    N = X.shape[0]
    c = Y.shape[1]
    P = G.shape[1]
    mesh = None if devices is None else sharding.row_mesh(devices)
    num_devices = 1 if mesh is None else mesh.size
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(N, P, c)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows}")
    chunk_rows = min(int(chunk_rows), N)
    chunk_rows = num_devices * math.ceil(chunk_rows / num_devices)
    K = math.ceil(N / chunk_rows)
    padded = K * chunk_rows
    if store_masks is None:
        store_masks = (not stream) and N * P <= DEFAULT_MASK_BYTES

    def chunked(a: np.ndarray) -> np.ndarray:
        """Host copy padded to ``K · n`` rows and viewed as ``(K, n, ·)``."""
        a = np.asarray(a, dtype)
        if padded > N:
            a = np.concatenate([a, np.zeros((padded - N, a.shape[1]), dtype)])
        return a.reshape(K, chunk_rows, a.shape[1])

    place = sharding.placer(mesh)
    Xc = place(chunked(X), rows_axis=1, memory_kind="pinned_host" if stream else None)
    Yc = place(chunked(Y), rows_axis=1)
    Gd = place(np.asarray(G, dtype))
    masks = _compute_masks(Xc, Gd) if store_masks else None
    valid = None
    if padded > N:
        valid = place((np.arange(padded) < N).astype(dtype).reshape(K, chunk_rows), rows_axis=1)
    gram_pinv = _unregularized_gram_pinv(X, skip, bias, dtype)
    if gram_pinv is not None:
        gram_pinv = place(np.asarray(gram_pinv))
    return GatedReluProblem(
        Xc,
        Yc,
        Gd,
        masks,
        valid,
        gram_pinv,
        N,
        bool(skip),
        bool(bias),
        precision=precision,
        stream=bool(stream),
    )


@jax.jit
def _compute_masks(X: Array, G: Array) -> Array:
    return jax.lax.map(lambda X_k: (X_k @ G) >= 0, X)


def _unregularized_gram_pinv(
    X: np.ndarray, skip: bool, bias: bool, dtype: jnp.dtype, block_rows: int = 65536
) -> np.ndarray | None:
    """Pseudo-inverse of ``[X 1]ᵀ[X 1]`` (the enabled columns), accumulated in float64 over
    row blocks so that no float64 copy of ``X`` is made."""
    if not (skip or bias):
        return None
    width = (X.shape[1] if skip else 0) + (1 if bias else 0)
    gram = np.zeros((width, width))
    for start in range(0, X.shape[0], block_rows):
        block = np.asarray(X[start : start + block_rows], np.float64)
        columns = ([block] if skip else []) + ([np.ones((len(block), 1))] if bias else [])
        features = np.concatenate(columns, axis=1)
        gram += features.T @ features
    return np.linalg.pinv(gram, rcond=1e-10, hermitian=True).astype(dtype)


def restrict_gates(problem: Any, index: np.ndarray, size: int) -> Any:
    """``problem.restrict_gates(index, size)``: the problem on the gates ``index`` only,
    padded with dead gates (``gate_mask`` False) to ``size`` gates (static: bucket it)."""
    return problem.restrict_gates(index, size)


def with_precision(problem: Any, precision: str) -> Any:
    """``problem.with_precision(precision)``: the same problem with another GEMM precision."""
    return problem.with_precision(precision)


def padded_index(index: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``index`` padded with zeros to ``size`` entries, and the mask of the real ones."""
    index = np.asarray(index, np.int64)
    if index.ndim != 1 or len(index) > size or len(index) == 0:
        raise ValueError(f"need 1 ≤ len(index) ≤ size, got {len(index)} and size {size}")
    take = np.zeros(size, np.int32)
    take[: len(index)] = index
    return take, np.arange(size) < len(index)


@jax.jit
def _gather_gates(
    G: Array, masks: Array | None, gate_mask: Array | None, take: Array, live: Array
) -> tuple[Array, Array | None, Array]:
    if gate_mask is not None:
        live = live & gate_mask[take]
    return G[:, take], None if masks is None else masks[..., take], live


def unregularized_gram_pinv(problem: GatedReluProblem) -> Array | None:
    """Pseudo-inverse of ``[X 1]ᵀ[X 1]`` (the enabled skip/bias columns) over the real rows of
    an assembled problem, accumulated chunk by chunk and inverted in float64 (x64 is enabled
    for this call only); ``None`` without skip or bias.

    For problems whose rows are not on this host as one numpy array (rows of several
    processes, :mod:`cvxdist.multihost`) and for float64 copies of float32 problems
    (:mod:`cvxdist.solvers.polish`); the result is float64, cast it to the problem's dtype.
    """
    if not (problem.skip or problem.bias):
        return None
    with jax.enable_x64(True):
        return _gram_pinv64(problem)


@eqx.filter_jit
def _gram_pinv64(problem: GatedReluProblem) -> Array:
    def chunk(X_k: Array, M_k: Array | None, valid_k: Array | None) -> Array:
        del M_k
        features = operators._unregularized_features(problem, X_k).astype(jnp.float64)
        if valid_k is not None:
            features = features * valid_k[:, None]
        return jnp.matmul(features.T, features, precision=jax.lax.Precision.HIGHEST)

    gram = operators.sum_chunks(problem, chunk, problem.valid)
    return jnp.linalg.pinv(gram, rtol=1e-10, hermitian=True)
