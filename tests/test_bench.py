"""`cvxdist bench solvers` and the pyscnn comparison it rests on.

pyscnn is a test dependency here (CI installs it with `make setup-bench`): without it these tests
fail with a message saying so, they do not skip.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist.cli import main
from cvxdist.commands import bench as bench_command


def _require_pyscnn() -> None:
    try:
        import scnn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        pytest.fail(
            f"pyscnn (and torch) must be installed for the benchmark tests: {err}. "
            "Install them with `make setup-bench`."
        )


@pytest.fixture(scope="module")
def bench():
    _require_pyscnn()
    return bench_command.load_benchmark("solvers")


def test_quick_benchmark_writes_results_and_both_tools_reach_the_gap(tmp_path, capsys):
    _require_pyscnn()
    out = tmp_path / "bench"
    assert main(["bench", "solvers", "--quick", "--out", str(out)]) == 0
    assert "| problem |" in capsys.readouterr().out
    payload = json.loads((out / "solvers.json").read_text())
    assert (out / "solvers.md").read_text().startswith("# R-FISTA")

    machine = payload["machine"]
    for key in ("cpu_model", "usable_cores", "date_utc", "load_average_at_start"):
        assert machine[key], key
    for package in ("jax", "pyscnn", "torch"):
        assert machine["versions"][package], package
    assert payload["threads"]["torch_num_threads"] == machine["usable_cores"]
    assert payload["settings"]["target_gap"] == 1e-3

    (problem,) = payload["problems"]
    target = payload["settings"]["target_gap"]
    ours, scnn = problem["cvxdist"], problem["pyscnn"]
    # Both reached the gap, as computed by the benchmark in float64 from the returned weights.
    assert ours["reached_target"] and 0 <= ours["rel_gap"] <= target
    assert scnn["reached_target"] and 0 <= scnn["rel_gap"] <= target
    assert ours["iterations"] > 0 and scnn["iterations"] > 0
    for key in ("time_with_compile_s", "time_steady_s", "time_per_iteration_s"):
        assert ours[key] > 0, key
    assert ours["time_with_compile_s"] >= ours["time_steady_s"]
    assert scnn["time_s"] > 0
    # The λ/scaling conversion holds at pyscnn's iterate: c · F_scnn = F_ours.
    assert scnn["scaling_check_rel_err"] < 1e-5
    assert problem["gemm"]["gemm_s"] > 0 and problem["profile"]["iterations"] > 0
    for key in ("speedup_steady", "speedup_with_compile", "iteration_over_gemm"):
        assert problem[key] > 0, key
    summary = payload["summary"]
    assert summary["both_reached_target"] is True
    assert isinstance(summary["meets_speedup_target"], bool)
    assert isinstance(summary["meets_iteration_target"], bool)
    # ADMM on the same problem, certified by the benchmark's float64 gap; auto is one of them.
    admm = problem["admm"]
    assert admm["solver"] == "admm" and admm["reached_target"]
    assert 0 <= admm["rel_gap"] <= target and admm["iterations"] > 0
    assert problem["auto"]["chooses"] in ("fista", "admm")
    chosen = admm if problem["auto"]["chooses"] == "admm" else ours
    assert problem["auto"]["time_steady_s"] == chosen["time_steady_s"]
    assert problem["best_time_steady_s"] == min(ours["time_steady_s"], admm["time_steady_s"])
    assert problem["best_speedup_steady"] >= problem["speedup_steady"]
    assert isinstance(summary["meets_best_speedup_target"], bool)
    assert "## ADMM and `auto`" in (out / "solvers.md").read_text()
    saved = json.loads((out / "records" / f"{problem['name']}.json").read_text())
    assert saved["record"]["name"] == problem["name"]


def test_finished_problems_are_reused_only_for_the_same_commit(bench, tmp_path, monkeypatch):
    """Resuming an interrupted grid: a saved problem is not measured again at the same clean
    commit, and is measured again after a new commit or with uncommitted package edits."""
    calls = []
    fake = {"name": bench.QUICK_PROBLEMS[0].name, "speedup_steady": 1.0}

    def run_problem(spec, **_):
        calls.append(spec.name)
        return {**fake, "run": len(calls)}

    state = {"git_commit": "abc", "package_modified_since_commit": False}
    harness = bench.harness
    monkeypatch.setattr(harness, "run_problem", run_problem)
    monkeypatch.setattr(harness, "machine_description", lambda *_: dict(state))
    monkeypatch.setattr(harness, "summarize", lambda problems: {})
    monkeypatch.setattr(harness, "markdown_report", lambda payload: "")
    runs = []
    for commit, modified in [("abc", False), ("abc", False), ("def", False), ("def", True)]:
        state.update(git_commit=commit, package_modified_since_commit=modified)
        runs.append(bench.run_benchmark(tmp_path, quick=True)["problems"][0]["run"])
    assert runs == [1, 1, 2, 3] and len(calls) == 3


def test_same_optimum_as_pyscnn_after_the_lambda_conversion(bench, x64):
    """Tiny problem solved tightly by both in float64: the optima agree, which checks that
    λ_scnn = λ / c and F_ours = c · F_scnn (NeuronGL1 is one_vs_all). With a wrong conversion
    pyscnn's iterates would not approach a gap of 1e-7 for our λ at all."""
    from cvxdist import operators
    from cvxdist.problems import make_problem
    from cvxdist.solvers import solve

    spec = bench.ProblemSpec("tiny", N=60, d=5, c=2, P=8, seed=3)
    inst = bench.make_instance(spec)
    evaluator = bench.GapEvaluator(inst)
    lam = 0.1 * evaluator.lam_max
    problem = make_problem(inst.X, inst.Y, inst.G, dtype=jnp.float64)
    ours = solve(problem, lam, reg="one_vs_all", tol=1e-10, max_iters=100_000)
    assert bool(ours.converged), ours.message
    # pyscnn's line search stalls near a relative gap of 1e-8 on this problem, even in float64.
    scnn = bench.run_pyscnn(
        inst, lam, evaluator, target=1e-7, dtype="float64", max_iters=5_000, time_limit_s=60
    )
    assert scnn["reached_target"], "pyscnn never reached gap 1e-7 for our λ: conversion wrong?"

    F_ours = evaluator(ours.U, lam)["objective"]
    assert abs(scnn["objective"] - F_ours) / F_ours < 1e-4
    assert scnn["scaling_check_rel_err"] < 1e-10

    # Independent numpy objective of our weights, in our 1/(2N) convention.
    U = np.asarray(ours.U)
    pred = np.einsum("np,npc->nc", inst.masks, np.einsum("nd,pdc->npc", inst.X, U))
    F_np = 0.5 * np.sum((pred - inst.Y) ** 2) / spec.N + lam * np.sum(np.linalg.norm(U, axis=1))
    assert abs(F_np - F_ours) / F_ours < 1e-12

    # The optimal predictions are unique (strictly convex loss in the predictions).
    pred_scnn = operators.forward(problem, jnp.asarray(scnn["U"]))
    pred_ours = operators.forward(problem, ours.U)
    rel = np.linalg.norm(pred_scnn - pred_ours) / np.linalg.norm(pred_ours)
    assert rel <= 1e-2, rel


def test_bench_without_a_source_checkout_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_command, "benchmarks_root", lambda: tmp_path)
    assert main(["bench", "solvers", "--quick", "--out", str(tmp_path / "o")]) == 2
    assert "source checkout" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_problem_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "solvers", "--only", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown problem" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_without_a_benchmark_prints_help(capsys):
    assert main(["bench"]) == 2
    assert "solvers" in capsys.readouterr().out


def test_report_only_rewrites_the_committed_table_from_its_json(tmp_path, capsys):
    """``--report-only`` measures nothing (no pyscnn needed) and reproduces solvers.md."""
    results = bench_command.benchmarks_root() / "benchmarks" / "results"
    (tmp_path / "solvers.json").write_bytes((results / "solvers.json").read_bytes())
    assert main(["bench", "solvers", "--report-only", "--out", str(tmp_path)]) == 0
    committed = (results / "solvers.md").read_text()
    assert (tmp_path / "solvers.md").read_text() == committed
    assert committed.strip() in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solvers.json", "solvers.md"]


def test_report_only_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "solvers", "--report-only", "--out", str(tmp_path)]) == 2
    assert "no solver benchmark results" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the interface


@pytest.mark.parametrize("name", sorted(bench_command.BENCHMARKS))
def test_every_benchmark_follows_the_interface(name):
    module = bench_command.load_benchmark(name)
    assert bench_command.interface_problems(module) == []
    assert isinstance(module, bench_command.Benchmark)


def _fake_benchmark(monkeypatch, **members):
    """Register ``cvxdist bench fake`` backed by a module holding ``members``."""
    import sys
    import types

    module = types.ModuleType("fake_cvxdist_benchmark")
    for key, value in members.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(bench_command.BENCHMARKS, "fake", (module.__name__, "a test benchmark"))
    return module


def test_a_module_without_the_interface_is_named_with_what_it_lacks(monkeypatch, tmp_path, capsys):
    _fake_benchmark(monkeypatch, register=lambda parser: None, run=lambda out_dir, quick: {})
    assert main(["bench", "fake", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "fake_cvxdist_benchmark does not follow the benchmark interface" in err
    assert "no report(out_dir)" in err and "run(args) -> int" in err
    assert not (tmp_path / "o").exists()


def test_a_conforming_module_gets_its_options_the_common_ones_and_report_only(
    monkeypatch, tmp_path, capsys
):
    calls = []

    def register(parser):
        parser.add_argument("--level", type=int, default=1)

    def run(args):
        calls.append(("run", args.out, args.quick, args.only, args.repeats, args.level))
        return 3

    def report(out_dir):
        calls.append(("report", out_dir))
        return "# the report"

    module = _fake_benchmark(monkeypatch, register=register, run=run, report=report)
    assert bench_command.interface_problems(module) == []
    out = tmp_path / "o"
    argv = ["bench", "fake", "--out", str(out), "--quick", "--only", "a", "b", "--repeats", "2"]
    assert main([*argv, "--level", "5"]) == 3  # run's status is the exit status
    assert main(["bench", "fake", "--out", str(out), "--report-only"]) == 0
    assert "# the report" in capsys.readouterr().out
    assert calls == [("run", out, True, ["a", "b"], 2, 5), ("report", out)]
    assert main(["bench", "fake", "--out", str(out), "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    assert len(calls) == 2


def test_other_commands_do_not_import_the_benchmarks():
    import subprocess
    import sys

    code = (
        "import sys; from cvxdist.cli import build_parser; build_parser().parse_args(['demo', "
        "'--out', 'x']); print(sorted(m for m in sys.modules if m.startswith('benchmarks')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
