r"""Certificates below float32's reach: finish a float32 solve in float64.

A relative duality gap is a difference of two sums of size ``F`` divided by ``F``, so its
rounding error is a few ``eps · F``. Measured on float32 solves (N = 200 and 20,000 rows,
λ = 0.1 and 0.01 λ_max): the float32 gap of an iterate and its float64 recomputation differ
by 1e-7 to 3e-7, so a float32 gap below about 1e-6 is rounding noise (a float32 solve to
``tol = 1e-6`` reported 9.7e-7 for a true 1.2e-6). :func:`certifiable_gap` puts the floor at
128 eps (1.5e-5 in float32), where that error is at most 2 % of ``tol``.

With ``tol`` below that floor, :func:`solve_to_tol` runs the solve in the problem's dtype to
the floor, then continues it in float64 from that point (the problem's arrays upcast, λ the
float32 λ upcast, x64 enabled only for that call) to ``tol``: float64 iterations from a
nearly converged start are few, and the gap is certified in float64. The result carries
float64 weights and statistics; the float64 copy of the rows takes twice their memory, where
they live (device, or host memory for streamed rows). Without polishing (``polish=False``) the
solve stops at the floor with :attr:`RESULTS.precision_floor`.

The float64 problem has the same stored masks; masks recomputed per chunk are recomputed in
float64 (a row whose gate product is within rounding of zero may flip: the float64 problem is
the exact-arithmetic one). The skip/bias Gram pseudo-inverse is recomputed in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from cvxdist.duality import Problem
from cvxdist.solvers.common import RESULTS, IterativeSolver, Solution

#: Relative duality gaps below this many ``eps`` of the dtype are not certified in it.
CERTIFIABLE_EPS = 128

#: ``run(solver, problem, lam, U0, tol, max_iters) -> Solution``: one solve of the API.
Run = Callable[[IterativeSolver, Problem, Array, Array, float, int], Solution]


def certifiable_gap(dtype: Any) -> float:
    """Smallest relative duality gap the arithmetic of ``dtype`` certifies (128 eps)."""
    return CERTIFIABLE_EPS * float(jnp.finfo(dtype).eps)


def needs_float64(problem: Problem, tol: float) -> bool:
    """Whether ``tol`` is below what the problem's dtype can certify (never for float64)."""
    return problem.dtype != jnp.float64 and tol < certifiable_gap(problem.dtype)


def upcast(tree: Any) -> Any:
    """Every floating array leaf of ``tree`` as float64, placement kept (call under x64).

    Arrays in host memory (streamed rows) are converted shard by shard on the host, so they
    never enter device memory whole.
    """

    def leaf(value: Any) -> Any:
        if not (isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating)):
            return value
        if getattr(value.sharding, "memory_kind", None) != "pinned_host":
            return value.astype(jnp.float64)
        shards = [
            jax.device_put(np.asarray(shard.data, np.float64), shard.data.sharding)
            for shard in value.addressable_shards
        ]
        return jax.make_array_from_single_device_arrays(value.shape, value.sharding, shards)

    return jax.tree.map(leaf, tree)


def to_float64(problem: Problem) -> Problem:
    """The same problem in float64 with full-precision GEMMs and its skip/bias projection
    recomputed in float64 (call under x64)."""
    return upcast(problem).with_precision("highest").with_exact_projection()


def solve_to_tol(
    run: Run,
    solver: IterativeSolver,
    problem: Problem,
    lam: float,
    U0: Array,
    tol: float,
    max_iters: int,
    polish: bool = True,
) -> Solution:
    """``run`` to ``tol``, in float64 past the floor of the problem's dtype (module docstring).

    Args:
        run: the solve (phased or not) in the problem's dtype; ``lam`` and ``tol`` are
            passed as Python floats, ``max_iters`` as an int.
        polish: continue in float64 below the floor; if ``False`` stop there with
            :attr:`RESULTS.precision_floor`.

    Returns:
        The Solution; float64 (weights, statistics, certificate) when it was polished, with
        ``stats.iterations`` and ``stats.iteration_equivalents`` counting both stages.
    """
    if not needs_float64(problem, tol):
        return run(solver, problem, lam, U0, tol, max_iters)
    first = run(solver, problem, lam, U0, certifiable_gap(problem.dtype), max_iters)
    budget = max_iters - int(first.stats.iterations)
    polishable = polish and budget > 0
    if first.result == RESULTS.successful and not polishable:
        return eqx.tree_at(lambda s: s.result, first, RESULTS.precision_floor)
    if first.result not in (RESULTS.successful, RESULTS.linesearch_failed) or not polishable:
        return first
    with jax.enable_x64(True):
        lam64 = first.stats.lam.astype(jnp.float64)  # the same λ, not a re-rounded one
        solver64 = upcast(solver.unprepared())  # a precomputed factor is float32's
        wide = run(solver64, to_float64(problem), lam64, upcast(first.U), tol, budget)
        stats = wide.stats
        both = stats._replace(  # the work of both stages; the last working set of either
            iterations=first.stats.iterations + stats.iterations,
            iteration_equivalents=stats.iteration_equivalents
            + jnp.asarray(first.stats.iteration_equivalents, jnp.float64),
            working_set=jnp.where(
                stats.working_set > 0, stats.working_set, first.stats.working_set
            ),
        )
        return eqx.tree_at(lambda s: s.stats, wide, both)
