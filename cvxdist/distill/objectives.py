r"""What a student is fitted to: the data terms of DESIGN §2a on host arrays.

A student maps reduced input rows ``a`` (``d'`` values per output location) to reduced
outputs ``o`` (``c'`` values), expanded to the block output ``y ≈ o Bᵀ + μ`` (``B (C, c')``,
the output basis of :class:`~cvxdist.distill.student.Reduction`). The objectives
(``--objective``):

- ``activations``: ``½‖o − (y − μ)B‖²`` per location (block-local activation matching);
- ``logits``: the teacher's logits through a linear suffix (global mean pool + dense
  ``W``, bias ``w₀``): ``½‖mean_l(o_l) Bᵀ W − (ȳ − μ) W‖²`` per image, exact because
  ``logits = ȳ W + w₀``; the student's output basis is then ``B = orth(W)`` (only ``H·o`` is
  identified: the minimum-norm output layer lives in the row space of ``Hᵀ``);
- ``gauss-newton``: ``½‖J_n (vec(o_n Bᵀ + μ) − vec(y_n))‖²`` per image, ``J_n`` the Jacobian of
  the logits with respect to the block output at the teacher's ``y_n``: the local quadratic
  model of the downstream loss, for any suffix;
- ``mixed``: ``activations`` plus ``logits`` (or ``gauss-newton`` when the suffix is not
  linear), each normalised by its value at ``U = 0`` (with the bias fitted), the downstream
  term weighted ``logit_weight``.

With an identity shortcut the targets ``y`` are what the block adds (``y − z``), and the
same formulas hold. `TermData` holds one term (rows grouped by image, targets, the readout's
matrix); the convex problem (`convex_problem`), the Adam baselines and the output refit all
read the same `TermData`, so every method is compared on the same objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.errors import UserError

OBJECTIVES = ("activations", "logits", "mixed", "gauss-newton")
TERM_KINDS = ("activations", "logits", "gauss-newton")


@dataclasses.dataclass(frozen=True)
class TermData:
    """One data term over images (see the module docstring).

    Attributes:
        kind: ``activations``, ``logits`` or ``gauss-newton``.
        rows: ``(N, L, d')`` reduced student input rows, ``L`` locations per image (for
            ``activations`` each location is its own group: ``(N·L, 1, d')``).
        targets: ``(N, L, c')`` for ``activations`` (``L = 1``), ``(N, k)`` otherwise.
        weight: the term's weight ``w`` (its scale in the objective is ``w / N``).
        head: ``logits``: ``H = BᵀW (c', k)``.
        jacobian: ``gauss-newton``: ``J_n (I_L ⊗ B)``, ``(N, k, L·c')``.
    """

    kind: str
    rows: np.ndarray
    targets: np.ndarray
    weight: float = 1.0
    head: np.ndarray | None = None
    jacobian: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in TERM_KINDS:
            raise ValueError(f"unknown term kind {self.kind!r}; one of {', '.join(TERM_KINDS)}")

    @property
    def num_groups(self) -> int:
        return len(self.rows)

    @property
    def output_width(self) -> int:
        """``c'``: the width of the student outputs the term reads."""
        if self.kind == "activations":
            return self.targets.shape[-1]
        if self.kind == "logits":
            return self.head.shape[0]
        return self.jacobian.shape[2] // self.rows.shape[1]

    def readout(self, outputs: Any, jacobian: Any = None) -> Any:
        """What the term compares with its targets, from outputs ``(B, L, c')`` of ``B``
        groups (``jacobian``: those groups' ``J``, default all of them)."""
        if self.kind == "activations":
            return outputs
        if self.kind == "logits":
            return outputs.mean(axis=1) @ self.head
        J = self.jacobian if jacobian is None else jacobian
        return jnp.einsum("nkl,nl->nk", J, outputs.reshape(len(outputs), -1))

    def value_at_zero(self) -> float:
        """The term's unweighted value ``½ mean‖T − T̄‖²`` of the zero model with the bias
        fitted (a constant output): what ``mixed`` normalises by."""
        targets = self.targets.reshape(len(self.targets), -1).astype(np.float64)
        if self.kind == "gauss-newton":  # a constant output c gives J_n (1 ⊗ c): fit it
            L = self.rows.shape[1]
            c = self.jacobian.shape[2] // L
            design = self.jacobian.reshape(len(targets), -1, L, c).sum(axis=2)  # (N, k, c')
            flat = design.reshape(-1, c)
            coef, *_ = np.linalg.lstsq(flat, targets.reshape(-1), rcond=None)
            residual = targets.reshape(-1) - flat @ coef
        else:
            residual = targets - targets.mean(axis=0)
        return float(0.5 * np.sum(residual**2) / len(targets))


def linear_head(teacher: Any, last: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W (C, k), w₀ (k,))`` when the suffix after block ``last`` is the teacher's head
    (global average pool + dense), else ``None``.

    Probed from the suffix itself (``w₀`` at a zero map, ``W`` from constant maps) and checked
    on a random map, so it does not depend on how the head's parameters are named.
    """
    _, stop = teacher.resolve(last)
    if teacher.segments[stop + 1 :] != ("head",):
        return None
    fns = teacher.cut_functions(last)
    shape = jax.eval_shape(
        lambda x: fns.block(teacher.variables, fns.prefix(teacher.variables, x)),
        jax.ShapeDtypeStruct((1, *teacher.image_shape), jnp.float32),
    ).shape
    if len(shape) != 4:
        return None
    channels = shape[-1]
    constant = jnp.broadcast_to(
        jnp.eye(channels, dtype=jnp.float32)[:, None, None, :], (channels, *shape[1:])
    )
    w0 = np.asarray(fns.suffix(teacher.variables, jnp.zeros((1, *shape[1:]))))[0]
    W = np.asarray(fns.suffix(teacher.variables, constant)) - w0
    probe = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(np.float32)
    expected = probe.mean(axis=(1, 2)) @ W + w0
    if not np.allclose(np.asarray(fns.suffix(teacher.variables, probe)), expected, atol=1e-4):
        return None
    return W.astype(np.float64), w0.astype(np.float64)


def head_basis(W: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``(C, r)`` of the column space of ``W (C, k)``: the output space of a
    student fitted to the logits (``r = rank W``)."""
    left, sigma, _ = np.linalg.svd(W, full_matrices=False)
    rank = int(np.sum(sigma > sigma.max() * max(W.shape) * np.finfo(np.float64).eps))
    return left[:, : max(rank, 1)]


def resolve_objective(objective: str | None, linear: bool) -> str:
    """The objective to use: ``None`` picks the default for the cut (``logits`` when the
    suffix is linear, else ``mixed``, i.e. activations + Gauss–Newton; measured best, see
    the README)."""
    if objective is None:
        return "logits" if linear else "mixed"
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "logits" and not linear:
        raise UserError(
            "--objective logits needs a linear suffix (the last stage before the head: pool + "
            "dense); use gauss-newton or mixed for earlier cuts"
        )
    return objective


#: Unregularized parameters need this many scalar equations each (downstream objectives).
EQUATIONS_PER_UNKNOWN = 10


def identified(terms: Sequence[TermData], unknowns_per_output: int) -> bool:
    """Whether the data can identify ``unknowns_per_output · c'`` unregularized parameters
    (the linear skip and bias, or a refitted output layer).

    Downstream terms have one equation per image and logit (``N·k``), not one per location:
    with few images an unregularized skip fits the training logits exactly and generalises
    badly (measured on the digits teacher with 100 images and 128 input dimensions: 0.24 test
    accuracy with the skip, 0.97 without). A term of activations identifies them; a
    downstream-only objective needs ``N·k ≥ 10 × unknowns``.
    """
    if any(term.kind == "activations" for term in terms):
        return True
    equations = sum(term.num_groups * term.targets.shape[-1] for term in terms)
    unknowns = unknowns_per_output * terms[0].output_width
    return equations >= EQUATIONS_PER_UNKNOWN * unknowns


def normalise(terms: Sequence[TermData], logit_weight: float) -> list[TermData]:
    """``mixed``: each term divided by its value at ``U = 0``, downstream terms times
    ``logit_weight``."""
    if not logit_weight > 0:
        raise UserError(f"the logit weight must be positive, got {logit_weight}")
    out = []
    for term in terms:
        scale = 1.0 if term.kind == "activations" else logit_weight
        out.append(dataclasses.replace(term, weight=scale / max(term.value_at_zero(), 1e-30)))
    return out


# ----------------------------------------------------------------------------- the convex problem


def convex_problem(
    terms: Sequence[TermData], gates: np.ndarray, *, skip: bool, bias: bool = True
) -> Any:
    """The convex problem of the terms: plain gated rows for activations alone (so ADMM and
    its kernel apply), a :class:`~cvxdist.composed.ComposedProblem` otherwise."""
    from cvxdist.composed import data_term, gated_rows, make_composed, pooled_rows
    from cvxdist.problems import make_problem
    from cvxdist.readouts import Dense, Identity, PerGroup

    if len(terms) == 1 and terms[0].kind == "activations":
        (term,) = terms
        flat = term.rows.reshape(-1, term.rows.shape[-1])
        return make_problem(flat, term.targets.reshape(len(flat), -1), gates, skip=skip, bias=bias)
    c = terms[0].output_width
    built = []
    for term in terms:
        if term.kind == "activations":
            flat = term.rows.reshape(-1, term.rows.shape[-1])
            rows = gated_rows(flat, gates, c, skip=skip, bias=bias)
            built.append(
                data_term(rows, Identity(), term.targets.reshape(len(flat), -1), term.weight)
            )
        elif term.kind == "logits":
            rows = pooled_rows(term.rows, gates, c, skip=skip, bias=bias)
            head = Dense(jnp.asarray(term.head, rows.Phi.dtype))
            built.append(data_term(rows, head, term.targets, term.weight))
        else:
            N, L, d = term.rows.shape
            rows = gated_rows(
                term.rows.reshape(-1, d), gates, c, group_size=L, skip=skip, bias=bias
            )
            m = rows.chunk_rows // L
            J = np.zeros((rows.num_chunks * m, *term.jacobian.shape[1:]), term.jacobian.dtype)
            J[:N] = term.jacobian
            readout = PerGroup(jnp.asarray(J.reshape(rows.num_chunks, m, *J.shape[1:])), L)
            built.append(data_term(rows, readout, term.targets, term.weight))
    return make_composed(built, skip=skip, bias=bias)


# ----------------------------------------------------------------------------- building the terms


def activation_term(rows: np.ndarray, targets: np.ndarray) -> TermData:
    """Location rows ``(N, L, d')`` and reduced targets ``(N, L, c')``: one group per row."""
    d, c = rows.shape[-1], targets.shape[-1]
    return TermData("activations", rows.reshape(-1, 1, d), targets.reshape(-1, 1, c))


def logit_term(
    rows: np.ndarray, pooled_targets: np.ndarray, W: np.ndarray, reduction: Any
) -> TermData:
    """Rows ``(N, L, d')`` and the block targets' spatial means ``ȳ (N, C)`` (all channels):
    the targets are ``(ȳ − μ) W`` and the readout ``H = BᵀW``."""
    basis = _basis(reduction, pooled_targets.shape[-1])
    centred = np.asarray(pooled_targets, np.float64) - reduction.out_mean
    return TermData("logits", rows, (centred @ W).astype(np.float32), head=basis.T @ W)


def gauss_newton_term(
    rows: np.ndarray, block_targets: np.ndarray, jacobian: np.ndarray, reduction: Any
) -> TermData:
    """Rows ``(N, L, d')``, block targets ``(N, L, C)`` and ``J (N, k, L·C)``: targets
    ``J_n vec(y_n − μ)`` and the readout ``J_n (I_L ⊗ B)``."""
    N, L, C = block_targets.shape
    basis = _basis(reduction, C)
    J = jacobian.reshape(N, -1, L, C)
    reduced = np.einsum("nklC,Cc->nklc", J, basis).reshape(N, J.shape[1], -1)
    centred = (block_targets - reduction.out_mean).reshape(N, -1)
    targets = np.einsum("nkl,nl->nk", jacobian, centred)
    return TermData(
        "gauss-newton", rows, targets.astype(np.float32), jacobian=reduced.astype(np.float32)
    )


def concatenate_terms(parts: Sequence[TermData]) -> TermData:
    """One term from parts of the same kind over disjoint images (chunks of a stream)."""
    if not parts:
        raise UserError("no images for the data term")
    first = parts[0]

    def join(name: str) -> np.ndarray | None:
        values = [getattr(part, name) for part in parts]
        return None if values[0] is None else np.concatenate(values)

    return dataclasses.replace(
        first, rows=join("rows"), targets=join("targets"), jacobian=join("jacobian")
    )


def _basis(reduction: Any, channels: int) -> np.ndarray:
    return np.eye(channels) if reduction.out_basis is None else reduction.out_basis


# ----------------------------------------------------------------------------- losses


def objective_loss(
    terms: Sequence[TermData], predict: Callable[[Any, Any], Any]
) -> Callable[[Any, Sequence[tuple[Any, Any, Any]]], Any]:
    """``loss(params, batches)``: ``Σ_t w_t · ½ mean_n ‖readout_t(predict(params, a)) − T_t‖²``
    over one batch ``(rows, targets, jacobian or None)`` of groups per term (the objective of
    the Adam baselines; with all groups, the convex problem's data term)."""

    def loss(params: Any, batches: Sequence[tuple[Any, Any, Any]]) -> Any:
        total = 0.0
        for term, (rows, targets, jacobian) in zip(terms, batches):
            flat = rows.reshape(-1, rows.shape[-1])
            outputs = predict(params, flat).reshape(*rows.shape[:2], -1)
            fitted = term.readout(outputs, jacobian)
            diff = (fitted - targets).reshape(len(rows), -1)
            total = total + term.weight * 0.5 * jnp.mean(jnp.sum(diff * diff, axis=1))
        return total

    return loss
