"""The `cvxdist solve` contract (DESIGN §7). Bad input: the table in ``test_cli.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture
def problem_file(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 6))
    Y = rng.standard_normal((120, 2))
    G = rng.standard_normal((6, 20))
    path = tmp_path / "problem.npz"
    np.savez(path, X=X, Y=Y, G=G)
    return path, (X, Y, G)


@pytest.mark.parametrize("reg", ["coupled", "one_vs_all", "nuclear"])
def test_solve_writes_solution_and_json(tmp_path, cli, problem_file, reg):
    path, (X, Y, G) = problem_file
    out = tmp_path / "sol.npz"
    run = cli("solve", path, "--lam-frac", 0.1, "--reg", reg, "--out", out)
    assert run.code == 0
    record = json.loads(run.out)
    for key in ("objective", "iterations", "converged", "certificate", "time_s", "lam", "lam_max"):
        assert key in record
    assert record["converged"] and record["certificate"] <= 1e-3
    assert record["lam"] == pytest.approx(0.1 * record["lam_max"], rel=1e-6)
    U = np.load(out)["U"]
    assert U.shape == (20, 6, 2)
    # The reported objective is the 1/(2N) objective of the written weights.
    masks = (X @ G >= 0).astype(float)
    pred = np.einsum("np,npc->nc", masks, np.einsum("nd,pdc->npc", X, U))
    penalty = {
        "coupled": np.linalg.norm(U, axis=(1, 2)).sum(),
        "one_vs_all": np.linalg.norm(U, axis=1).sum(),
        "nuclear": np.linalg.svd(U, compute_uv=False).sum(),
    }[reg]
    objective = 0.5 * np.sum((pred - Y) ** 2) / len(X) + record["lam"] * penalty
    assert record["objective"] == pytest.approx(objective, rel=1e-4)


def test_absolute_lambda_and_float64(tmp_path, cli, problem_file):
    path, _ = problem_file
    out = tmp_path / "sol.npz"
    run = cli("solve", path, "--lam", 0.01, "--dtype", "float64", "--tol", 1e-8, "--out", out)
    record = json.loads(run.out)
    assert run.code == 0 and record["lam"] == 0.01 and record["certificate"] <= 1e-8
    assert np.load(out)["U"].dtype == np.float64


def test_lam_above_lam_max_returns_zero_model_with_warning(tmp_path, cli, problem_file):
    path, _ = problem_file
    out = tmp_path / "sol.npz"
    with pytest.warns(UserWarning, match="every gate is pruned"):
        run = cli("solve", path, "--lam-frac", 1.5, "--out", out)
    assert run.code == 0 and json.loads(run.out)["active_gates"] == 0
    assert not np.load(out)["U"].any()
