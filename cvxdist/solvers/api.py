"""Public solve API: one solve, a vmapped batch, and a warm-started λ path.

Every entry point compiles one function per (solver, problem shapes, max_iters) and takes λ
and tol as traced arrays: sweeping λ never recompiles.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from cvxdist.duality import Problem, lam_max_and_alignment
from cvxdist.operators import rounding_guard
from cvxdist.problems import GatedReluProblem
from cvxdist.prox import Regularizer, get_regularizer
from cvxdist.solvers.admm import Admm
from cvxdist.solvers.common import (
    IterativeSolver,
    Solution,
    count_trace,
    iterate,
    single_threaded_blas,
    solve_compiled,
)
from cvxdist.solvers.costs import Rates, choose, choose_linear_solver
from cvxdist.solvers.fista import Fista
from cvxdist.solvers.phases import exact_gemms, solve_phased
from cvxdist.solvers.polish import Run, solve_to_tol

SOLVERS: dict[str, type[IterativeSolver]] = {"fista": Fista}


def register_solver(name: str, cls: type[IterativeSolver]) -> None:
    """Make ``cls`` available as ``solver=name``."""
    SOLVERS[name] = cls


def make_solver(
    solver: str | IterativeSolver = "fista",
    reg: str | Regularizer = "coupled",
    problem: Problem | None = None,
    **options: Any,
) -> IterativeSolver:
    """A solver instance from names. ``solver="auto"`` picks by problem shape."""
    if isinstance(solver, IterativeSolver):
        return solver
    regularizer = get_regularizer(reg)
    if solver == "auto":
        solver = choose_solver(problem)
    try:
        cls = SOLVERS[solver]
    except KeyError:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}") from None
    return cls(reg=regularizer, **options)


def choose_solver(
    problem: Problem | None, *, path_length: int = 1, rates: Rates | None = None
) -> str:
    """The solver ``auto`` uses for a problem (or a path of ``path_length`` λ): the faster of
    R-FISTA and ADMM by the measured cost model of :mod:`cvxdist.solvers.costs` (composed
    data terms and more than ``DENSE_MAX_ROWS`` rows: R-FISTA). ``costs.explain`` gives the
    predicted times behind the choice."""
    return choose(problem, path_length=path_length, rates=rates)


@eqx.filter_jit
def _solve_batch_core(
    solver: IterativeSolver,
    problem: Problem,
    lams: Array,
    U0: Array,
    tol: Array,
    max_iters: int,
    problem_axis: int | None,
) -> Solution:
    count_trace()
    u0_axis = 0 if U0.ndim == 4 else None
    run = eqx.filter_vmap(
        lambda p, lam, u0: iterate(solver, p, lam, u0, tol, max_iters),
        in_axes=(problem_axis, 0, u0_axis),
    )
    return run(problem, lams, U0)


def _check_lam(lam: Any, name: str = "lam") -> np.ndarray:
    values = np.asarray(lam, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite, got {lam}")
    if np.any(values < 0):
        raise ValueError(f"{name} must be non-negative, got {lam}")
    return values


def resolve_lam(
    problem: Problem,
    reg: str | Regularizer,
    lam: float | None,
    lam_frac: float | None,
) -> tuple[float, float]:
    """(λ, λ_max) from an absolute λ or a fraction of λ_max; warns when λ ≥ λ_max."""
    if (lam is None) == (lam_frac is None):
        raise ValueError("give exactly one of lam and lam_frac")
    regularizer = get_regularizer(reg)
    lmax, alignment = map(float, lam_max_and_alignment(problem, regularizer))
    if lam is None:
        lam = float(_check_lam(lam_frac, "lam_frac")) * lmax
    lam = float(_check_lam(lam))
    adjusted = _unless_degenerate(problem, lam, lmax, alignment)
    if adjusted != lam:
        return adjusted, lmax
    if lam >= lmax:
        warnings.warn(
            f"lam = {lam:.4g} >= lam_max = {lmax:.4g}: every gate is pruned and the model is "
            "zero (plus the linear skip/bias, if any); choose lam_frac < 1",
            stacklevel=3,
        )
    return lam, lmax


def _unless_degenerate(problem: Problem, lam: float, lmax: float, alignment: float) -> float:
    """``lam``, or ``λ_max`` (so ``U = 0``, certified) with a warning when the gates' features
    correlate with the projected targets only at rounding level (`gate_alignment`)."""
    if lam >= lmax:
        return lam
    guard = rounding_guard(problem.dtype)
    if alignment < guard:
        warnings.warn(
            f"the gates correlate with what the skip/bias leave of the targets only at rounding "
            f"level ({alignment:.2g} < {guard:.2g}): their features lie in the span of the "
            "skip/bias, so U = 0 (solved at lam = lam_max); use fewer skip dimensions or other "
            "gates",
            stacklevel=4,
        )
        return lmax
    return lam


def _initial_weights(problem: Problem, init: Any) -> Array:
    if init is None:
        return problem.zeros()
    U0 = init.weights.U if isinstance(init, Solution) else init
    U0 = jnp.asarray(U0, problem.dtype)
    if U0.shape[-3:] != problem.weight_shape:
        raise ValueError(f"init must have shape {problem.weight_shape}, got {U0.shape}")
    return U0


def _run(screen: bool, **phase_options: Any) -> Run:
    """One solve in the problem's dtype: phased (:mod:`cvxdist.solvers.phases`: screening,
    working sets (``phase_options``: ``working_set``, ``strong_from``), or GEMMs that are not
    float32-exact) or one compiled loop; ``lam`` and ``tol`` become traced."""

    def run(
        solver: IterativeSolver,
        problem: Problem,
        lam: Array | float,
        U0: Array,
        tol: float,
        max_iters: int,
    ) -> Solution:
        lam = jnp.asarray(lam, problem.dtype)
        if screen or phase_options.get("working_set") or not exact_gemms(problem):
            return solve_phased(
                solver,
                problem,
                lam,
                U0,
                float(tol),
                int(max_iters),
                screen_gates=screen,
                **phase_options,
            )
        tol = jnp.asarray(tol, problem.dtype)
        return solve_compiled(solver, problem, lam, U0, tol, int(max_iters))

    return run


def _timed(fn: Any, *args: Any) -> Solution:
    start = time.perf_counter()
    with single_threaded_blas():
        solution = jax.block_until_ready(fn(*args))
    elapsed = time.perf_counter() - start
    like = solution.stats.time_s
    with jax.enable_x64(like.dtype == jnp.float64):  # a polished solution is float64
        return eqx.tree_at(lambda s: s.stats.time_s, solution, jnp.full_like(like, elapsed))


def _add_time(solution: Solution, seconds: float) -> Solution:
    """``solution`` with ``seconds`` added to its wall time (in its own dtype)."""
    like = solution.stats.time_s
    with jax.enable_x64(like.dtype == jnp.float64):
        return eqx.tree_at(
            lambda s: s.stats.time_s, solution, like + jnp.asarray(seconds, like.dtype)
        )


def solve(
    problem: Problem,
    lam: float | None = None,
    *,
    lam_frac: float | None = None,
    reg: str | Regularizer = "coupled",
    solver: str | IterativeSolver = "fista",
    tol: float = 1e-3,
    max_iters: int = 10_000,
    init: Array | Solution | None = None,
    screen: bool = False,
    working_set: bool = False,
    strong_from: float | None = None,
    polish: bool = True,
    **solver_options: Any,
) -> Solution:
    """Solve one gated-ReLU problem to a relative duality gap ≤ ``tol``.

    Args:
        problem: from :func:`cvxdist.problems.make_problem`.
        lam: regularization strength (≥ 0), or ``lam_frac``: a fraction of λ_max.
        reg: ``coupled``, ``one_vs_all``, ``nuclear``, ``group_elastic`` or a Regularizer.
        solver: ``fista`` (R-FISTA), ``admm``, ``auto`` or a solver instance.
        tol: target relative duality gap (static loop bound is ``max_iters``).
        init: warm start: weights ``(P, d, c)`` or a previous Solution.
        screen: remove gates proven zero by gap-safe screening during the solve
            (:mod:`cvxdist.solvers.phases`); ``stats.screened`` counts them.
        working_set: solve in phases on working sets of gates ranked by their KKT violation,
            grown until the gap on all gates is ≤ ``tol`` (:mod:`cvxdist.solvers.phases`).
        strong_from: the λ that ``init`` solves (the previous λ of a path): working sets whose
            first one is the sequential strong set (as :func:`solve_path` with ``strong``).
        polish: when ``tol`` is below what float32 can certify (128 eps, 1.5e-5), solve in
            float32 to that floor, then continue in float64 (:mod:`cvxdist.solvers.polish`);
            ``False`` stops at the floor with ``RESULTS.precision_floor``.

    Returns:
        A :class:`Solution`; ``solution.stats.time_s`` is the wall time including compilation
        when this is the first call for these shapes. With ``screen``, or GEMMs that are not
        float32-exact (``"bf16"``; ``"default"`` on GPU/TPU), the solve runs in phases
        (:mod:`cvxdist.solvers.phases`) and the certificate is recomputed with full-precision GEMMs.
        A polished solution has float64 weights and statistics.
    """
    lam, _ = resolve_lam(problem, reg, lam, lam_frac)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    solver_obj = make_solver(solver, reg, problem, **solver_options)
    U0 = _initial_weights(problem, init)
    return _timed(
        solve_to_tol,
        _run(screen, working_set=working_set or strong_from is not None, strong_from=strong_from),
        solver_obj,
        problem,
        lam,
        U0,
        tol,
        int(max_iters),
        polish,
    )


def solve_batch(
    problem: Problem,
    lams: Sequence[float] | Array,
    *,
    reg: str | Regularizer = "coupled",
    solver: str | IterativeSolver = "fista",
    tol: float = 1e-3,
    max_iters: int = 10_000,
    init: Array | None = None,
    batched_problem: bool = False,
    **solver_options: Any,
) -> Solution:
    """One compiled solve vmapped over a λ grid (and, optionally, over stacked problems).

    Args:
        lams: ``(L,)`` absolute λ values.
        batched_problem: ``problem`` holds ``L`` problems stacked on a leading axis
            (see :func:`stack_problems`); lane ``l`` solves problem ``l`` at ``lams[l]``.

    Returns:
        A Solution whose leaves have a leading ``L`` axis. ``stats.iterations[l]`` is the
        number of iterations lane ``l`` needed (the loop runs until the slowest lane stops;
        finished lanes are frozen).
    """
    lams_np = _check_lam(lams, "lams")
    if lams_np.ndim != 1 or lams_np.size == 0:
        raise ValueError(f"lams must be a non-empty 1-D sequence, got shape {lams_np.shape}")
    solver_obj = make_solver(solver, reg, problem, **solver_options)
    dtype = problem.dtype
    shape = _unbatched_weight_shape(problem)
    U0 = jnp.zeros(shape, dtype) if init is None else jnp.asarray(init, dtype)
    if U0.shape[-3:] != shape:
        raise ValueError(f"init must have shape {shape} or (L, *{shape}), got {U0.shape}")
    args = (jnp.asarray(lams_np, dtype), U0, jnp.asarray(tol, dtype), int(max_iters))
    axis = 0 if batched_problem else None
    if not exact_gemms(problem):
        return _timed(_bf16_then_highest, solver_obj, problem, *args, axis)
    return _timed(_solve_batch_core, solver_obj, problem, *args, axis)


def _bf16_then_highest(
    solver: IterativeSolver,
    problem: Problem,
    lams: Array,
    U0: Array,
    tol: Array,
    max_iters: int,
    axis: int | None,
) -> Solution:
    """A low-precision batch (bf16, or TF32 behind XLA's default on GPUs), then the same batch
    with full-precision GEMMs warm-started from it.

    Lanes whose float32 gap already meets ``tol`` stop at iteration 0 of the second run; its
    certificate (float32 GEMMs) is the one reported. Iterations add up.
    """
    low = _solve_batch_core(solver, problem, lams, U0, tol, max_iters, axis)
    high = _solve_batch_core(
        solver, problem.with_precision("highest"), lams, low.weights.U, tol, max_iters, axis
    )
    total = low.stats.iterations + high.stats.iterations
    return eqx.tree_at(lambda s: s.stats.iterations, high, total)


def _unbatched_weight_shape(problem: Problem) -> tuple[int, int, int]:
    return (problem.G.shape[-1], problem.X.shape[-1], problem.Y.shape[-1])


def stack_problems(problems: Sequence[GatedReluProblem]) -> GatedReluProblem:
    """Stack same-shaped problems on a leading axis for :func:`solve_batch`."""
    if not problems:
        raise ValueError("stack_problems needs at least one problem")
    first = problems[0]
    for other in problems[1:]:
        if jax.tree.structure(other) != jax.tree.structure(first):
            raise ValueError("problems must share shapes, chunking, skip/bias and mask storage")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *problems)


def lam_grid(lmax: float, num: int = 10, min_frac: float = 1e-2) -> np.ndarray:
    """``num`` λ values log-spaced from ``lmax`` down to ``min_frac · lmax``."""
    return lmax * np.geomspace(1.0, min_frac, num)


def path_solver(
    problem: Problem,
    solver: str | IterativeSolver,
    reg: str | Regularizer,
    path_length: int,
    *,
    screen: bool = False,
    **solver_options: Any,
) -> tuple[IterativeSolver, float]:
    """The solver of a λ path of ``path_length`` values on ``problem``: ``auto`` chosen for
    the whole path (:mod:`cvxdist.solvers.costs`) and, for ADMM, the kernel factored once for
    every λ and ρ when that is predicted faster (``eigh``; not with ``screen``, whose
    restricted problems have other kernels).

    Returns:
        The solver (pass it to :func:`solve` for each λ) and the seconds its factorization
        took (0 without one).

    Raises:
        ValueError: ADMM on a problem it does not solve (composed data terms).
    """
    if isinstance(solver, str) and solver == "auto":
        solver = choose_solver(problem, path_length=path_length)
    solver_obj = make_solver(solver, reg, problem, **solver_options)
    start = time.perf_counter()
    if isinstance(solver_obj, Admm) and not screen:
        if solver_obj.linear_solver == "auto":
            linear = choose_linear_solver(problem, path_length)
            solver_obj = eqx.tree_at(lambda s: s.linear_solver, solver_obj, linear)
        solver_obj = jax.block_until_ready(solver_obj.factorized(problem))
    return solver_obj, time.perf_counter() - start


def solve_path(
    problem: Problem,
    lams: Sequence[float] | None = None,
    *,
    lam_fracs: Sequence[float] | None = None,
    reg: str | Regularizer = "coupled",
    solver: str | IterativeSolver = "fista",
    tol: float = 1e-3,
    max_iters: int = 10_000,
    progress: bool = True,
    screen: bool = False,
    strong: bool = True,
    polish: bool = True,
    **solver_options: Any,
) -> list[Solution]:
    """Warm-started regularization path, largest λ first (one compilation for all λ).

    Give ``lams`` (absolute) or ``lam_fracs`` (fractions of λ_max); they are sorted
    descending. Returns one Solution per λ, in that order. ``screen`` and ``polish`` apply
    to each solve (see :func:`solve`).

    ``strong`` (R-FISTA): each λ is solved in working-set phases whose first set is glmnet's
    sequential strong set (gates with ``‖∇f_i‖° ≥ 2λ − λ_prev`` at the previous solution, and
    its support), verified by the duality gap on all gates (:mod:`cvxdist.solvers.phases`).
    ADMM paths run at full width (its kernel depends on the gates) and factor the kernel once
    for every λ and ρ (``eigh``) when the cost model of :mod:`cvxdist.solvers.costs` predicts
    that faster than one Cholesky factorization per λ; its time counts in the first solve.
    """
    if (lams is None) == (lam_fracs is None):
        raise ValueError("give exactly one of lams and lam_fracs")
    regularizer = get_regularizer(reg)
    lmax, alignment = map(float, lam_max_and_alignment(problem, regularizer))
    values = _check_lam(lams if lams is not None else lam_fracs, "lams")
    if lams is None:
        values = values * lmax
    values = np.sort(values.ravel())[::-1]
    if _unless_degenerate(problem, float(values[-1]), lmax, alignment) >= lmax:
        values = np.maximum(values, lmax)
    solver_obj, setup_s = path_solver(
        problem, solver, regularizer, len(values), screen=screen, **solver_options
    )
    strong = strong and not isinstance(solver_obj, Admm)
    dtype = problem.dtype
    U = problem.zeros()
    solutions = []
    from tqdm.auto import tqdm

    previous = lmax
    with tqdm(values, desc="λ path", disable=not progress, leave=False) as bar:
        for lam in bar:
            options = {"working_set": True, "strong_from": previous} if strong else {}
            solution = _timed(
                solve_to_tol,
                _run(screen, **options),
                solver_obj,
                problem,
                lam,
                U,
                tol,
                int(max_iters),
                polish,
            )
            if not solutions and setup_s > 0:
                solution = _add_time(solution, setup_s)
            U = solution.weights.U.astype(dtype)  # a polished solution is float64
            previous = float(lam)
            bar.set_postfix(lam=f"{lam:.3g}", iters=int(solution.stats.iterations))
            solutions.append(solution)
    return solutions
