r"""From convex weights to a two-layer gated network.

Each gate block is factored by an SVD, :math:`U_i = \sum_r \sigma_r p_r q_r^T`; every
:math:`(i, r)` with :math:`\sigma_r > 0` becomes a neuron with gate :math:`g_i`, input weights
:math:`\sqrt{\sigma_r} p_r` and output weights :math:`\sqrt{\sigma_r} q_r`:

.. math::

    f(x) = \sum_k 1[g_{\pi(k)} \cdot x \ge 0]\, (w_k \cdot x)\, v_k + V^T x + b .

Pruned gates (zero blocks) disappear. Parameter counts always include the gates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from cvxdist.solvers.common import Solution, Weights


class GatedNetwork(NamedTuple):
    """A gated two-layer network with ``Q`` distinct gates and ``K`` neurons.

    Attributes:
        gates: ``(d, Q)`` gate vectors actually used.
        neuron_gate: ``(K,)`` index into ``gates`` of each neuron's gate.
        w_in: ``(d, K)`` first-layer weights.
        w_out: ``(K, c)`` second-layer weights.
        skip: ``(d, c)`` linear skip or ``None``.
        bias: ``(c,)`` bias or ``None``.
    """

    gates: Array
    neuron_gate: Array
    w_in: Array
    w_out: Array
    skip: Array | None = None
    bias: Array | None = None

    @property
    def num_neurons(self) -> int:
        return int(self.w_in.shape[1])

    @property
    def num_gates(self) -> int:
        return int(self.gates.shape[1])


def to_network(
    weights: Weights | Solution,
    G: Array | np.ndarray,
    *,
    rtol: float | None = None,
) -> GatedNetwork:
    """Factor convex weights into neurons; zero groups and negligible ranks are pruned.

    Args:
        weights: convex weights ``U (P, d, c)`` (+ skip/bias), or a Solution.
        G: the gates ``(d, P)`` the weights were solved with.
        rtol: singular values ``≤ rtol · max σ`` are dropped (default: 10 · machine eps of
            the weights' dtype, so the network reproduces the convex model to rounding).
    """
    if isinstance(weights, Solution):
        weights = weights.weights
    U = np.asarray(weights.U)
    G = np.asarray(G)
    if U.ndim != 3 or G.shape != (U.shape[1], U.shape[0]):
        raise ValueError(f"U {U.shape} and G {G.shape} do not match (need (P, d, c) and (d, P))")
    if rtol is None:
        rtol = 10 * np.finfo(U.dtype).eps * max(U.shape[1:])
    left, sigma, right = np.linalg.svd(U, full_matrices=False)  # (P,d,r), (P,r), (P,r,c)
    threshold = rtol * (sigma.max() if sigma.size else 0.0)
    gate_idx, rank_idx = np.nonzero(sigma > threshold)
    root = np.sqrt(sigma[gate_idx, rank_idx])
    w_in = (left[gate_idx, :, rank_idx] * root[:, None]).T  # (d, K)
    w_out = right[gate_idx, rank_idx, :] * root[:, None]  # (K, c)
    used, neuron_gate = np.unique(gate_idx, return_inverse=True)
    dtype = jax.dtypes.canonicalize_dtype(U.dtype)
    return GatedNetwork(
        gates=jnp.asarray(G[:, used], dtype),
        neuron_gate=jnp.asarray(neuron_gate.astype(np.int32)),
        w_in=jnp.asarray(w_in.reshape(U.shape[1], -1), dtype),
        w_out=jnp.asarray(w_out.reshape(-1, U.shape[2]), dtype),
        skip=None if weights.V is None else jnp.asarray(weights.V, dtype),
        bias=None if weights.b is None else jnp.asarray(weights.b, dtype),
    )


def gated_hidden(X: Array, gates: Array, w_in: Array, neuron_gate: Array) -> Array:
    """Hidden layer ``(…, K)``: ``(X W_in) ⊙ 1[X G ≥ 0][…, gate of each neuron]`` for rows
    ``X (…, d)``, gates ``(d, Q)``, ``W_in (d, K)`` and ``neuron_gate (K,)``."""
    masks = (X @ gates) >= 0
    return (X @ w_in) * masks[..., neuron_gate].astype(X.dtype)


def gated_forward(
    X: Array,
    gates: Array,
    w_in: Array,
    w_out: Array,
    neuron_gate: Array,
    skip: Array | None = None,
    bias: Array | None = None,
) -> Array:
    """The one gated forward: ``gated_hidden(X) W_out + X V + b``, ``(…, c)``.

    Used by :func:`predict`, the Flax student block, the fixed-gate baseline and the
    benchmarks alike.
    """
    out = gated_hidden(X, gates, w_in, neuron_gate) @ w_out
    if skip is not None:
        out = out + X @ skip
    if bias is not None:
        out = out + bias
    return out


def predict(net: GatedNetwork, X: Array) -> Array:
    """Outputs ``(N, c)`` of the gated network on rows ``X (N, d)``."""
    X = jnp.asarray(X, net.w_in.dtype)
    return gated_forward(X, net.gates, net.w_in, net.w_out, net.neuron_gate, net.skip, net.bias)


def predict_convex(weights: Weights | Solution, G: Array, X: Array) -> Array:
    """Outputs ``(N, c)`` of the convex model itself: Σ_i 1[X g_i ≥ 0] ⊙ (X U_i) + X V + b."""
    if isinstance(weights, Solution):
        weights = weights.weights
    X = jnp.asarray(X, weights.U.dtype)
    masks = (X @ jnp.asarray(G, X.dtype)) >= 0
    out = jnp.einsum("np,npc->nc", masks.astype(X.dtype), jnp.einsum("nd,pdc->npc", X, weights.U))
    if weights.V is not None:
        out = out + X @ weights.V
    if weights.b is not None:
        out = out + weights.b
    return out


def parameter_count(net: GatedNetwork) -> int:
    """Parameters of the deployed network, gates included: d·Q + d·K + K·c (+ d·c + c)."""
    d, Q = net.gates.shape
    K, c = net.w_out.shape
    count = d * Q + d * K + K * c
    if net.skip is not None:
        count += int(np.prod(net.skip.shape))
    if net.bias is not None:
        count += int(np.prod(net.bias.shape))
    return count
