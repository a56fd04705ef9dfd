r"""A measured cost model: which solver (and which ADMM factorization) a problem should get.

The model predicts the wall time of a solve from the problem's shapes and three rates measured
once per process on the device at hand (:func:`measured_rates`: a GEMM, a Cholesky and a
symmetric eigendecomposition of a ``n × n`` matrix). With ``t_g = 2 N d P c / gemm_rate``, the
time of one GEMM of an iteration:

- R-FISTA: ``I_f · (2 + b) · t_g`` (a forward and an adjoint GEMM per iteration, ``b`` line-search
  backtracks per iteration, each one more forward GEMM);
- ADMM: ``setup + I_a · ((2 + 1/k) t_g + t_solve)``, the setup being the kernel
  ``(XXᵀ) ⊙ (MMᵀ)`` (``2 N² (d + P)`` flops) and its factorization: one Cholesky per ρ (one
  per λ of a path: ρ follows λ) or one eigendecomposition for every λ and ρ; ``t_solve`` the
  two triangular solves (``2 N² c`` flops each) or the two eigenvector GEMMs; ``k`` is
  ``certify_every``.

``I_f`` and ``I_a = ADMM_ITERATION_RATIO · I_f`` are iteration counts calibrated on the CPU
benchmark problems (``cvxdist bench solvers``: 131-186 R-FISTA iterations, ADMM 0.24-0.56 of
that, at a relative gap of 1e-3); they cancel in the comparison except against the setup.
ADMM needs the dense kernel (padded ``N ≤ DENSE_MAX_ROWS``) and plain gated rows; composed
data terms always get R-FISTA. :func:`explain` returns the prediction, the rates and the
choice, which the benchmark records.

Measured rates vary with the machine's load, so two runs can choose differently near a tie.
``CVXDIST_SOLVER_RATES`` pins them: ``reference`` (:func:`reference_rates`) or three numbers
``gemm,cholesky,eigh`` as in :class:`Rates`; the tests pin them, so their runs compare.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cvxdist.solvers.common import single_threaded_blas
from cvxdist.solvers.kernel import DENSE_MAX_ROWS

#: R-FISTA iterations to a relative gap of 1e-3 (calibration; see the module docstring).
FISTA_ITERATIONS = 150.0
#: Line-search backtracks per R-FISTA iteration (measured: 0.13-0.31).
BACKTRACKS = 0.3
#: ADMM iterations per R-FISTA iteration on the same problem (measured: 0.24-0.56).
ADMM_ITERATION_RATIO = 0.4
#: Warm-started path solves after the first need this fraction of a cold solve's iterations.
PATH_WARM_FRACTION = 0.5
#: Size of the matrices timed by :func:`measured_rates` (smaller ones time overheads).
PROBE_SIZE = 1024
#: Environment variable that pins the rates instead of measuring them (module docstring).
RATES_ENV = "CVXDIST_SOLVER_RATES"


class Rates(NamedTuple):
    """Measured speeds: GEMM flop/s, and the time constants of ``n³`` factorizations."""

    gemm: float  # flop/s of a float GEMM
    cholesky: float  # seconds per n³ of a Cholesky factorization
    eigh: float  # seconds per n³ of a symmetric eigendecomposition


def _best_time(fn: Any, *args: Any, repeats: int = 2) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


@functools.cache
def measured_rates(platform: str | None = None, dtype: str = "float32") -> Rates:
    """GEMM, Cholesky and eigh speeds on the default device, measured once per process
    (``PROBE_SIZE``-sized matrices, best of two; about a second on a CPU)."""
    del platform  # the cache key: the default backend's name
    n = PROBE_SIZE
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    spd = a @ a.T / n + jnp.eye(n, dtype=a.dtype)
    with single_threaded_blas():  # as the solves run
        gemm = _best_time(jax.jit(lambda x: x @ x), a)
        cholesky = _best_time(jax.jit(jnp.linalg.cholesky), spd)
        eigh = _best_time(jax.jit(jnp.linalg.eigh), spd)
    return Rates(2.0 * n**3 / gemm, cholesky / n**3, eigh / n**3)


def pinned_rates(value: str) -> Rates:
    """The rates a ``CVXDIST_SOLVER_RATES`` value names: ``reference`` or ``gemm,cholesky,eigh``."""
    if value.strip() == "reference":
        return reference_rates()
    try:
        numbers = [float(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 3 or not all(0.0 < x < float("inf") for x in numbers):
        raise ValueError(
            f"{RATES_ENV}={value!r}: expected 'reference' or three positive numbers "
            "'gemm,cholesky,eigh' (flop/s, and seconds per n^3 of each factorization)"
        )
    return Rates(*numbers)


def default_rates(dtype: Any = jnp.float32) -> Rates:
    """The rates pinned by ``CVXDIST_SOLVER_RATES``, else :func:`measured_rates` for the
    default backend and ``dtype``."""
    pinned = os.environ.get(RATES_ENV)
    if pinned:
        return pinned_rates(pinned)
    return measured_rates(jax.default_backend(), jnp.dtype(dtype).name)


def _shapes(problem: Any) -> tuple[int, int, int, int] | None:
    """``(padded N, d, P, c)`` of a plain gated-row problem, or ``None`` (composed terms)."""
    if problem is None or not hasattr(problem, "X"):
        return None
    rows = problem.X.shape[-3] * problem.X.shape[-2]
    return rows, problem.X.shape[-1], problem.G.shape[-1], problem.Y.shape[-1]


def predict(
    problem: Any, rates: Rates, *, path_length: int = 1, certify_every: int = 1
) -> dict[str, float]:
    """Predicted seconds of a solve (or of a path of ``path_length`` λ) per solver:
    ``fista``, ``admm_cholesky`` and ``admm_eigh`` (absent where ADMM does not apply)."""
    shapes = _shapes(problem)
    if shapes is None:
        return {"fista": float("nan")}
    rows, d, P, c = shapes
    gemm_s = 2.0 * rows * d * P * c / rates.gemm
    solves = 1.0 + PATH_WARM_FRACTION * (path_length - 1)  # cold-solve equivalents
    fista_iterations = FISTA_ITERATIONS * solves
    times = {"fista": fista_iterations * (2.0 + BACKTRACKS) * gemm_s}
    if rows > DENSE_MAX_ROWS:
        return times
    admm_iterations = ADMM_ITERATION_RATIO * fista_iterations
    per_iteration = (2.0 + 1.0 / certify_every) * gemm_s
    kernel = 2.0 * rows**2 * (d + P) / rates.gemm
    triangular = 4.0 * rows**2 * c / rates.gemm * 4.0  # two solves, at ~1/4 of GEMM speed
    eigenvector = 4.0 * rows**2 * c / rates.gemm
    times["admm_cholesky"] = (
        kernel
        + path_length * rates.cholesky * rows**3
        + admm_iterations * (per_iteration + triangular)
    )
    times["admm_eigh"] = (
        kernel + rates.eigh * rows**3 + admm_iterations * (per_iteration + eigenvector)
    )
    return times


def explain(problem: Any, *, path_length: int = 1, rates: Rates | None = None) -> dict[str, Any]:
    """The choice of ``solver="auto"`` with its reasons: predicted seconds per solver, the
    rates they came from, and the pick (``solver`` and ADMM's ``linear_solver``)."""
    if _shapes(problem) is None:
        return {"solver": "fista", "linear_solver": None, "why": "not plain gated rows"}
    rates = rates or default_rates(getattr(problem, "dtype", jnp.float32))
    times = predict(problem, rates, path_length=path_length)
    best = min(times, key=times.get)
    solver, _, linear = best.partition("_")
    return {
        "solver": solver,
        "linear_solver": linear or None,
        "predicted_s": times,
        "rates": rates._asdict(),
        "path_length": path_length,
    }


def choose(problem: Any, *, path_length: int = 1, rates: Rates | None = None) -> str:
    """``"fista"`` or ``"admm"`` for ``problem`` (see :func:`explain`)."""
    return explain(problem, path_length=path_length, rates=rates)["solver"]


def choose_linear_solver(problem: Any, path_length: int, rates: Rates | None = None) -> str:
    """ADMM's factorization for a path of ``path_length`` λ: ``"eigh"`` (one for the whole
    path) or ``"cholesky"`` (one per λ), whichever the model predicts faster."""
    if _shapes(problem) is None:
        return "cholesky"
    rates = rates or default_rates(getattr(problem, "dtype", jnp.float32))
    times = predict(problem, rates, path_length=path_length)
    if "admm_eigh" not in times:
        return "cg"
    return "eigh" if times["admm_eigh"] < times["admm_cholesky"] else "cholesky"


def reference_rates() -> Rates:
    """Rates measured on the project's 2-core CPU machine (for tests and documentation)."""
    return Rates(gemm=50e9, cholesky=6e-11, eigh=3e-10)


__all__ = [
    "Rates",
    "choose",
    "choose_linear_solver",
    "default_rates",
    "explain",
    "measured_rates",
    "pinned_rates",
    "predict",
    "reference_rates",
]
