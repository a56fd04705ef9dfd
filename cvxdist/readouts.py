r"""What the rest of the network reads from the student's outputs: ``S`` and ``H`` of §2a.

A readout is a fixed linear map applied chunk by chunk to the student's outputs ``s`` (rows of
``c`` values, ``(K, n, c)``: ``K`` chunks of ``n`` rows) that gives what a data term compares
with its targets (``(K, m, k)``):

- :class:`Identity`: the outputs themselves (activation matching);
- :class:`GroupMean` (``S``): the mean over each run of ``L`` consecutive rows, e.g. the ``L``
  locations of one image (global average pooling); chunks hold whole groups;
- :class:`Dense` (``H``): one fixed matrix on every row, e.g. the teacher's dense head;
- :class:`PerGroup` (``H``): one matrix per group on the group's ``L·c`` stacked outputs,
  e.g. the Jacobian ``J_n`` of the logits with respect to image ``n``'s block output.

Readouts compose with ``@`` (``Dense(W) @ GroupMean(L)`` pools then applies the head), as
lineax operators do: ``mv`` applies the map, ``transpose_mv`` its adjoint, ``as_matrix`` gives
the dense matrix of a small instance (for tests), and ``norm_bound`` an upper bound on the
operator norm (for gap-safe screening). Readouts import nothing but jax and equinox.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array


class Readout(eqx.Module):
    """A linear map of chunked outputs ``(K, n, c) -> (K, m, k)`` (see the module docstring)."""

    def mv(self, s: Array) -> Array:
        raise NotImplementedError

    def transpose_mv(self, r: Array) -> Array:
        raise NotImplementedError

    def out_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(K, m, k)`` of the output for an input of ``shape = (K, n, c)``."""
        return jax.eval_shape(self.mv, jax.ShapeDtypeStruct(shape, jnp.float32)).shape

    def norm_bound(self) -> Array:
        """An upper bound on the operator norm ``‖readout‖₂``."""
        raise NotImplementedError

    def as_matrix(self, shape: tuple[int, int, int], dtype: jnp.dtype = jnp.float64) -> Array:
        """Dense matrix ``(K·m·k, K·n·c)`` of the map on inputs of ``shape`` (small sizes)."""
        size = math.prod(shape)
        columns = jax.vmap(lambda e: self.mv(e.reshape(shape)).ravel())(jnp.eye(size, dtype=dtype))
        return columns.T

    def __matmul__(self, inner: Readout) -> Readout:
        return Chain(self, inner)


class Identity(Readout):
    """The outputs themselves."""

    def mv(self, s: Array) -> Array:
        return s

    def transpose_mv(self, r: Array) -> Array:
        return r

    def norm_bound(self) -> Array:
        return jnp.ones(())


class GroupMean(Readout):
    """Mean over each run of ``size`` consecutive rows: ``(K, m·L, c) -> (K, m, c)``."""

    size: int = eqx.field(static=True)

    def __check_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a group needs at least one row, got size={self.size}")

    def mv(self, s: Array) -> Array:
        K, n, c = s.shape
        return s.reshape(K, n // self.size, self.size, c).mean(axis=2)

    def transpose_mv(self, r: Array) -> Array:
        return jnp.repeat(r / self.size, self.size, axis=1)

    def norm_bound(self) -> Array:
        return jnp.asarray(1.0 / math.sqrt(self.size))


class Dense(Readout):
    """One fixed matrix on every row: ``s @ H`` with ``H (c, k)``."""

    H: Array

    def mv(self, s: Array) -> Array:
        return s @ self.H.astype(s.dtype)

    def transpose_mv(self, r: Array) -> Array:
        return r @ self.H.T.astype(r.dtype)

    def norm_bound(self) -> Array:
        return jnp.linalg.norm(self.H, 2)


class PerGroup(Readout):
    """One matrix per group of ``size`` rows: ``J_g (k, L·c)`` on the group's stacked rows.

    ``J`` has shape ``(K, m, k, L·c)``, chunked like the rows (``m`` groups per chunk); the
    outputs of group ``g`` are ``J_g · vec(s_g)`` with ``vec`` row-major over ``(L, c)``.
    """

    J: Array
    size: int = eqx.field(static=True)

    def mv(self, s: Array) -> Array:
        K, m = self.J.shape[:2]
        stacked = s.reshape(K, m, -1)
        return jnp.einsum("kmal,kml->kma", self.J.astype(s.dtype), stacked)

    def transpose_mv(self, r: Array) -> Array:
        K, m = self.J.shape[:2]
        stacked = jnp.einsum("kmal,kma->kml", self.J.astype(r.dtype), r)
        return stacked.reshape(K, m * self.size, -1)

    def norm_bound(self) -> Array:
        gram = jnp.einsum("kmal,kmbl->kmab", self.J, self.J)
        return jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(gram)[..., -1]))


class Chain(Readout):
    """``outer ∘ inner``."""

    outer: Readout
    inner: Readout

    def mv(self, s: Array) -> Array:
        return self.outer.mv(self.inner.mv(s))

    def transpose_mv(self, r: Array) -> Array:
        return self.inner.transpose_mv(self.outer.transpose_mv(r))

    def norm_bound(self) -> Array:
        return self.outer.norm_bound() * self.inner.norm_bound()
