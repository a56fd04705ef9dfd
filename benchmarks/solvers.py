r"""R-FISTA (cvxdist) against pyscnn's R-FISTA, timed to the same relative duality gap.

Both tools solve the *identical* gated-ReLU problem with the ``one_vs_all`` regularizer (pyscnn's
``NeuronGL1``):

- the same rows ``X`` (unit-norm columns), targets ``Y`` and gate vectors ``G``; the gates are
  put in pyscnn's canonical order (sorted unique, non-zero activation patterns) beforehand, so
  pyscnn's own de-duplication keeps every gate in place; the benchmark checks that pyscnn's
  masks and gates equal ours;
- pyscnn's objective is :math:`\|r\|^2/(2Nc) + \lambda_s \sum_{k,i}\|W_{k,i}\|_2` (its
  ``Model.objective`` passes ``scaling = N`` and ``_scaling`` multiplies by ``c``), ours is
  :math:`\|r\|^2/(2N) + \lambda R(U)`; multiplying pyscnn's by ``c`` gives ours, so
  :math:`\lambda_s = \lambda / c` and :math:`F_{ours} = c\,F_{scnn}` (checked on every run);
- masks are computed once in float64 and shared: pyscnn builds them in float64 from the same
  float32-representable data, and the float32 cvxdist problem gets the same masks.

Quality is measured by the benchmark itself, never by either tool's own stopping rule: the
relative duality gap of the returned weights, computed in float64 with
:func:`cvxdist.problems.evaluate`. pyscnn's stopping rule (squared norm of the minimum-norm
subgradient ≤ tol) says little about the gap, so pyscnn is run with ``tol = 0`` and a callback
that evaluates the gap of its iterates (the callback's time is excluded) and stops it at the
first iterate whose gap is ≤ the target: pyscnn is timed with an *oracle* stopping rule, which
favours it. cvxdist stops on its own certificate (``tol`` a little below the target; the float64
gap of its output is checked and the solve repeated with a tighter ``tol`` if it missed).

Timing: float32 for both; the same number of threads (all usable cores) for XLA, OpenBLAS (which
pyscnn's default CPU backend, numpy through ``opt_einsum``, uses) and torch. cvxdist is timed
with compilation (first call for the shapes) and in steady state (median of later calls); one
iteration is compared with the two GEMMs it performs, jitted and timed in the same run: in the
feature-first order forward ``X @ W``, ``W (d, P·c)``, and adjoint ``Xᵀ @ Z``, ``Z (N, P·c)``; in
the gate-first order (see :mod:`cvxdist.operators`) ``M @ W``, ``W (P, d·c)``, and ``Mᵀ @ Z``,
``Z (N, d·c)``, with ``M`` the ``(N, P)`` float masks. Same flops either way.

Run: ``cvxdist bench solvers --out DIR`` (full) or ``--quick`` (one small problem, for CI).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    blas_threads,
    fmt,
    load_average,
    machine_description,
    markdown_table,
    usable_cores,
    write_json,
)
from benchmarks.solver_variants import (
    run_variants,
    summarize_variants,
    variants_summary,
    variants_table,
)

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
    lam_frac: float = LAM_FRAC


FULL_PROBLEMS = (
    ProblemSpec("n1000_d50_c1_p500", N=1000, d=50, c=1, P=500, seed=0, repeats=3, eval_every=1),
    ProblemSpec(
        "n5000_d100_c10_p1000",
        N=5000,
        d=100,
        c=10,
        P=1000,
        seed=1,
        repeats=2,
        eval_every=10,
        gemm_repeats=5,
        profile_iters=60,
    ),
    ProblemSpec(
        "n20000_d200_c1_p2000",
        N=20000,
        d=200,
        c=1,
        P=2000,
        seed=2,
        repeats=2,
        eval_every=10,
        gemm_repeats=5,
        profile_iters=60,
    ),
    ProblemSpec("n3000_d60_c5_p400", N=3000, d=60, c=5, P=400, seed=3, repeats=2, lam_frac=0.05),
)
QUICK_PROBLEMS = (ProblemSpec("quick_n500_d20_c2_p100", N=500, d=20, c=2, P=100, seed=0),)


# --------------------------------------------------------------------------------------------
# Problem instances


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


def make_instance(spec: ProblemSpec) -> Instance:
    """Seeded problem: Gaussian rows scaled to unit-norm columns, Gaussian gates, and targets
    from a planted one-hidden-layer ReLU network (``TEACHER_WIDTH`` units, Gaussian weights)
    plus ``TEACHER_NOISE`` relative Gaussian noise, each target column scaled to unit std."""
    rng = np.random.default_rng(spec.seed)
    X = rng.standard_normal((spec.N, spec.d))
    X = _as_f32_values(X / np.linalg.norm(X, axis=0, keepdims=True))
    W1 = rng.standard_normal((spec.d, TEACHER_WIDTH))
    W2 = rng.standard_normal((TEACHER_WIDTH, spec.c))
    Y = np.maximum(X @ W1, 0.0) @ W2
    Y = Y + TEACHER_NOISE * Y.std(axis=0) * rng.standard_normal(Y.shape)
    Y = _as_f32_values(Y / Y.std(axis=0))
    G = _as_f32_values(rng.standard_normal((spec.d, spec.P)))
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
    """Objective and relative duality gap of any weights, in float64, in our convention."""

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

        with jax.enable_x64(True):
            ev = _evaluate(
                self.problem,
                self.reg,
                jnp.asarray(lam, jnp.float64),
                jnp.asarray(np.asarray(U, np.float64)),
            )
            ev = jax.device_get(ev)
        return {
            "objective": float(ev.primal),
            "dual_objective": float(ev.dual),
            "rel_gap": float(ev.rel_gap),
        }


def _evaluate(problem: Any, reg: Any, lam: Any, U: Any) -> Any:
    return _evaluate_jit()(problem, reg, lam, U)


_EVALUATE = None


def _evaluate_jit() -> Callable:
    global _EVALUATE
    if _EVALUATE is None:
        import equinox as eqx

        from cvxdist import operators
        from cvxdist.problems import evaluate

        @eqx.filter_jit
        def run(problem: Any, reg: Any, lam: Any, U: Any) -> Any:
            r, _ = operators.residual(problem, U)
            grad = -operators.adjoint(problem, r) / problem.num_rows
            return evaluate(problem, reg, lam, U, r, grad)

        _EVALUATE = run
    return _EVALUATE


# --------------------------------------------------------------------------------------------
# cvxdist


def run_cvxdist(
    problem: Any,
    lam: float,
    evaluator: GapEvaluator,
    repeats: int,
    log: Callable[[str], None],
    solver: Any = "fista",
    name: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Solve to the target gap: first call (with compilation), then ``repeats`` steady calls
    (``options``: more arguments of ``solve``, such as ``working_set``)."""
    import jax

    from cvxdist.solvers import solve

    name = name or solver

    def call(tol: float) -> tuple[Any, float]:
        start = time.perf_counter()
        solution = solve(
            problem, lam, reg=REG, solver=solver, tol=tol, max_iters=MAX_ITERS, **options
        )
        jax.block_until_ready(solution)
        return solution, time.perf_counter() - start

    tries = []
    cold_total = 0.0
    for tol in OUR_TOLS:
        solution, wall = call(tol)
        cold_total += wall
        check = evaluator(solution.U, lam)
        tries.append(
            {
                "tol": tol,
                "wall_s": wall,
                "iterations": int(solution.stats.iterations),
                "own_rel_gap_f32": float(solution.stats.rel_gap),
                "rel_gap_f64": check["rel_gap"],
                "message": solution.message,
            }
        )
        log(
            f"  cvxdist {name} tol={tol:g}: {wall:.3f}s (first call), "
            f"{tries[-1]['iterations']} iters, "
            f"gap f64 {check['rel_gap']:.3g}"
        )
        if check["rel_gap"] <= TARGET_GAP:
            break
    tol = tries[-1]["tol"]
    walls, cores = [], []
    for _ in range(repeats):
        again, wall = call(tol)
        walls.append(wall)
        cores.append(float(again.stats.time_s))
    steady = statistics.median(walls)
    iterations = int(solution.stats.iterations)
    log(f"  cvxdist {name} steady: {steady:.3f}s median of {walls}")
    return {
        "solver": name,
        "reached_target": check["rel_gap"] <= TARGET_GAP,
        "tol": tol,
        "iterations": iterations,
        "rel_gap": check["rel_gap"],
        "objective": check["objective"],
        "converged": bool(solution.converged),
        "message": solution.message,
        "active_gates": int(solution.stats.active_gates),
        "iteration_equivalents": float(solution.stats.iteration_equivalents),
        "working_set": int(solution.stats.working_set),
        "screened": int(solution.stats.screened),
        "time_with_compile_s": cold_total,
        "time_steady_s": steady,
        "time_steady_all_s": walls,
        "time_core_steady_s": statistics.median(cores),
        "time_per_iteration_s": statistics.median(cores) / max(iterations, 1),
        "tries": tries,
    }


def run_admm_and_auto(
    problem: Any,
    lam: float,
    evaluator: GapEvaluator,
    repeats: int,
    log: Callable[[str], None],
    fista: dict[str, Any],
) -> dict[str, Any]:
    """ADMM on the same problem, and what ``solver="auto"`` picks (timed as that solver).

    ADMM runs where its dense N × N kernel applies (padded N ≤ ``DENSE_MAX_ROWS``) or where
    ``auto`` would choose it; beyond, its matrix-free CG form is slower than R-FISTA by the
    cost model of :func:`cvxdist.solvers.choose_solver` and is recorded as not run.
    """
    from cvxdist.solvers import choose_solver, costs
    from cvxdist.solvers.admm import DENSE_MAX_ROWS

    rows = problem.X.shape[0] * problem.X.shape[1]
    choice = choose_solver(problem)
    if rows <= DENSE_MAX_ROWS or choice == "admm":
        admm = run_cvxdist(problem, lam, evaluator, repeats, log, solver="admm")
    else:
        admm = {
            "solver": "admm",
            "not_run": f"N = {rows} > {DENSE_MAX_ROWS}: matrix-free ADMM, slower than R-FISTA "
            "by the cost model of choose_solver",
        }
    chosen = admm if choice == "admm" else fista
    times = [r["time_steady_s"] for r in (fista, admm) if r.get("reached_target")]
    return {
        "admm": admm,
        "auto": {
            "chooses": choice,
            "time_steady_s": chosen["time_steady_s"],
            "cost_model": costs.explain(problem),
        },
        "admm_over_fista_steady": (
            fista["time_steady_s"] / admm["time_steady_s"] if "time_steady_s" in admm else None
        ),
        "best_time_steady_s": min(times) if times else None,
    }


def profile_iterations(
    problem: Any, lam: float, tol: float, max_iters: int = MAX_ITERS, **solver_options: Any
) -> dict[str, Any]:
    """Run the same R-FISTA iteration by iteration (jitted step, host loop) to time single
    iterations and count line-search backtracks and restarts (``solver_options`` such as
    ``growth`` and ``shrink`` go to the solver)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from cvxdist.solvers import make_solver

    solver = make_solver("fista", REG, **solver_options)
    dtype = problem.dtype
    lam_arr = jnp.asarray(lam, dtype)
    init = eqx.filter_jit(solver.init)
    step = eqx.filter_jit(solver.step)
    state = jax.block_until_ready(init(problem, problem.zeros(), lam_arr))
    jax.block_until_ready(step(problem, lam_arr, state))  # compile
    times, backtracks = [], []
    while int(state.iteration) < max_iters:
        before = int(state.backtracks)
        start = time.perf_counter()
        state = jax.block_until_ready(step(problem, lam_arr, state))
        times.append(time.perf_counter() - start)
        backtracks.append(int(state.backtracks) - before)
        if float(state.evaluation.rel_gap) <= tol or bool(state.linesearch_failed):
            break
        if not math.isfinite(float(state.evaluation.primal)):
            break
    plain = [t for t, b in zip(times, backtracks) if b == 0]
    iterations = int(state.iteration)
    return {
        "iterations": iterations,
        "backtracks": int(state.backtracks),
        "restarts": int(state.restarts),
        "iterations_with_backtracks": sum(b > 0 for b in backtracks),
        "final_step": float(state.step),
        "step_time_median_s": statistics.median(times),
        "step_time_mean_s": statistics.fmean(times),
        "step_time_no_backtrack_median_s": statistics.median(plain) if plain else None,
        "gemms_per_iteration": 2.0 + int(state.backtracks) / max(iterations, 1),
    }


def time_iteration_vs_gemms(
    inst: Instance, problem: Any, lam: float, rounds: int
) -> dict[str, Any]:
    """One R-FISTA iteration against the two GEMMs it needs, timed *interleaved*.

    The iteration is a jitted ``Fista.step`` from a fixed state whose step needs no
    backtracking (so it performs exactly one forward and one adjoint product); the GEMMs are
    jitted float32 products of the same contraction order as the operators (``X @ W`` and
    ``Xᵀ @ Z``, or ``M @ W`` and ``Mᵀ @ Z`` gate first). Each round
    times the step, then both GEMMs, so that contention from other processes hits them alike;
    the ratio is the median of the per-round ratios.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from cvxdist.solvers import make_solver

    solver = make_solver("fista", REG)
    lam_arr = jnp.asarray(lam, problem.dtype)
    step = eqx.filter_jit(solver.step)
    state = jax.block_until_ready(eqx.filter_jit(solver.init)(problem, problem.zeros(), lam_arr))
    for _ in range(50):  # a few iterations in, at a state whose next step is not rejected
        following = jax.block_until_ready(step(problem, lam_arr, state))
        if int(state.iteration) >= 5 and int(following.backtracks) == int(state.backtracks):
            break
        state = following

    from cvxdist.operators import gate_first

    N, d = inst.X.shape
    P, c = inst.G.shape[1], inst.Y.shape[1]
    rng = np.random.default_rng(0)
    if gate_first(d, P, c):  # the products the operators perform in that order
        X = jnp.asarray(inst.X @ inst.G >= 0, jnp.float32)
        inner, outer = P, d * c
    else:
        X = jnp.asarray(inst.X, jnp.float32)
        inner, outer = d, P * c
    W = jnp.asarray(rng.standard_normal((inner, outer)), jnp.float32)
    Z = jnp.asarray(rng.standard_normal((N, outer)), jnp.float32)
    forward = jax.jit(lambda X, W: X @ W)
    adjoint = jax.jit(lambda X, Z: X.T @ Z)

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    calls = (
        lambda: step(problem, lam_arr, state),
        lambda: forward(X, W),
        lambda: adjoint(X, Z),
    )
    for call in calls:  # warm up
        timed(call)
    steps, fwds, adjs, ratios = [], [], [], []
    for _ in range(rounds):
        t_step, t_fwd, t_adj = (timed(call) for call in calls)
        steps.append(t_step)
        fwds.append(t_fwd)
        adjs.append(t_adj)
        ratios.append(t_step / (t_fwd + t_adj))
    flops = 2.0 * N * d * P * c
    gemm = statistics.median([f + a for f, a in zip(fwds, adjs)])
    return {
        "rounds": rounds,
        "forward_s": statistics.median(fwds),
        "adjoint_s": statistics.median(adjs),
        "gemm_s": gemm,
        "gflops_per_s": 2 * flops / gemm / 1e9,
        "flops_per_gemm": flops,
        "iteration_s": statistics.median(steps),
        "iteration_over_gemm": statistics.median(ratios),
        "ratios": ratios,
    }


# --------------------------------------------------------------------------------------------
# pyscnn


class _Stop(Exception):
    """Raised from pyscnn's callback to end its loop."""


def scnn_available() -> tuple[bool, str]:
    try:
        import scnn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return False, f"pyscnn is not importable ({err}); install it with `make setup-bench`"
    return True, ""


def run_pyscnn(
    inst: Instance,
    lam: float,
    evaluator: GapEvaluator,
    *,
    target: float = TARGET_GAP,
    dtype: str = "float32",
    backend: str = "numpy",
    eval_every: int = 1,
    max_iters: int = MAX_ITERS,
    time_limit_s: float = math.inf,
    seed: int = 778,
) -> dict[str, Any]:
    """pyscnn's R-FISTA on the same problem, stopped at the first iterate with gap ≤ target.

    pyscnn runs with ``tol = 0`` (its own rule never stops it). A callback copies each iterate
    and, every ``eval_every`` iterations, evaluates the float64 gap; once it is ≤ ``target`` the
    iterates since the previous evaluation are checked in order to find the first one. The
    callback's time is excluded from the timings, as is the recording of pyscnn's own criterion
    (the squared norm of the min-norm subgradient) each iteration.

    Returns timings and iterations at the target, the weights there (``U``, our layout),
    pyscnn's criterion there (the tolerance it would have needed), and where its default
    tolerance would have stopped it.
    """
    import lab
    from scnn.metrics import Metrics
    from scnn.models import ConvexGatedReLU
    from scnn.private.interface import (
        build_internal_model,
        build_metrics_tuple,
        build_optimizer,
        get_logger,
        process_data,
        set_device,
    )
    from scnn.regularizers import NeuronGL1
    from scnn.solvers import RFISTA

    c = inst.Y.shape[1]
    lam_scnn = lam / c
    set_device("cpu", dtype, seed)
    if backend == "torch":
        lab.set_backend("torch")
        lab.set_device("cpu")
        lab.set_dtype(dtype)
    elif backend != "numpy":
        raise ValueError(f"unknown pyscnn backend {backend!r}")

    start_setup = time.perf_counter()
    (X_t, y_t), _, _ = process_data(inst.X, inst.Y, None, None, unitize_data=False)
    model = ConvexGatedReLU(inst.G, c=c)
    regularizer = NeuronGL1(lam_scnn)
    internal = build_internal_model(model, regularizer, X_t)
    setup_s = time.perf_counter() - start_setup
    D = lab.to_np(internal.D)
    if D.shape != inst.masks.shape or not np.array_equal(D > 0, inst.masks):
        raise RuntimeError("pyscnn computed different activation patterns than the benchmark")
    if not np.allclose(lab.to_np(internal.U), inst.G, rtol=0, atol=1e-6):
        raise RuntimeError("pyscnn reordered or dropped gates")

    metrics = Metrics(objective=False, grad_norm=False, time=False)  # no extra metric work
    procedure = build_optimizer(RFISTA(model, max_iters=max_iters, tol=0.0), regularizer, metrics)
    logger = get_logger("scnn", False, False, None)
    logger.setLevel("ERROR")

    def ours(W: np.ndarray) -> np.ndarray:  # (c, P, d) -> (P, d, c)
        return np.transpose(W, (1, 2, 0))

    def gap_of(W: np.ndarray) -> float:
        return evaluator(ours(W), lam)["rel_gap"]

    iterate = {"k": 0}
    overhead = {"s": 0.0}
    times: dict[int, float] = {0: 0.0}
    gaps: dict[int, float] = {}
    criterion: dict[int, float] = {}
    ring: deque[tuple[int, np.ndarray]] = deque(maxlen=max(1, eval_every))
    zero = np.zeros((c, *inst.G.shape[::-1]))
    found: dict[str, int | None] = {"target": None, "default_tol": None}

    def snapshot(m: Any) -> np.ndarray:
        return np.array(lab.to_np(m.weights), copy=True)

    def callback(m: Any, X: Any, y: Any) -> Any:
        entered = time.perf_counter()
        k = iterate["k"] = iterate["k"] + 1
        times[k] = entered - start - overhead["s"]
        ring.append((k, snapshot(m)))
        if k % eval_every == 0:
            gaps[k] = gap_of(ring[-1][1])
            if gaps[k] <= target:
                for kk, W in ring:
                    if kk not in gaps:
                        gaps[kk] = gap_of(W)
                    if gaps[kk] <= target:
                        found["target"] = kk
                        break
                raise _Stop
        if times[k] > time_limit_s:
            raise _Stop
        overhead["s"] += time.perf_counter() - entered
        return m

    original = procedure.term_criterion

    def criterion_hook(m: Any, X: Any, y: Any, objective: Any = None, grad: Any = None) -> bool:
        done = original(m, X, y, objective, grad)
        entered = time.perf_counter()
        k = iterate["k"]
        criterion[k] = float(lab.sum(grad**2)) if grad is not None else math.nan
        if found["default_tol"] is None and criterion[k] <= SCNN_DEFAULT_TOL:
            found["default_tol"] = k
            if k not in gaps:
                gaps[k] = gap_of(ring[-1][1] if ring else zero)
        overhead["s"] += time.perf_counter() - entered
        return done

    procedure.term_criterion = criterion_hook
    start = time.perf_counter()
    try:
        procedure(
            logger,
            internal,
            lambda m: m,
            (X_t, y_t),
            (X_t, y_t),
            build_metrics_tuple(metrics),
            callback=callback,
        )
    except _Stop:
        pass
    k_star = found["target"]
    result: dict[str, Any] = {
        "backend": backend,
        "dtype": dtype,
        "lam_scnn": lam_scnn,
        "setup_s": setup_s,
        "reached_target": k_star is not None,
        "iterations_run": iterate["k"],
        "time_run_s": times[iterate["k"]],
        "gap_trace": [[k, times[k], gaps[k]] for k in sorted(gaps)],
    }
    if k_star is not None:
        W_star = next(W for kk, W in ring if kk == k_star)
        evaluation = evaluator(ours(W_star), lam)
        W_t = lab.tensor(W_star, dtype=lab.get_dtype())
        scnn_objective = float(internal.objective(X_t, y_t, w=W_t))
        scnn_criterion = float(lab.sum(internal.grad(X_t, y_t, w=W_t) ** 2))
        result.update(
            {
                "iterations": k_star,
                "time_s": times[k_star],
                "time_per_iteration_s": times[k_star] / k_star,
                "rel_gap": evaluation["rel_gap"],
                "objective": evaluation["objective"],
                "objective_scnn_convention": scnn_objective,
                # F_ours = c F_scnn: a check of the λ/scaling conversion on every run.
                "scaling_check_rel_err": abs(c * scnn_objective - evaluation["objective"])
                / evaluation["objective"],
                "criterion_at_target": scnn_criterion,
                "active_groups": int(np.count_nonzero(np.linalg.norm(W_star, axis=-1))),
                "U": ours(W_star),  # (P, d, c); dropped from the JSON
            }
        )
    k_default = found["default_tol"]
    result["default_tol_stop"] = {
        "tol": SCNN_DEFAULT_TOL,
        "iteration": k_default,
        "time_s": times.get(k_default) if k_default is not None else None,
        "rel_gap": gaps.get(k_default) if k_default is not None else None,
    }
    return result


def scnn_threads() -> dict[str, Any]:
    """Make torch and OpenBLAS use all usable cores (as XLA does) and report the counts."""
    import torch

    cores = usable_cores()
    torch.set_num_threads(cores)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(cores)
    except ImportError:
        pass
    return {
        "xla_cpu_threads": cores,
        "torch_num_threads": torch.get_num_threads(),
        "blas": blas_threads(),
    }


# --------------------------------------------------------------------------------------------
# Driver


def run_problem(
    spec: ProblemSpec,
    *,
    scnn_backend: str,
    time_limit_s: float,
    repeats: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    log(f"[{spec.name}] N={spec.N} d={spec.d} c={spec.c} P={spec.P}  load {load_average()}")
    inst = make_instance(spec)
    evaluator = GapEvaluator(inst)
    lam = spec.lam_frac * evaluator.lam_max
    problem, flips = float32_problem(inst)
    record: dict[str, Any] = {
        "name": spec.name,
        "N": spec.N,
        "d": spec.d,
        "c": spec.c,
        "P": int(inst.G.shape[1]),
        "P_sampled": spec.P,
        "gates_dropped": inst.gates_dropped,
        "seed": spec.seed,
        "lam_frac": spec.lam_frac,
        "lam_max": evaluator.lam_max,
        "lam": lam,
        "float32_mask_flips_fixed": flips,
        "load_average_before": load_average(),
    }
    ours = run_cvxdist(problem, lam, evaluator, repeats or spec.repeats, log)
    log(f"  pyscnn ({scnn_backend}) ...")
    scnn = run_pyscnn(
        inst,
        lam,
        evaluator,
        backend=scnn_backend,
        eval_every=spec.eval_every,
        time_limit_s=time_limit_s,
    )
    scnn.pop("U", None)
    if scnn["reached_target"]:
        log(
            f"  pyscnn: {scnn['time_s']:.3f}s, {scnn['iterations']} iters, "
            f"gap {scnn['rel_gap']:.3g}"
        )
    else:
        log(f"  pyscnn: no iterate reached gap {TARGET_GAP} in {scnn['time_run_s']:.1f}s")
    profile = profile_iterations(problem, lam, ours["tol"], spec.profile_iters or MAX_ITERS)
    gemm = time_iteration_vs_gemms(inst, problem, lam, spec.gemm_repeats)
    log(
        f"  interleaved: iteration {gemm['iteration_s'] * 1e3:.2f} ms, GEMMs "
        f"{gemm['gemm_s'] * 1e3:.2f} ms, ratio {gemm['iteration_over_gemm']:.2f}; solve "
        f"{ours['time_per_iteration_s'] * 1e3:.2f} ms/iteration; backtracks "
        f"{profile['backtracks']} in {profile['iterations']} iterations"
    )
    record.update({"cvxdist": ours, "pyscnn": scnn, "profile": profile, "gemm": gemm})
    record.update(run_admm_and_auto(problem, lam, evaluator, repeats or spec.repeats, log, ours))
    record["variants"] = run_variants(
        run_cvxdist, problem, lam, evaluator, repeats or spec.repeats, log, REG
    )
    if scnn_time := scnn.get("time_s"):
        if record["admm"].get("time_steady_s"):
            record["admm_speedup_steady"] = scnn_time / record["admm"]["time_steady_s"]
        record["auto_speedup_steady"] = scnn_time / record["auto"]["time_steady_s"]
        if record["best_time_steady_s"]:
            record["best_speedup_steady"] = scnn_time / record["best_time_steady_s"]
    record["load_average_after"] = load_average()
    scnn_time = scnn.get("time_s")
    record["speedup_steady"] = scnn_time / ours["time_steady_s"] if scnn_time else None
    record["speedup_with_compile"] = scnn_time / ours["time_with_compile_s"] if scnn_time else None
    if not scnn_time:  # pyscnn never reached the gap: its run time gives lower bounds
        record["speedup_steady_at_least"] = scnn["time_run_s"] / ours["time_steady_s"]
        record["speedup_with_compile_at_least"] = scnn["time_run_s"] / ours["time_with_compile_s"]
    # Target metric: one iteration (no backtrack) / its two GEMMs, timed interleaved.
    record["iteration_over_gemm"] = gemm["iteration_over_gemm"]
    # Context: the solve's average iteration (backtracks included, different time window).
    record["solve_iteration_over_gemm"] = ours["time_per_iteration_s"] / gemm["gemm_s"]
    record["solvers"] = summarize_variants(record)
    return record


def summarize(problems: Sequence[dict[str, Any]]) -> dict[str, Any]:
    speedups = [p["speedup_steady"] for p in problems]
    ratios = [p["iteration_over_gemm"] for p in problems]
    both = all(p["cvxdist"]["reached_target"] and p["pyscnn"]["reached_target"] for p in problems)
    best = [p.get("best_speedup_steady") for p in problems]
    return {
        "both_reached_target": both,
        "min_speedup_steady": min((s for s in speedups if s is not None), default=None),
        "min_best_speedup_steady": min((s for s in best if s is not None), default=None),
        "target_best_speedup": 20.0,
        "meets_best_speedup_target": both and all(s is not None and s >= 20.0 for s in best),
        "max_iteration_over_gemm": max(ratios),
        "target_speedup": 3.0,
        "target_iteration_over_gemm": 1.3,
        "meets_speedup_target": both and all(s is not None and s >= 3.0 for s in speedups),
        "meets_iteration_target": all(r <= 1.3 for r in ratios),
    }


def markdown_report(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    s = payload["settings"]
    header = [
        "problem",
        "pyscnn iters",
        "pyscnn s",
        "ours iters",
        "ours s (1st call)",
        "ours s (steady)",
        "speedup steady",
        "speedup 1st call",
        "gap pyscnn / ours",
        "iter ms",
        "GEMMs ms",
        "iter / GEMMs",
        "solve ms / iter",
        "backtracks / iters profiled",
    ]
    rows = []
    for p in payload["problems"]:
        o, sc, pr, g = p["cvxdist"], p["pyscnn"], p["profile"], p["gemm"]
        if sc["reached_target"]:
            scnn_time, steady, cold = sc["time_s"], p["speedup_steady"], p["speedup_with_compile"]
            scnn_time, steady, cold = fmt(scnn_time), fmt(steady), fmt(cold)
        else:  # lower bounds from the time it ran without reaching the gap
            scnn_time = f"> {fmt(sc['time_run_s'])}"
            steady = f"> {fmt(p['speedup_steady_at_least'])}"
            cold = f"> {fmt(p['speedup_with_compile_at_least'])}"
        rows.append(
            [
                f"N={p['N']} d={p['d']} c={p['c']} P={p['P']}",
                fmt(sc.get("iterations")),
                scnn_time,
                fmt(o["iterations"]),
                fmt(o["time_with_compile_s"]),
                fmt(o["time_steady_s"]),
                steady,
                cold,
                f"{fmt(sc.get('rel_gap'))} / {fmt(o['rel_gap'])}",
                fmt(g["iteration_s"] * 1e3),
                fmt(g["gemm_s"] * 1e3),
                fmt(p["iteration_over_gemm"]),
                fmt(o["time_per_iteration_s"] * 1e3),
                f"{pr['backtracks']} / {pr['iterations']}",
            ]
        )
    defaults = markdown_table(
        ["problem", "stops at iter", "its gap", "criterion needed for gap 1e-3"],
        [
            [
                p["name"],
                fmt(p["pyscnn"]["default_tol_stop"]["iteration"]),
                fmt(p["pyscnn"]["default_tol_stop"]["rel_gap"]),
                fmt(p["pyscnn"].get("criterion_at_target")),
            ]
            for p in payload["problems"]
        ],
    )
    admm_rows = []
    for p in payload["problems"]:
        a, o = p["admm"], p["cvxdist"]
        ran = "time_steady_s" in a
        admm_rows.append(
            [
                f"N={p['N']} d={p['d']} c={p['c']} P={p['P']}",
                fmt(o["iterations"]),
                fmt(o["time_steady_s"]),
                fmt(a.get("iterations")) if ran else "not run",
                fmt(a.get("time_with_compile_s")) if ran else "-",
                fmt(a.get("time_steady_s")) if ran else "-",
                fmt(a.get("rel_gap")) if ran else "-",
                fmt(p.get("admm_over_fista_steady")),
                f"{p['auto']['chooses']}: {fmt(p.get('auto_speedup_steady'))}",
                fmt(p.get("best_speedup_steady")),
            ]
        )
    admm_table = markdown_table(
        [
            "problem",
            "R-FISTA iters",
            "R-FISTA s (steady)",
            "ADMM iters",
            "ADMM s (1st call)",
            "ADMM s (steady)",
            "ADMM gap",
            "ADMM speedup over R-FISTA",
            "auto picks: speedup vs pyscnn",
            "best speedup vs pyscnn",
        ],
        admm_rows,
    )
    not_run = sorted({p["admm"]["not_run"] for p in payload["problems"] if "not_run" in p["admm"]})
    summary = payload["summary"]
    threads = payload["threads"]
    lines = [
        f"# R-FISTA (cvxdist) vs pyscnn R-FISTA, time to relative duality gap {s['target_gap']:g}",
        "",
        f"{'Quick run (CI shapes).' if payload['quick'] else 'Full run.'} "
        f"Measured {m['date_utc']} on {m['cpu_model']} ({m['usable_cores']} usable cores, "
        f"{m['memory_gib']} GiB), jax {m['versions'].get('jax')}, "
        f"pyscnn {m['versions'].get('pyscnn')} (backend {s['scnn_backend']}), "
        f"torch {m['versions'].get('torch')}; threads: XLA {threads['xla_cpu_threads']}, "
        f"torch {threads['torch_num_threads']}, BLAS "
        f"{[b['num_threads'] for b in threads['blas']]}. Load average (1/5/15 min) "
        f"{m['load_average_at_start']} at start, {payload['load_average_at_end']} at end "
        "(other processes share these cores; treat ratios as indicative).",
        "",
        f"Problem: `{s['reg']}` (pyscnn NeuronGL1, λ_scnn = λ/c), λ = {s['lam_frac']} λ_max "
        "(unless the problem says otherwise), "
        "float32 solves, gaps computed by the benchmark in float64 from the returned weights. "
        f"Data: {s['data']}",
        "",
        markdown_table(header, rows),
        "",
        "pyscnn time: its R-FISTA (tol = 0) stopped by an oracle at the first iterate with "
        "gap ≤ target (gap-evaluation time excluded). Ours: `solve(..., tol="
        f"{s['our_tol']:g})`, stopped by its own certificate; first call includes compilation, "
        "steady = median of later calls. iter = one jitted R-FISTA step that needs no "
        "backtracking, GEMMs = the two products that step performs (`X @ W` and `Xᵀ @ Z`, or "
        "`M @ W` and `Mᵀ @ Z` in the gate-first order), timed interleaved (median of per-round "
        "ratios); solve ms / iter = steady solve time / iterations (backtracks included: each "
        "costs one more forward product).",
        "",
        f"pyscnn at its default tolerance ({SCNN_DEFAULT_TOL:g} on the squared min-norm "
        "subgradient):",
        "",
        defaults,
        "",
        "## ADMM and `auto` on the same problems",
        "",
        admm_table,
        "",
        *(f"ADMM not run: {why}." for why in not_run),
        "",
        f"Targets: speedup ≥ {summary['target_speedup']:g}× on every problem: "
        f"{fmt(summary['meets_speedup_target'])} (min {fmt(summary['min_speedup_steady'])}×); "
        f"iteration ≤ {summary['target_iteration_over_gemm']:g}× GEMMs: "
        f"{fmt(summary['meets_iteration_target'])} "
        f"(max {fmt(summary['max_iteration_over_gemm'])}×); best solver ≥ "
        f"{summary['target_best_speedup']:g}× faster than pyscnn on every problem: "
        f"{fmt(summary['meets_best_speedup_target'])} "
        f"(min {fmt(summary['min_best_speedup_steady'])}×).",
        "",
        variants_table(payload, fmt, markdown_table),
    ]
    return "\n".join(lines)


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


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    only: Sequence[str] | None = None,
    repeats: int | None = None,
    scnn_backend: str = "numpy",
    time_limit_s: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; writes ``solvers.json`` and ``solvers.md`` under ``out_dir``."""
    ok, why = scnn_available()
    if not ok:
        raise RuntimeError(why)
    if log is None:

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

    specs = select_problems(quick, only)
    if time_limit_s is None:
        time_limit_s = 120.0 if quick else 5400.0
    threads = scnn_threads()
    machine = machine_description(("pyscnn", "torch", "opt_einsum", "linalg_backends"))
    out_dir = Path(out_dir)
    problems = []
    for spec in specs:
        # A finished problem is kept (resume after an interruption) while the spec, the
        # settings and the commit are the same; anything else is measured again.
        key = {"spec": asdict(spec), "commit": machine["git_commit"], "backend": scnn_backend}
        key["modified"] = machine["package_modified_since_commit"]
        saved = out_dir / "records" / f"{spec.name}.json"
        if saved.is_file() and not key["modified"]:
            previous = json.loads(saved.read_text())
            if previous.get("key") == key:
                log(f"[{spec.name}] reusing {saved}")
                problems.append(previous["record"])
                continue
        record = run_problem(
            spec, scnn_backend=scnn_backend, time_limit_s=time_limit_s, repeats=repeats, log=log
        )
        write_json(saved, {"key": key, "record": record})
        problems.append(record)
    payload = {
        "benchmark": "solvers",
        "quick": quick,
        "settings": {
            "target_gap": TARGET_GAP,
            "our_tol": OUR_TOLS[0],
            "lam_frac": LAM_FRAC,
            "reg": REG,
            "dtype": "float32",
            "gap_dtype": "float64",
            "scnn_backend": scnn_backend,
            "scnn_time_limit_s": time_limit_s,
            "data": (
                "X Gaussian with unit-norm columns; Y = relu(X W1) W2 + noise "
                f"({TEACHER_WIDTH} hidden units, noise {TEACHER_NOISE} of the std, each column "
                "scaled to unit std); G Gaussian (d, P), seeded; all values float32-representable"
            ),
            "specs": [asdict(s) for s in specs],
        },
        "machine": machine,
        "threads": threads,
        "problems": problems,
        "summary": {**summarize(problems), "variants": variants_summary(problems)},
        "load_average_at_end": load_average(),
    }
    write_json(out_dir / "solvers.json", payload)
    (out_dir / "solvers.md").write_text(markdown_report(payload), encoding="utf-8")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    payload = run(args.out, quick=args.quick)
    print(markdown_report(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
