"""A `jax.distributed` solve over two processes on this machine equals the one-process solve.

Two `cvxdist solve --coordinator` processes (two CPU devices each, gloo collectives, a
localhost coordinator), each reading only its own rows, against the same problem solved in
this process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from cvxdist.cli import main
from cvxdist.multihost import process_rows

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(args: list[str], num_processes: int) -> list[tuple[int, str, str]]:
    """Run ``cvxdist solve ARGS`` as ``num_processes`` processes of one cluster; every process
    is killed if one fails or the time runs out."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")
    cluster = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(num_processes)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "cvxdist.cli", "solve", *args, *cluster, "--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, killed as a whole
        )
        for i in range(num_processes)
    ]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=TIMEOUT_S)
            results.append((process.returncode, out, err))
            if process.returncode != 0:
                break
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return results


def test_two_processes_solve_like_one(tmp_path, capsys):
    rng = np.random.default_rng(0)
    N, d, c, P = 201, 6, 2, 12
    X = rng.standard_normal((N, d))
    Y = np.maximum(X @ rng.standard_normal((d, c)), 0) + 0.3 * rng.standard_normal((N, c)) + 1
    G = rng.standard_normal((d, P))
    np.savez(tmp_path / "all.npz", X=X, Y=Y, G=G)
    split = 150  # uneven: the processes pad to the same chunk layout
    np.savez(tmp_path / "rows-0.npz", X=X[:split], Y=Y[:split], G=G)
    np.savez(tmp_path / "rows-1.npz", X=X[split:], Y=Y[split:], G=G)
    options = ["--lam-frac", "0.1", "--skip", "--bias", "--dtype", "float64", "--tol", "1e-9"]

    assert (
        main(["solve", str(tmp_path / "all.npz"), *options, "--out", str(tmp_path / "one.npz")])
        == 0
    )
    one = json.loads(capsys.readouterr().out)
    results = launch(
        [str(tmp_path / "rows-{process}.npz"), *options, "--out", str(tmp_path / "two.npz")], 2
    )
    assert [code for code, *_ in results] == [0, 0], [err[-2000:] for *_, err in results]
    two = json.loads(results[0][1])
    assert results[1][1] == ""  # process 0 alone reports and writes

    assert two["processes"] == 2 and len(two["devices"]) == 4 and one["processes"] == 1
    assert two["shape"] == one["shape"] and two["converged"] and one["converged"]
    assert two["lam"] == pytest.approx(one["lam"], rel=1e-13)
    assert two["objective"] == pytest.approx(one["objective"], rel=1e-12)
    assert two["certificate"] == pytest.approx(one["certificate"], rel=1e-4, abs=1e-13)
    assert two["iterations"] == one["iterations"]
    first, second = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for key in ("U", "V", "b"):
        np.testing.assert_allclose(second[key], first[key], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("num_rows,num_processes", [(201, 2), (7, 3), (5, 5)])
def test_process_rows_partition_the_rows(num_rows, num_processes):
    blocks = [process_rows(num_rows, i, num_processes) for i in range(num_processes)]
    covered = np.concatenate([np.arange(num_rows)[block] for block in blocks])
    np.testing.assert_array_equal(covered, np.arange(num_rows))
    sizes = [block.stop - block.start for block in blocks]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num-processes", "2"], "need --coordinator"),
        (["--coordinator", "127.0.0.1:1"], "needs --num-processes and --process-id"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "0..1"),
        (["--coordinator", "auto", "--devices", "2"], "cannot be combined with --devices"),
    ],
)
def test_bad_cluster_options_fail_before_joining(tmp_path, capsys, args, message):
    path = tmp_path / "problem.npz"
    np.savez(path, X=np.ones((4, 2)), Y=np.ones((4, 1)), G=np.ones((2, 3)))
    code = main(["solve", str(path), "--lam-frac", "0.1", "--out", str(tmp_path / "s.npz"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()
