"""Chunked rows and rows streamed from host memory: same numbers, bounded device memory."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist import operators
from cvxdist.cli import main
from cvxdist.problems import make_problem
from cvxdist.solvers import solve
from cvxdist.solvers.api import make_solver
from cvxdist.solvers.common import solve_compiled


def arrays(N=53, d=5, c=2, P=9, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    Y = np.maximum(X @ rng.standard_normal((d, c)), 0) + 0.1 * rng.standard_normal((N, c))
    return X, Y, rng.standard_normal((d, P))


def test_streamed_problem_keeps_rows_on_the_host():
    X, Y, G = arrays()
    problem = make_problem(X, Y, G, chunk_rows=16, stream=True)
    assert problem.stream and problem.masks is None
    assert problem.X.sharding.memory_kind == "pinned_host"
    assert problem.Y.sharding.memory_kind == "device"
    assert problem.X.shape == (4, 16, 5) and problem.valid.shape == (4, 16)
    np.testing.assert_allclose(np.asarray(problem.rows()[0]), X.astype(np.float32))
    with pytest.raises(ValueError, match="store_masks"):
        make_problem(X, Y, G, stream=True, store_masks=True)


@pytest.mark.parametrize("chunk_rows", [16, 53])
def test_streamed_operators_equal_in_memory(x64, chunk_rows):
    X, Y, G = arrays()
    memory = make_problem(X, Y, G, chunk_rows=chunk_rows, store_masks=True)
    streamed = make_problem(X, Y, G, chunk_rows=chunk_rows, stream=True)
    U = jnp.asarray(np.random.default_rng(1).standard_normal(memory.weight_shape))
    forward = operators.forward(streamed, U)
    np.testing.assert_allclose(forward, operators.forward(memory, U), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(
        operators.adjoint(streamed, forward), operators.adjoint(memory, forward), rtol=1e-12
    )


@pytest.mark.parametrize(("reg", "skip"), [("coupled", False), ("nuclear", True)])
def test_streamed_solve_equals_in_memory_solve(x64, reg, skip):
    X, Y, G = arrays()
    options = dict(skip=skip, bias=skip, chunk_rows=16)
    memory = make_problem(X, Y, G, store_masks=False, **options)
    streamed = make_problem(X, Y, G, stream=True, **options)
    whole = make_problem(X, Y, G, skip=skip, bias=skip)  # one chunk, stored masks
    a = solve(memory, lam_frac=0.1, reg=reg, tol=1e-10, max_iters=20_000)
    b = solve(streamed, lam_frac=0.1, reg=reg, tol=1e-10, max_iters=20_000)
    c = solve(whole, lam_frac=0.1, reg=reg, tol=1e-10, max_iters=20_000)
    assert a.converged and b.converged and c.converged
    # Same chunks, same arithmetic: the streamed solve is the in-memory one.
    assert int(a.stats.iterations) == int(b.stats.iterations)
    np.testing.assert_allclose(b.U, a.U, rtol=0, atol=1e-10)
    np.testing.assert_allclose(b.stats.objective, a.stats.objective, rtol=1e-12)
    if skip:
        np.testing.assert_allclose(b.weights.V, a.weights.V, atol=1e-10)
    # Another chunking reaches the same optimum (within the certified gap).
    np.testing.assert_allclose(b.stats.objective, c.stats.objective, rtol=1e-10)


def _walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for inner in value if isinstance(value, tuple | list) else (value,):
                if hasattr(inner, "jaxpr") and hasattr(inner, "consts"):
                    yield from _walk(inner.jaxpr)
                elif hasattr(inner, "eqns"):
                    yield from _walk(inner)


def test_streamed_solve_moves_one_chunk_at_a_time():
    X, Y, G = arrays(N=64)
    problem = make_problem(X, Y, G, chunk_rows=16, stream=True, skip=True)
    solver = make_solver("fista", "coupled", problem)
    closed = jax.make_jaxpr(lambda p, U: solve_compiled(solver, p, 0.1, U, 1e-3, 50))(
        problem, problem.zeros()
    )
    assert closed.jaxpr.invars[0].aval.memory_space == jax.memory.Space.Host
    transfers = []
    for eqn in _walk(closed.jaxpr):
        for var in eqn.outvars:
            aval = var.aval
            if getattr(aval, "shape", None) == problem.X.shape:
                # The whole X only ever exists in host memory (carried through the loops).
                assert aval.memory_space == jax.memory.Space.Host, eqn
        if eqn.primitive.name == "device_put":
            source, target = eqn.invars[0].aval, eqn.outvars[0].aval
            if source.memory_space == jax.memory.Space.Host:
                assert target.memory_space == jax.memory.Space.Device
                transfers.append(source.shape)
    # Forward, adjoint, skip moments and skip projection each fetch (n, d) chunks.
    assert len(transfers) >= 4
    assert set(transfers) == {(16, 5)}


def test_cli_chunk_rows_and_stream(tmp_path, capsys):
    X, Y, G = arrays(N=90)
    path = tmp_path / "problem.npz"
    np.savez(path, X=X, Y=Y, G=G)
    records = []
    for extra in ([], ["--chunk-rows", "25", "--stream"]):
        out = tmp_path / f"sol{len(records)}.npz"
        code = main(
            ["solve", str(path), "--lam-frac", "0.1", "--tol", "1e-5", "--out", str(out), *extra]
        )
        assert code == 0
        records.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    plain, streamed = records
    assert streamed["stream"] is True and streamed["chunk_rows"] == 25
    assert plain["stream"] is False and plain["chunk_rows"] == 90
    assert streamed["converged"] and streamed["screened"] == 0
    assert streamed["objective"] == pytest.approx(plain["objective"], rel=1e-4)
