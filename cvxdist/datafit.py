r"""The quadratic data term as an object (as skglm's datafits): value, gradient, conjugate.

A problem's data term is a weighted sum of squared residuals over one or more *terms*, each
a pytree leaf of the targets (a plain problem has one term, a mixed objective several):

.. math::

    f(z) = \sum_t \tfrac{1}{2} c_t \|T_t - z_t\|^2, \qquad c_t = w_t / N_t,

with ``N_t`` the term's number of rows (or groups) and ``w_t`` its weight; one term with
``c = 1/N`` is the ``1/(2N)`` convention of :mod:`cvxdist.problems`. As a function of the
residual ``r = T - z``:

- value: :math:`\sum_t \frac{1}{2} c_t \|r_t\|^2`;
- gradient with respect to the prediction: :math:`\nabla f(z) = -c \odot r`;
- conjugate: :math:`f^*(w) = \sum_t \langle w_t, T_t\rangle + \|w_t\|^2 / (2 c_t)`.

Dual points are scaled residuals ``w = -s c ⊙ r``, for which
:math:`-f^*(w) = s \langle r, T\rangle_C - \frac{s^2}{2}\|r\|_C^2` (``⟨a, b⟩_C = Σ c_t⟨a_t,
b_t⟩``). The dual objective is 1-strongly concave in the norm :math:`\|w\|_{C^{-1}}^2 =
\sum_t \|w_t\|^2 / c_t`: that is the constant gap-safe screening needs
(:mod:`cvxdist.screening`).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array


class Quadratic(eqx.Module):
    """``Σ_t ½ c_t ‖r_t‖²`` over the leaves of a residual pytree (see the module docstring).

    Attributes:
        scales: ``c_t`` per leaf, in the order of ``jax.tree.leaves`` (static).
    """

    scales: tuple[float, ...] = eqx.field(static=True)

    #: Strong-concavity modulus of the dual objective in the ``C⁻¹`` norm.
    strong_concavity: float = eqx.field(static=True, default=1.0)

    def _pairs(self, tree: Any) -> list[tuple[float, Array]]:
        leaves = jax.tree.leaves(tree)
        if len(leaves) != len(self.scales):
            raise ValueError(f"{len(leaves)} residual terms for {len(self.scales)} scales")
        return list(zip(self.scales, leaves, strict=True))

    def inner(self, a: Any, b: Any) -> Array:
        """:math:`\\langle a, b\\rangle_C = \\sum_t c_t \\langle a_t, b_t\\rangle`."""
        pairs = zip(self.scales, jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return sum(c * jnp.sum(x * y) for c, x, y in pairs)

    def value(self, r: Any) -> Array:
        """:math:`\\sum_t \\frac12 c_t \\|r_t\\|^2`."""
        return sum(0.5 * c * jnp.sum(x * x) for c, x in self._pairs(r))

    def weighted(self, r: Any) -> Any:
        """``c ⊙ r`` (minus the gradient of ``f`` with respect to the prediction)."""
        leaves = [c * x for c, x in self._pairs(r)]
        return jax.tree.unflatten(jax.tree.structure(r), leaves)

    def conjugate(self, w: Any, targets: Any) -> Array:
        """:math:`f^*(w) = \\sum_t \\langle w_t, T_t\\rangle + \\|w_t\\|^2 / (2 c_t)`."""
        pairs = zip(self.scales, jax.tree.leaves(w), jax.tree.leaves(targets), strict=True)
        return sum(jnp.sum(x * t) + 0.5 * jnp.sum(x * x) / c for c, x, t in pairs)
