"""bf16 GEMMs with float32 accumulation; the reported gap is always a float32 one."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist import operators
from cvxdist.cli import main
from cvxdist.problems import certify, lam_max, make_problem, with_precision
from cvxdist.prox import Coupled
from cvxdist.solvers import solve, solve_batch
from cvxdist.solvers.phases import exact_gemms


def arrays(N=400, d=12, c=2, P=48, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, d))
    Y = np.maximum(X @ rng.standard_normal((d, c)), 0) + 0.3 * rng.standard_normal((N, c))
    return X, Y, rng.standard_normal((d, P))


@pytest.fixture(scope="module")
def problems():
    X, Y, G = arrays()
    return make_problem(X, Y, G), make_problem(X, Y, G, precision="bf16")


def test_bf16_gemms_round_operands_and_accumulate_in_float32(problems):
    full, low = problems
    U = jnp.asarray(np.random.default_rng(1).standard_normal(full.weight_shape), jnp.float32)
    exact, rounded = operators.forward(full, U), operators.forward(low, U)
    assert rounded.dtype == jnp.float32
    error = float(jnp.linalg.norm(rounded - exact) / jnp.linalg.norm(exact))
    assert 1e-5 < error < 2e-2  # bf16 operands (8-bit mantissa), not float32, not garbage
    jaxpr = str(jax.make_jaxpr(lambda U: operators.forward(low, U))(U))
    assert "bf16" in jaxpr and "preferred_element_type=float32" in jaxpr
    # Masks, hence the problem itself, do not depend on the GEMM precision.
    masks = operators.chunk_masks(low, low.X[0], None)
    np.testing.assert_array_equal(masks, operators.chunk_masks(full, full.X[0], None))
    # lam_max is computed with full-precision GEMMs whatever the solve precision.
    assert float(lam_max(low, Coupled())) == float(lam_max(full, Coupled()))


def test_bf16_solve_reports_a_true_float32_gap(problems):
    full, low = problems
    reference = solve(full, lam_frac=0.1, tol=1e-4)
    solution = solve(low, lam_frac=0.1, tol=1e-4)
    assert reference.converged and solution.converged, solution.message
    assert float(solution.stats.lam) == float(reference.stats.lam)
    # The certificate, recomputed independently with float32 GEMMs, is the reported one.
    recomputed = certify(full, Coupled(), solution.stats.lam, solution.U).evaluation
    assert float(recomputed.rel_gap) <= 1e-4
    np.testing.assert_allclose(solution.stats.rel_gap, recomputed.rel_gap, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(solution.stats.objective, recomputed.primal, rtol=1e-6)
    np.testing.assert_allclose(solution.stats.objective, reference.stats.objective, rtol=2e-4)


def test_bf16_batch_reports_float32_gaps(problems):
    full, low = problems
    lmax = float(lam_max(full, Coupled()))
    lams = [0.5 * lmax, 0.1 * lmax]
    batch = solve_batch(low, lams, tol=1e-4)
    for lane, lam in enumerate(lams):
        recomputed = certify(full, Coupled(), jnp.float32(lam), batch.weights.U[lane]).evaluation
        assert float(recomputed.rel_gap) <= 1e-4
        np.testing.assert_allclose(batch.stats.rel_gap[lane], recomputed.rel_gap, atol=1e-6)


def test_precision_is_validated_and_switchable():
    X, Y, G = arrays(N=20, P=4)
    with pytest.raises(ValueError, match="precision"):
        make_problem(X, Y, G, precision="fp8")
    problem = make_problem(X, Y, G, precision="bf16")
    highest = with_precision(problem, "highest")
    assert highest.precision == "highest" and highest.X is problem.X
    assert with_precision(problem, "bf16") is problem
    # Which solves get their certificate recomputed: bf16 always, default only off CPU.
    assert not exact_gemms(problem) and exact_gemms(highest)
    assert exact_gemms(with_precision(problem, "default")) == (jax.default_backend() == "cpu")


def test_cli_precision_flag(tmp_path, capsys):
    X, Y, G = arrays(N=150, P=16)
    path = tmp_path / "problem.npz"
    np.savez(path, X=X, Y=Y, G=G)
    out = tmp_path / "sol.npz"
    code = main(["solve", str(path), "--lam-frac", "0.1", "--precision", "bf16", "--out", str(out)])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["precision"] == "bf16" and record["converged"]
    assert record["certificate"] <= 1e-3
