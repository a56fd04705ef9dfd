"""Rows sharded over 8 (fake CPU) devices solve exactly like one device.

``--xla_force_host_platform_device_count`` must be set before JAX starts, so the multi-device
checks run in a fresh interpreter and report back as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cvxdist.sharding import ROW_AXIS, row_mesh

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile, os, io, contextlib
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from cvxdist.cli import main
    from cvxdist.problems import make_problem
    from cvxdist.solvers import SOLVERS, solve
    from cvxdist.solvers.api import make_solver
    from cvxdist.solvers.common import solve_compiled

    rng = np.random.default_rng(0)
    N, d, c, P = 150, 6, 2, 12
    X = rng.standard_normal((N, d))
    Y = np.maximum(X @ rng.standard_normal((d, c)), 0) + 0.1 * rng.standard_normal((N, c))
    G = rng.standard_normal((d, P))
    out = {"devices": len(jax.devices()), "runs": []}
    for solver in sorted(SOLVERS):
        for options in (dict(), dict(skip=True, bias=True, stream=True, store_masks=False)):
            # The same chunks (n = 40 is a multiple of 8) with and without sharding.
            one = make_problem(X, Y, G, chunk_rows=40, dtype="float64", **options)
            many = make_problem(X, Y, G, chunk_rows=40, dtype="float64", devices=8, **options)
            a = solve(one, lam_frac=0.1, solver=solver, tol=1e-8, max_iters=20000)
            b = solve(many, lam_frac=0.1, solver=solver, tol=1e-8, max_iters=20000)
            out["runs"].append({
                "solver": solver, "options": sorted(options),
                "x_spec": list(many.X.sharding.spec),
                "u_replicated": b.U.sharding.is_fully_replicated,
                "num_devices": len(many.X.sharding.device_set),
                "padded_rows": int(many.X.shape[0] * many.X.shape[1]),
                "converged": [bool(a.converged), bool(b.converged)],
                "iterations": [int(a.stats.iterations), int(b.stats.iterations)],
                "objective": [float(a.stats.objective), float(b.stats.objective)],
                "gap": [float(a.stats.rel_gap), float(b.stats.rel_gap)],
                "max_abs_U": float(np.max(np.abs(np.asarray(a.U) - np.asarray(b.U)))),
                "scale_U": float(np.max(np.abs(np.asarray(a.U)))),
            })
    # Screening composes with sharded, streamed rows (restricted problems keep the layout).
    one = make_problem(X, Y, G, chunk_rows=40, dtype="float64")
    many = make_problem(X, Y, G, chunk_rows=40, dtype="float64", devices=8, stream=True)
    a = solve(one, lam_frac=0.3, tol=1e-8, screen=True)
    b = solve(many, lam_frac=0.3, tol=1e-8, screen=True)
    out["screen"] = {
        "objective": [float(a.stats.objective), float(b.stats.objective)],
        "screened": [int(a.stats.screened), int(b.stats.screened)],
        "converged": [bool(a.converged), bool(b.converged)],
    }
    # The compiled FISTA program: row reductions are all-reduces, X is never gathered.
    many = make_problem(X, Y, G, chunk_rows=40, devices=8, skip=True, bias=True)
    fista = make_solver("fista", "coupled", many)
    lowered = solve_compiled.lower(
        fista, many, jnp.float32(0.1), many.zeros(), jnp.float32(1e-3), 100
    )
    hlo = lowered.lowered.compile().as_text()
    out["collectives"] = {op: hlo.count(op + "(") for op in
                          ("all-reduce", "all-gather", "all-to-all", "collective-permute")}
    # The CLI uses every visible device by default.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.npz")
        np.savez(path, X=X, Y=Y, G=G)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(["solve", path, "--lam-frac", "0.1", "--out", os.path.join(tmp, "s.npz")])
        record = json.loads(buffer.getvalue().strip().splitlines()[-1])
        out["cli"] = {"code": code, "devices": len(record["devices"]),
                      "converged": record["converged"]}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_sharded_solve_equals_single_device(eight_devices):
    assert eight_devices["devices"] == 8
    assert eight_devices["runs"]
    for run in eight_devices["runs"]:
        assert run["x_spec"] == [None, ROW_AXIS, None], run
        assert run["num_devices"] == 8 and run["u_replicated"], run
        assert run["padded_rows"] == 160, run  # 150 rows padded to 4 chunks of 40
        assert all(run["converged"]) and max(run["gap"]) <= 1e-8, run
        a, b = run["objective"]
        assert abs(a - b) <= 1e-12 * abs(a), run
        assert run["max_abs_U"] <= 1e-6 * run["scale_U"], run
        # Only the summation order of the all-reduces differs: same path, same count.
        first, second = run["iterations"]
        assert abs(first - second) <= 1, run


def test_screening_on_sharded_streamed_rows(eight_devices):
    screen = eight_devices["screen"]
    assert all(screen["converged"])
    assert screen["screened"][0] == screen["screened"][1] > 0
    a, b = screen["objective"]
    assert abs(a - b) <= 1e-10 * abs(a)


def test_sharded_program_all_reduces_and_never_gathers(eight_devices):
    collectives = eight_devices["collectives"]
    assert collectives["all-reduce"] > 0
    assert collectives["all-gather"] == 0
    assert collectives["all-to-all"] == 0


def test_cli_uses_every_visible_device(eight_devices):
    assert eight_devices["cli"] == {"code": 0, "devices": 8, "converged": True}


def test_row_mesh_arguments():
    mesh = row_mesh()
    assert mesh.axis_names == (ROW_AXIS,) and mesh.size >= 1
    assert row_mesh(mesh) is mesh
    assert row_mesh(1).size == 1
    with pytest.raises(ValueError, match="between 1 and"):
        row_mesh(0)
    with pytest.raises(ValueError, match="empty"):
        row_mesh([])


def test_single_device_mesh_equals_unsharded():
    rng = np.random.default_rng(3)
    X, Y, G = (
        rng.standard_normal((30, 4)),
        rng.standard_normal((30, 2)),
        rng.standard_normal((4, 5)),
    )
    from cvxdist.problems import make_problem
    from cvxdist.solvers import solve

    a = solve(make_problem(X, Y, G), lam_frac=0.2)
    b = solve(make_problem(X, Y, G, devices=1), lam_frac=0.2)
    np.testing.assert_allclose(b.U, a.U, rtol=1e-6, atol=1e-7)
