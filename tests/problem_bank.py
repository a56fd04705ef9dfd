"""A shared bank of small gated-ReLU problems, their CVXPY optima and a numpy objective.

Everything a test needs to judge a solve independently of the solver core:

- :meth:`BankProblem.problem` builds the cvxdist problem (the only call into the core);
- :meth:`BankProblem.objective` recomputes the objective of returned weights in float64 numpy;
- :func:`cvxpy_reference` solves the same problem with CVXPY (cached per process, so every
  test that asks for the same (problem, regularizer, λ) shares one solve).

A new problem *kind* (a new data term) is a :class:`BankProblem` subclass that overrides
``kind``, :meth:`~BankProblem.problem`, :meth:`~BankProblem.loss_numpy` and
:meth:`~BankProblem.loss_cvxpy`; listed in :data:`BANK` (a composed data term: in
:data:`COMPOSED_BANK`) it joins every table that accepts its kind (see
``tests/test_reference_table.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import cvxpy as cp
import numpy as np
import scipy.linalg
import test_composed as composed_cases

from cvxdist.problems import lam_max, make_problem
from cvxdist.prox import GroupElastic, get_regularizer

CVXPY_REGS = ("coupled", "one_vs_all", "nuclear", "group_elastic")
ELASTIC_ALPHA = 0.5
LAM_FRAC = 0.1


def cvxpy_outputs(
    X: np.ndarray, G: np.ndarray, blocks: list, skip: bool, bias: bool
) -> cp.Expression:
    """The gated network's outputs ``Σ_i D_i X u_i`` (N, c) as a CVXPY expression of the gate
    blocks, with a fresh skip ``X V`` and bias ``1 bᵀ`` when asked."""
    masks = (X @ G >= 0).astype(float)
    out = sum(cp.multiply(masks[:, [i]], X @ u) for i, u in enumerate(blocks))
    d, c = X.shape[1], blocks[0].shape[1]
    if skip:
        out = out + X @ cp.Variable((d, c))
    if bias:
        out = out + np.ones((len(X), 1)) @ cp.Variable((1, c))
    return out


@dataclass(frozen=True)
class BankProblem:
    """A seeded planted problem: rows ``X``, targets ``Y`` of a gated network plus noise,
    gates ``G``; the plain activations data term ``1/(2N) ||Σ_i m_i ⊙ (X U_i) (+XV+b) − Y||²``."""

    kind: ClassVar[str] = "activations"

    name: str
    N: int
    d: int
    c: int
    P: int
    skip: bool = False
    bias: bool = False
    chunk_rows: int | None = None
    store_masks: bool | None = None
    seed: int = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        X = rng.standard_normal((self.N, self.d))
        # A planted gated network plus noise, so the optimum has structure.
        G_true = rng.standard_normal((self.d, 3))
        W_true = rng.standard_normal((3, self.d, self.c))
        masks = (X @ G_true >= 0).astype(float)
        Y = np.einsum("np,npc->nc", masks, np.einsum("nd,pdc->npc", X, W_true))
        Y = Y + 0.3 * rng.standard_normal(Y.shape)
        G = rng.standard_normal((self.d, self.P))
        return X, Y, G

    def problem(self, dtype: str = "float64", **options: Any) -> Any:
        """The cvxdist problem; ``options`` override the bank's ``make_problem`` settings."""
        X, Y, G = self.arrays()
        settings = {
            "skip": self.skip,
            "bias": self.bias,
            "chunk_rows": self.chunk_rows,
            "store_masks": self.store_masks,
            "dtype": dtype,
            **options,
        }
        return make_problem(X, Y, G, **settings)

    def predict_numpy(self, U: np.ndarray, V: Any = None, b: Any = None) -> np.ndarray:
        X, _, G = self.arrays()
        masks = (X @ G >= 0).astype(float)
        pred = np.einsum("np,npc->nc", masks, np.einsum("nd,pdc->npc", X, U))
        if V is not None:
            pred = pred + X @ np.asarray(V, np.float64)
        if b is not None:
            pred = pred + np.asarray(b, np.float64)
        return pred

    def loss_numpy(self, U: np.ndarray, V: Any = None, b: Any = None) -> float:
        """The data term of the weights, in float64 numpy (1/(2N) convention)."""
        _, Y, _ = self.arrays()
        return 0.5 * float(np.sum((self.predict_numpy(U, V, b) - Y) ** 2)) / self.N

    def loss_cvxpy(self, blocks: list) -> cp.Expression:
        """The data term as a CVXPY expression of the gate blocks (skip and bias added here)."""
        X, Y, G = self.arrays()
        pred = cvxpy_outputs(X, G, blocks, self.skip, self.bias)
        return cp.sum_squares(pred - Y) / (2 * self.N)

    def objective(self, reg: str, lam: float, U: Any, V: Any = None, b: Any = None) -> float:
        """F(U) = data term + λ R(U), recomputed in float64 numpy from the weights."""
        U = np.asarray(U, np.float64)
        return self.loss_numpy(U, V, b) + lam * penalty_numpy(reg, U)


BANK = (
    BankProblem("tall", N=60, d=5, c=2, P=8),
    BankProblem("single_output", N=80, d=6, c=1, P=12, seed=1),
    BankProblem("skip_bias", N=50, d=4, c=3, P=6, skip=True, bias=True, seed=2),
    BankProblem(
        "chunked_recomputed", N=70, d=5, c=2, P=8, chunk_rows=16, store_masks=False, seed=3
    ),
    BankProblem("wide", N=30, d=12, c=2, P=10, seed=4),
)

# ---------------------------------------------------------------------------------------
# Composed data terms (pooled rows S, a dense head H, per-group Jacobians J_n, weighted sums
# of terms; DESIGN §2a). Each is a BankProblem subclass with `kind = "<name>"` overriding
# `problem` (built through the public API), `loss_numpy` (float64 numpy) and `loss_cvxpy`
# (the same term in CVXPY); the reference table runs it on every solver path whose `kinds`
# include it. The problems are those of tests/test_composed.py (its data and its `build`);
# here each readout is written out as an explicit matrix acting on the row-major outputs.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComposedBankProblem(BankProblem):
    """A composition of ``tests/test_composed.py`` (``kind`` names it): the student's outputs
    ``s = Σ_i m_i ⊙ (X U_i) (+XV+b)`` on ``groups × L`` location rows are read out by fixed
    linear maps; the data term is ``Σ_t w_t/(2 n_t) ||M_t vec(s) − T_t||²`` with ``vec``
    row-major and ``n_t`` the rows of ``T_t``."""

    kind: ClassVar[str] = "composed"

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        X, G, Y, _, _ = composed_cases.data()
        return X, Y, G

    def problem(self, dtype: str = "float64", **options: Any) -> Any:
        if options:
            raise TypeError(f"composed bank problems take no make_problem options: {options}")
        return composed_cases.build(self.kind, self.skip, self.bias, dtype)

    def terms(self) -> list[tuple[float, np.ndarray, np.ndarray]]:
        """``(w_t, M_t, T_t)`` per data term: ``M_t (n_t k_t, N c)``, ``T_t (n_t, k_t)``."""
        raise NotImplementedError

    def loss_numpy(self, U: np.ndarray, V: Any = None, b: Any = None) -> float:
        s = self.predict_numpy(U, V, b).reshape(-1)
        return sum(
            w * 0.5 * float(np.sum((M @ s - T.reshape(-1)) ** 2)) / len(T)
            for w, M, T in self.terms()
        )

    def loss_cvxpy(self, blocks: list) -> cp.Expression:
        X, _, G = self.arrays()
        s = cp.vec(cvxpy_outputs(X, G, blocks, self.skip, self.bias), order="C")
        return sum(
            w * cp.sum_squares(M @ s - T.reshape(-1)) / (2 * len(T)) for w, M, T in self.terms()
        )


def _pool_matrix() -> np.ndarray:
    """``S (groups, groups·L)``: the mean over each group's ``L`` location rows."""
    groups, L = composed_cases.GROUPS, composed_cases.L
    return np.kron(np.eye(groups), np.full((1, L), 1.0 / L))


@dataclass(frozen=True)
class PooledHeadProblem(ComposedBankProblem):
    """The dense head on the per-image mean: ``||S s H − T||² / (2 groups)``."""

    kind: ClassVar[str] = "pooled_head"

    def terms(self) -> list[tuple[float, np.ndarray, np.ndarray]]:
        _, _, Y, H, _ = composed_cases.data()
        # vec_C(S s H) = (S ⊗ Hᵀ) vec_C(s)
        return [(1.0, np.kron(_pool_matrix(), H.T), composed_cases.pooled_targets(Y, H))]


@dataclass(frozen=True)
class PerGroupProblem(ComposedBankProblem):
    """A Jacobian per image on its ``L·c`` stacked outputs: ``Σ_g ||J_g s_g − T_g||² / (2
    groups)``."""

    kind: ClassVar[str] = "per_group"

    def terms(self) -> list[tuple[float, np.ndarray, np.ndarray]]:
        _, _, Y, _, J = composed_cases.data()
        # Row-major, group g's outputs are the block vec_C(s)[g L c : (g+1) L c].
        return [(1.0, scipy.linalg.block_diag(*J), composed_cases.jacobian_targets(Y, J))]


@dataclass(frozen=True)
class WeightedSumProblem(ComposedBankProblem):
    """Activation matching plus the pooled head's logits, weighted 1 : 3."""

    kind: ClassVar[str] = "weighted_sum"

    def terms(self) -> list[tuple[float, np.ndarray, np.ndarray]]:
        _, _, Y, H, _ = composed_cases.data()
        return [
            (1.0, np.eye(Y.size), Y),
            (3.0, np.kron(_pool_matrix(), H.T), composed_cases.pooled_targets(Y, H)),
        ]


_COMPOSED_SHAPE = {
    "N": composed_cases.GROUPS * composed_cases.L,
    "d": composed_cases.D,
    "c": composed_cases.C,
    "P": composed_cases.P,
}
COMPOSED_BANK: tuple[BankProblem, ...] = (
    PerGroupProblem("composed_per_group", **_COMPOSED_SHAPE, skip=True, bias=True),
    WeightedSumProblem("composed_weighted_sum", **_COMPOSED_SHAPE),
    PooledHeadProblem("composed_pooled_head", **_COMPOSED_SHAPE, skip=True, bias=True),
)

BANK_BY_NAME = {p.name: p for p in (*BANK, *COMPOSED_BANK)}


def regularizer(name: str) -> Any:
    """The regularizer object of a bank name (``group_elastic`` at the bank's α)."""
    return GroupElastic(alpha=ELASTIC_ALPHA) if name == "group_elastic" else get_regularizer(name)


def block_norms_numpy(reg: str, U: np.ndarray) -> np.ndarray:
    """The norms R sums (per gate, per gate and output, or the singular values), in numpy."""
    if reg == "one_vs_all":
        return np.linalg.norm(U, axis=1)
    if reg == "nuclear":
        return np.linalg.svd(U, compute_uv=False)
    return np.linalg.norm(U, axis=(1, 2))  # coupled, group_elastic


def penalty_numpy(reg: str, U: np.ndarray) -> float:
    """R(U) in float64 numpy, from the definitions (DESIGN §2)."""
    norms = block_norms_numpy(reg, U)
    if reg == "group_elastic":
        return float(np.sum(ELASTIC_ALPHA * norms + 0.5 * (1 - ELASTIC_ALPHA) * norms**2))
    return float(np.sum(norms))


def dual_norm_numpy(reg: str, Z: np.ndarray) -> float:
    """R°(Z): the largest dual block norm (each block norm here is self-dual or, for the
    nuclear norm, dual to the spectral norm: the largest singular value); /α for
    ``group_elastic``, whose subdifferential at zero is α times the coupled one."""
    top = float(np.max(block_norms_numpy(reg, Z)))
    return top / ELASTIC_ALPHA if reg == "group_elastic" else top


def _penalty_cvxpy(reg: str, blocks: list) -> cp.Expression:
    if reg == "coupled":
        return sum(cp.norm(u, "fro") for u in blocks)
    if reg == "one_vs_all":
        return sum(cp.sum(cp.norm(u, 2, axis=0)) for u in blocks)
    if reg == "nuclear":
        return sum(cp.normNuc(u) for u in blocks)
    if reg == "group_elastic":
        a = ELASTIC_ALPHA
        return sum(a * cp.norm(u, "fro") + 0.5 * (1 - a) * cp.sum_squares(u) for u in blocks)
    raise ValueError(reg)


@functools.cache
def bank_lam(name: str, reg: str, frac: float = LAM_FRAC) -> float:
    """``frac · λ_max`` of a bank problem, from the float64 problem (shared by every dtype, so
    float32 and bf16 solves are compared with the same cached CVXPY optimum)."""
    import jax

    with jax.enable_x64(True):
        problem = BANK_BY_NAME[name].problem("float64")
        return frac * float(lam_max(problem, regularizer(reg)))


def cvxpy_reference(name: str, reg: str, lam: float) -> tuple[float, np.ndarray]:
    """CVXPY optimum (objective, U (P, d, c)) of the bank problem ``name``, 1/(2N) convention."""
    return cvxpy_solution(BANK_BY_NAME[name], reg, lam)


@functools.cache
def cvxpy_solution(spec: BankProblem, reg: str, lam: float) -> tuple[float, np.ndarray]:
    """CVXPY optimum of any bank-style problem (cached per problem, regularizer and λ)."""
    blocks = [cp.Variable((spec.d, spec.c)) for _ in range(spec.P)]
    objective = spec.loss_cvxpy(blocks) + lam * _penalty_cvxpy(reg, blocks)
    problem = cp.Problem(cp.Minimize(objective))
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == cp.OPTIMAL, problem.status
    return float(problem.value), np.stack([u.value for u in blocks])


def build(spec: BankProblem, dtype: str = "float64", **options: Any) -> Any:
    """``spec.problem(dtype, **options)``: the cvxdist problem of a bank entry."""
    return spec.problem(dtype, **options)
