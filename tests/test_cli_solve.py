"""The `cvxdist solve` contract (DESIGN §7)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cvxdist.cli import main


@pytest.fixture
def problem_file(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 6))
    Y = rng.standard_normal((120, 2))
    G = rng.standard_normal((6, 20))
    path = tmp_path / "problem.npz"
    np.savez(path, X=X, Y=Y, G=G)
    return path, (X, Y, G)


def run_cli(capsys, *args):
    code = main(["solve", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("reg", ["coupled", "one_vs_all", "nuclear"])
def test_solve_writes_solution_and_json(tmp_path, capsys, problem_file, reg):
    path, (X, Y, G) = problem_file
    out = tmp_path / "sol.npz"
    code, stdout, _ = run_cli(capsys, path, "--lam-frac", 0.1, "--reg", reg, "--out", out)
    assert code == 0
    record = json.loads(stdout)
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


def test_absolute_lambda_and_float64(tmp_path, capsys, problem_file):
    path, _ = problem_file
    out = tmp_path / "sol.npz"
    code, stdout, _ = run_cli(
        capsys, path, "--lam", 0.01, "--dtype", "float64", "--tol", 1e-8, "--out", out
    )
    record = json.loads(stdout)
    assert code == 0 and record["lam"] == 0.01 and record["certificate"] <= 1e-8
    assert np.load(out)["U"].dtype == np.float64


def _bad_file(tmp_path, kind):
    rng = np.random.default_rng(1)
    X, Y, G = (
        rng.standard_normal((30, 4)),
        rng.standard_normal((30, 2)),
        rng.standard_normal((4, 5)),
    )
    path = tmp_path / f"{kind}.npz"
    if kind == "missing_key":
        np.savez(path, X=X, Y=Y)
    elif kind == "wrong_shapes":
        np.savez(path, X=X, Y=Y[:10], G=G)
    elif kind == "gate_shape":
        np.savez(path, X=X, Y=Y, G=G[:3])
    elif kind == "nan":
        X[0, 0] = np.nan
        np.savez(path, X=X, Y=Y, G=G)
    elif kind == "inf":
        Y[3, 1] = np.inf
        np.savez(path, X=X, Y=Y, G=G)
    elif kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "not_npz":
        path.write_text("X,Y,G\n1,2,3\n")
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing_key", "missing array(s) G"),
        ("wrong_shapes", "X has 30 rows but Y has 10"),
        ("gate_shape", "G must have shape"),
        ("nan", "X contains 1 NaN or Inf"),
        ("inf", "Y contains 1 NaN or Inf"),
        ("corrupt", "not an .npz archive"),
        ("not_npz", "not an .npz archive"),
    ],
)
def test_bad_input_exits_nonzero_and_writes_nothing(tmp_path, capsys, kind, message):
    path = _bad_file(tmp_path, kind)
    out = tmp_path / "sol.npz"
    before = set(os.listdir(tmp_path))
    code, stdout, stderr = run_cli(capsys, path, "--lam", 0.1, "--out", out)
    assert code != 0
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert stdout == ""
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lam", "-0.5"], "--lam must be a finite number >= 0"),
        (["--lam-frac", "nan"], "--lam-frac must be a finite number >= 0"),
        (["--lam", "0.1", "--tol", "0"], "--tol must be positive"),
        (["--lam", "0.1", "--max-iters", "0"], "--max-iters must be at least 1"),
    ],
)
def test_bad_options(tmp_path, capsys, problem_file, args, message):
    path, _ = problem_file
    out = tmp_path / "sol.npz"
    code, stdout, stderr = run_cli(capsys, path, *args, "--out", out)
    assert code == 2 and message in stderr and not out.exists() and stdout == ""


def test_missing_file_and_unwritable_output(tmp_path, capsys, problem_file):
    path, _ = problem_file
    code, _, stderr = run_cli(capsys, tmp_path / "nope.npz", "--lam", 0.1, "--out", tmp_path / "s")
    assert code == 2 and "no such file" in stderr
    code, _, stderr = run_cli(capsys, path, "--lam", 0.1, "--out", tmp_path / "no" / "dir.npz")
    assert code == 2 and "does not exist" in stderr


def test_lam_above_lam_max_returns_zero_model_with_warning(tmp_path, capsys, problem_file):
    path, _ = problem_file
    out = tmp_path / "sol.npz"
    with pytest.warns(UserWarning, match="every gate is pruned"):
        code, stdout, _ = run_cli(capsys, path, "--lam-frac", 1.5, "--out", out)
    assert code == 0 and json.loads(stdout)["active_gates"] == 0
    assert not np.load(out)["U"].any()
