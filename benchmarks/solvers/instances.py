"""The benchmark problems: shapes, seeded data, the float32 problem both tools solve, and the
float64 duality gap that judges every solution (whichever tool returned it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Relative duality gap both tools must reach (computed by the benchmark in float64).
TARGET_GAP = 1e-3
#: cvxdist's own tolerance: a little below the target so its float32 certificate stops it; the
#: later entries are used only if the float64 gap of its output missed the target.
OUR_TOLS = (9e-4, 4.5e-4, 2e-4)
#: λ as a fraction of λ_max (of the one_vs_all regularizer).
LAM_FRAC = 0.1
REG = "one_vs_all"
#: pyscnn's default RFISTA tolerance (on the squared norm of the min-norm subgradient).
SCNN_DEFAULT_TOL = 1e-6
MAX_ITERS = 20_000
#: Hidden units and noise level of the planted teacher that makes the targets.
TEACHER_WIDTH = 16
TEACHER_NOISE = 0.1


@dataclass(frozen=True)
class ProblemSpec:
    """One benchmark problem: shapes, seed, and how much measuring effort it gets."""

    name: str
    N: int
    d: int
    c: int
    P: int
    seed: int = 0
    repeats: int = 3  # steady-state cvxdist solves (median)
    eval_every: int = 1  # pyscnn iterates between float64 gap evaluations
    gemm_repeats: int = 10
    profile_iters: int | None = None  # iterations of the step-by-step profile (None: to tol)
    lam_frac: float = LAM_FRAC  # λ as a fraction of λ_max


#: Measuring effort of the larger problems (pyscnn's gap checked every 10 iterations).
_LARGE = {"repeats": 2, "eval_every": 10, "gemm_repeats": 5, "profile_iters": 60}
FULL_PROBLEMS = (
    ProblemSpec("n1000_d50_c1_p500", N=1000, d=50, c=1, P=500, seed=0, repeats=3, eval_every=1),
    ProblemSpec("n5000_d100_c10_p1000", N=5000, d=100, c=10, P=1000, seed=1, **_LARGE),
    ProblemSpec("n20000_d200_c1_p2000", N=20000, d=200, c=1, P=2000, seed=2, **_LARGE),
    ProblemSpec("n3000_d60_c5_p400", N=3000, d=60, c=5, P=400, seed=3, repeats=2, lam_frac=0.05),
)
QUICK_PROBLEMS = (ProblemSpec("quick_n500_d20_c2_p100", N=500, d=20, c=2, P=100, seed=0),)


@dataclass
class Instance:
    """Data of one problem as float64 arrays holding float32-representable values."""

    spec: ProblemSpec
    X: np.ndarray  # (N, d), unit-norm columns
    Y: np.ndarray  # (N, c)
    G: np.ndarray  # (d, P), canonical order
    masks: np.ndarray  # (N, P) bool, 1[X G > 0] in float64
    gates_dropped: int  # duplicate or all-zero patterns removed from the sampled gates
    info: dict[str, Any] = field(default_factory=dict)


def _as_f32_values(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).astype(np.float64)


def canonical_gates(X: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Gates in pyscnn's order: unique activation patterns sorted, all-zero patterns removed.

    pyscnn's ``compute_activation_patterns`` applies ``np.unique(..., axis=1)`` and drops the
    zero pattern; with the gates already in that order it keeps them all, in place.

    Returns:
        (gates, masks ``(N, P')`` bool, number of gates removed).
    """
    XG = X @ G
    if np.any(XG == 0):
        raise RuntimeError("a row lies exactly on a gate hyperplane; use another seed")
    masks = XG > 0
    _, first = np.unique(masks, axis=1, return_index=True)
    keep = first[masks[:, first].any(axis=0)]
    return G[:, keep], masks[:, keep], G.shape[1] - keep.size


def planted_data(
    N: int,
    d: int,
    c: int,
    P: int,
    seed: int = 0,
    width: int = TEACHER_WIDTH,
    noise: float = TEACHER_NOISE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded ``X (N, d)``, ``Y (N, c)``, ``G (d, P)``: Gaussian rows scaled to unit-norm columns,
    targets from a planted one-hidden-layer ReLU network (``width`` units, Gaussian weights)
    plus ``noise`` relative Gaussian noise, each target column scaled to unit std, and Gaussian
    gates; float64 arrays holding float32-representable values."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    X = _as_f32_values(X / np.linalg.norm(X, axis=0, keepdims=True))
    W1 = rng.standard_normal((d, width))
    W2 = rng.standard_normal((width, c))
    Y = np.maximum(X @ W1, 0.0) @ W2
    Y = Y + noise * Y.std(axis=0) * rng.standard_normal(Y.shape)
    Y = _as_f32_values(Y / Y.std(axis=0))
    G = _as_f32_values(rng.standard_normal((d, P)))
    return X, Y, G


def make_instance(spec: ProblemSpec) -> Instance:
    """The problem of ``spec`` (:func:`planted_data`), gates in pyscnn's canonical order."""
    X, Y, G = planted_data(spec.N, spec.d, spec.c, spec.P, spec.seed)
    G, masks, dropped = canonical_gates(X, G)
    return Instance(spec, X, Y, G, masks, dropped)


def float32_problem(inst: Instance) -> tuple[Any, int]:
    """The float32 cvxdist problem, with the float64 masks (shared with pyscnn).

    Returns the problem and how many mask entries float32 arithmetic had got wrong.
    """
    import equinox as eqx
    import jax.numpy as jnp

    from cvxdist.problems import make_problem

    problem = make_problem(
        inst.X.astype(np.float32), inst.Y.astype(np.float32), inst.G.astype(np.float32)
    )
    if problem.masks is None:  # recomputed per chunk: cannot share; count nothing
        return problem, -1
    K, n, P = problem.masks.shape
    N = inst.X.shape[0]
    computed = np.asarray(problem.masks).reshape(K * n, P)
    flips = int(np.count_nonzero(computed[:N] != inst.masks))
    if flips:
        shared = computed.copy()
        shared[:N] = inst.masks
        problem = eqx.tree_at(lambda p: p.masks, problem, jnp.asarray(shared.reshape(K, n, P)))
    return problem, flips


class GapEvaluator:
    """Objective and relative duality gap of any weights, in float64, in our convention
    (:func:`cvxdist.problems.certify` on the float64 problem)."""

    def __init__(self, inst: Instance):
        import jax
        import jax.numpy as jnp

        from cvxdist.problems import lam_max, make_problem
        from cvxdist.prox import get_regularizer

        self.reg = get_regularizer(REG)
        with jax.enable_x64(True):
            self.problem = make_problem(inst.X, inst.Y, inst.G, dtype=jnp.float64)
            if self.problem.masks is not None:
                stored = np.asarray(self.problem.masks).reshape(-1, inst.masks.shape[1])
                if not np.array_equal(stored[: inst.X.shape[0]], inst.masks):
                    raise RuntimeError("float64 masks differ from the instance's masks")
            self.lam_max = float(lam_max(self.problem, self.reg))

    def __call__(self, U: Any, lam: float) -> dict[str, float]:
        """``U`` in our layout ``(P, d, c)``."""
        import jax
        import jax.numpy as jnp

        from cvxdist.problems import certify

        with jax.enable_x64(True):
            lam64 = jnp.asarray(lam, jnp.float64)
            U64 = jnp.asarray(np.asarray(U, np.float64))
            ev = jax.device_get(certify(self.problem, self.reg, lam64, U64).evaluation)
        return {
            "objective": float(ev.primal),
            "dual_objective": float(ev.dual),
            "rel_gap": float(ev.rel_gap),
        }


def select_problems(quick: bool, only: Sequence[str] | None = None) -> tuple[ProblemSpec, ...]:
    """The problems a run covers. Raises ValueError for an unknown name in ``only``."""
    specs = QUICK_PROBLEMS if quick else FULL_PROBLEMS
    if only:
        unknown = set(only) - {s.name for s in specs}
        if unknown:
            names = ", ".join(s.name for s in specs)
            raise ValueError(f"unknown problem(s) {sorted(unknown)}; choose from {names}")
        specs = tuple(s for s in specs if s.name in only)
    return specs
