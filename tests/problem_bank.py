"""A shared bank of small gated-ReLU problems and their CVXPY reference optima."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cvxpy as cp
import numpy as np


@dataclass(frozen=True)
class BankProblem:
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


BANK = (
    BankProblem("tall", N=60, d=5, c=2, P=8),
    BankProblem("single_output", N=80, d=6, c=1, P=12, seed=1),
    BankProblem("skip_bias", N=50, d=4, c=3, P=6, skip=True, bias=True, seed=2),
    BankProblem(
        "chunked_recomputed", N=70, d=5, c=2, P=8, chunk_rows=16, store_masks=False, seed=3
    ),
    BankProblem("wide", N=30, d=12, c=2, P=10, seed=4),
)
BANK_BY_NAME = {p.name: p for p in BANK}

CVXPY_REGS = ("coupled", "one_vs_all", "nuclear", "group_elastic")
ELASTIC_ALPHA = 0.5


def _penalty(reg: str, blocks: list) -> cp.Expression:
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
def cvxpy_reference(name: str, reg: str, lam: float) -> tuple[float, np.ndarray]:
    """CVXPY optimum (objective, U (P, d, c)) in the 1/(2N) convention."""
    spec = BANK_BY_NAME[name]
    X, Y, G = spec.arrays()
    N, d = X.shape
    c = Y.shape[1]
    masks = (X @ G >= 0).astype(float)
    blocks = [cp.Variable((d, c)) for _ in range(G.shape[1])]
    pred = sum(cp.multiply(masks[:, [i]], X @ u) for i, u in enumerate(blocks))
    if spec.skip:
        pred = pred + X @ cp.Variable((d, c))
    if spec.bias:
        pred = pred + np.ones((N, 1)) @ cp.Variable((1, c))
    objective = cp.sum_squares(pred - Y) / (2 * N) + lam * _penalty(reg, blocks)
    problem = cp.Problem(cp.Minimize(objective))
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == cp.OPTIMAL, problem.status
    return float(problem.value), np.stack([u.value for u in blocks])
