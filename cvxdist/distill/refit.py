r"""Refit of a student's output layer on its fixed hidden layer, on the student's objective.

The regularized solve picks the gates and the neurons' input weights but shrinks every weight
towards zero. With the hidden layer ``h = gated_hidden(a)`` fixed, the output layer
``θ = (W_out, V, b)`` of ``o = h W_out + a V + b`` is a linear least-squares problem on the
same data terms (:class:`~cvxdist.distill.objectives.TermData`): no new parameter, no gate or
neuron added, the shrinkage undone. With features ``f = [h, a, 1]`` per location (``q``
values) and ``θ`` of shape ``(q, c)``, each term's normal equations have a closed form:

- ``activations``: ``Σ f fᵀ ⊗ I_c`` and ``Σ f Tᵀ``;
- ``logits`` (mean over locations, head ``H``): ``Σ f̄ f̄ᵀ ⊗ H Hᵀ`` and ``Σ f̄ (H T)ᵀ``;
- ``gauss-newton``: ``Σ M_nᵀ M_n`` and ``Σ M_nᵀ T_n`` with
  ``M_n[:, (a, i)] = Σ_l f_{n,l,a} J_n[:, l c + i]``,

weighted ``w_t / N_t`` as in the convex problem, plus a ridge relative to the mean diagonal.
Images are processed in chunks, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.distill.objectives import TermData, identified
from cvxdist.mapping import GatedNetwork, gated_hidden


def _features(net: GatedNetwork, rows: jax.Array) -> jax.Array:
    """``[h, a, 1]`` of rows ``(…, d)``: ``(…, q)`` (the skip only if the network has one)."""
    parts = [gated_hidden(rows, net.gates, net.w_in, net.neuron_gate)]
    if net.skip is not None:
        parts.append(rows)
    parts.append(jnp.ones((*rows.shape[:-1], 1), rows.dtype))
    return jnp.concatenate(parts, axis=-1)


class _NormalEquations(NamedTuple):
    """One term's normal equations, unweighted sums over its groups: the Gram matrix is
    ``left ⊗ right`` (``right`` ``None``: ``left`` is the whole ``(q·c, q·c)`` Gram)."""

    left: np.ndarray  # (q, q), or (q·c, q·c)
    right: np.ndarray | None  # (c, c)
    moments: np.ndarray  # (q·c,)


def _normal_equations(net: GatedNetwork, term: TermData, chunk: int) -> _NormalEquations:
    """The normal equations of one term, summed over chunks of its groups."""
    c = net.w_out.shape[1]

    @jax.jit
    def one(rows: jax.Array, targets: jax.Array, extra: jax.Array | None) -> tuple:
        f = _features(net, rows)  # (m, L, q)
        if term.kind == "activations":
            flat = f.reshape(-1, f.shape[-1])
            return flat.T @ flat, (flat.T @ targets.reshape(len(flat), -1)).reshape(-1)
        if term.kind == "logits":
            pooled = f.mean(axis=1)
            head = jnp.asarray(term.head, f.dtype)
            return pooled.T @ pooled, (pooled.T @ targets @ head.T).reshape(-1)
        J = extra.reshape(*extra.shape[:2], f.shape[1], c)  # (m, k, L, c)
        M = jnp.einsum("mla,mkli->mkai", f, J).reshape(len(f), J.shape[1], -1)
        return jnp.einsum("mkp,mkq->pq", M, M), jnp.einsum("mkp,mk->p", M, targets)

    left, moments = 0.0, 0.0
    for start in range(0, term.num_groups, chunk):
        stop = start + chunk
        extra = None if term.jacobian is None else jnp.asarray(term.jacobian[start:stop])
        g, m = one(jnp.asarray(term.rows[start:stop]), jnp.asarray(term.targets[start:stop]), extra)
        left = left + np.asarray(g, np.float64)
        moments = moments + np.asarray(m, np.float64)
    if term.kind == "activations":
        return _NormalEquations(left, np.eye(c), moments)
    if term.kind == "logits":
        head = np.asarray(term.head, np.float64)
        return _NormalEquations(left, head @ head.T, moments)
    return _NormalEquations(left, None, moments)


def _solve_normal_equations(
    normal: Sequence[tuple[float, _NormalEquations]], ridge: float, q: int, c: int
) -> np.ndarray:
    """``θ (q, c)`` of ``(Σ_t w_t G_t + ρ I) vec θ = Σ_t w_t m_t``, ``ρ`` = ``ridge`` × the
    mean diagonal of ``Σ_t w_t G_t``.

    When every Gram is ``A_t ⊗ I`` or ``A_t ⊗ B`` with one ``B = Q Λ Qᵀ`` (activations and
    logits terms), the system splits into ``c`` systems ``(Σ A_t^I + λ_j Σ A_t^B + ρ I)
    θ̃_j = m̃_j`` of size ``q`` in the basis ``Q`` (``q³c`` work instead of ``q³c³``).
    """
    moments = sum(w * n.moments for w, n in normal).reshape(q, c)
    kinds = [
        None if n.right is None else "plain" if np.array_equal(n.right, np.eye(c)) else "head"
        for _, n in normal
    ]
    plain = [term for term, kind in zip(normal, kinds) if kind == "plain"]
    heads = [term for term, kind in zip(normal, kinds) if kind == "head"]
    if len(plain) + len(heads) == len(normal) and all(
        np.array_equal(n.right, heads[0][1].right) for _, n in heads
    ):
        A = sum((w * n.left for w, n in plain), np.zeros((q, q)))
        B = heads[0][1].right if heads else np.zeros((c, c))
        A_B = sum((w * n.left for w, n in heads), np.zeros((q, q)))
        scale = ridge * max((np.trace(A) * c + np.trace(A_B) * np.trace(B)) / (q * c), 1e-30)
        eigenvalues, Q = np.linalg.eigh(B)
        systems = A + eigenvalues[:, None, None] * A_B + scale * np.eye(q)  # (c, q, q)
        theta = np.linalg.solve(systems, (moments @ Q).T[..., None])[..., 0].T
        return theta @ Q.T
    gram = sum(
        (w * (n.left if n.right is None else np.kron(n.left, n.right)) for w, n in normal),
        np.zeros((q * c, q * c)),
    )
    regularized = gram + ridge * max(float(np.trace(gram)) / len(gram), 1e-30) * np.eye(len(gram))
    return np.linalg.solve(regularized, moments.reshape(-1)).reshape(q, c)


def refit_output(
    net: GatedNetwork, terms: Sequence[TermData], ridge: float = 1e-4, chunk: int = 512
) -> tuple[GatedNetwork, dict[str, Any]]:
    """The network with its output layer (``w_out``, skip, bias) refitted on ``terms``.

    Returns the new network and the objective (relative to the zero model's) before and after.
    """
    if net.num_neurons == 0:
        return net, {"ridge": ridge, "applied": False, "reason": "no neuron"}
    K, c = net.w_out.shape
    d = net.w_in.shape[0]
    unknowns = K + (d if net.skip is not None else 0) + 1
    if not identified(terms, unknowns):
        return net, {"ridge": ridge, "applied": False, "reason": "too few images"}
    normal = [
        (term.weight / term.num_groups, _normal_equations(net, term, chunk)) for term in terms
    ]
    theta = _solve_normal_equations(normal, ridge, unknowns, c)
    dtype = np.asarray(net.w_out).dtype
    refit = net._replace(
        w_out=jnp.asarray(theta[:K], dtype),
        skip=None if net.skip is None else jnp.asarray(theta[K : K + d], dtype),
        bias=jnp.asarray(theta[-1], dtype),
    )
    before, after = (objective_value(n, terms) for n in (net, refit))
    zero = objective_value(None, terms)
    return refit, {
        "ridge": ridge,
        "applied": True,
        "train_rel_objective_before": before / max(zero, 1e-30),
        "train_rel_objective_after": after / max(zero, 1e-30),
    }


def objective_value(net: GatedNetwork | None, terms: Sequence[TermData], chunk: int = 512) -> float:
    """``Σ_t w_t · ½ mean_n ‖readout_t(o) − T_t‖²`` of the network's outputs (``None``: zero
    outputs)."""
    from cvxdist.mapping import predict

    total = 0.0
    for term in terms:
        value = 0.0
        for start in range(0, term.num_groups, chunk):
            rows = jnp.asarray(term.rows[start : start + chunk])
            if net is None:
                outputs = jnp.zeros((*rows.shape[:2], term.output_width), rows.dtype)
            else:
                outputs = predict(net, rows.reshape(-1, rows.shape[-1])).reshape(
                    *rows.shape[:2], -1
                )
            J = None if term.jacobian is None else term.jacobian[start : start + chunk]
            diff = np.asarray(term.readout(outputs, J)) - term.targets[start : start + chunk]
            value += 0.5 * float(np.sum(diff.astype(np.float64) ** 2))
        total += term.weight * value / term.num_groups
    return total
