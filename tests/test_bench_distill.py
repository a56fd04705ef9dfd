"""`cvxdist bench distill`: a tiny resumable grid, the summary arithmetic and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import kill_when_blocked, without_timings

from cvxdist.cli import main
from cvxdist.commands import bench as bench_command


@pytest.fixture(scope="module")
def harness():
    return bench_command.load_benchmark("distill")


def _tiny(h):
    size = h.Size("T", gates=6, input_dim=8, output_dim=6, lam_frac=0.05)
    return h.Grid(
        teacher="digits-cnn",
        seeds=(0,),
        max_rows=300,
        test_limit=None,
        adam_steps=60,
        adam_batch=64,
        kd_steps=20,
        kd_batch=32,
        e1_blocks=("both",),
        e1_sizes=(size,),
        e1_samples=5,
        e1_methods=("convex", "relu-adam", "fixed-gate-adam", "logit-kd", "pruning"),
        e2_samples=(),
        e3_samples=5,
        e3_size=size,
        e3_tols=(1e-1, 1e-3),
        e3_adam_steps=60,
        e3_methods=("relu-adam",),
        e4_samples=(5,),
        e4_gates=8,
    )


@pytest.fixture(scope="module")
def first_run(harness, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-distill")
    grid = _tiny(harness)
    payload = harness.run(
        out, grid=grid, only=["E1", "E3", "E4"], log=lambda _: None, keep_going=False
    )
    return out, grid, payload


def test_tiny_grid_writes_records_report_and_plots(first_run, harness):
    out, _, payload = first_run
    assert payload["computed"] == 3 and payload["reused"] == 0
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 3
    for path in records:
        record = json.loads(path.read_text())
        assert record["complete"] and path.stem == record["key"]
    e1 = next(r for r in payload["records"] if r["experiment"] == "E1")
    methods = [r["method"] for r in e1["results"]]
    assert methods == ["convex", "relu-adam", "fixed-gate-adam", "logit-kd", "pruning"]
    by = {r["method"]: r for r in e1["results"]}
    convex = by["convex"]
    assert convex["teacher_block_params"] == 3520 + 13952  # stage2..stage3 of the digits CNN
    assert len(convex["stages"]) == 2 and all(s["rel_gap"] <= 1e-3 for s in convex["stages"])
    for method in methods[1:]:
        # matched sizes: within one hidden unit (plus the pruning floor, not reached here)
        assert (
            abs(by[method]["block_params"] - convex["block_params"]) <= 0.1 * convex["block_params"]
        ), method
        assert 0.0 <= by[method]["accuracy"] <= 1.0
    assert by["fixed-gate-adam"]["block_params"] == convex["block_params"]
    e3 = next(r for r in payload["records"] if r["experiment"] == "E3")
    curves = {r["method"]: r["curve"] for r in e3["results"]}
    assert [p["tol"] for p in curves["convex-fista"]] == [1e-1, 1e-3]
    assert curves["convex-fista"][-1]["rel_gap"] <= 1e-3
    assert len(curves["relu-adam"]) >= 2 and "accuracy" in curves["relu-adam"][-1]
    e4 = next(r for r in payload["records"] if r["experiment"] == "E4")
    assert [r["method"] for r in e4["results"]] == ["convex", "convex+polish", "relu-adam"]
    report = (out / "REPORT.md").read_text()
    for heading in ("## E1", "## E3", "## E4", "## Machine"):
        assert heading in report
    for plot in ("e1_accuracy_vs_size.png", "e3_loss_vs_time.png", "e4_head_student.png"):
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    saved = json.loads((out / "distill.json").read_text())
    assert saved["machine"]["cpu_model"] and saved["summary"]["E1"]


def test_rerun_recomputes_nothing(first_run, harness, monkeypatch):
    out, grid, _ = first_run
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "records").iterdir()}

    def refuse(ctx, settings):
        raise AssertionError("a finished point was recomputed")

    monkeypatch.setattr(harness, "RUNNERS", dict.fromkeys(harness.RUNNERS, refuse))
    payload = harness.run(
        out, grid=grid, only=["E1", "E3", "E4"], log=lambda _: None, keep_going=False
    )
    assert payload["computed"] == 0 and payload["reused"] == 3
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "records").iterdir()}
    assert after == before


def test_report_only_covers_recorded_points_and_counts_the_rest(first_run, harness, monkeypatch):
    out, grid, _ = first_run

    def refuse(ctx, settings):
        raise AssertionError("report_only computed a point")

    monkeypatch.setattr(harness, "RUNNERS", dict.fromkeys(harness.RUNNERS, refuse))
    two_seeds = dataclasses.replace(grid, seeds=(0, 1))
    payload = harness.run(
        out, grid=two_seeds, only=["E1", "E3", "E4"], log=lambda _: None, report_only=True
    )
    assert (payload["computed"], payload["reused"], payload["missing"]) == (0, 3, 3)
    assert {r["settings"]["seed"] for r in payload["records"]} == {0}
    assert "3 not yet computed: this report is partial" in (out / "REPORT.md").read_text()


def test_a_half_written_record_is_recomputed_and_only_it(first_run, harness, monkeypatch):
    out, grid, _ = first_run
    e4 = next(
        p for p in (out / "records").iterdir() if json.loads(p.read_text())["experiment"] == "E4"
    )
    e4.write_text(e4.read_text()[:100])  # an interrupted write
    calls = []

    def stub(ctx, settings):
        calls.append(settings)
        return [{"method": "convex", "accuracy": 0.5, "block_params": 1}]

    monkeypatch.setattr(harness, "RUNNERS", dict.fromkeys(harness.RUNNERS, stub))
    payload = harness.run(
        out, grid=grid, only=["E1", "E3", "E4"], log=lambda _: None, keep_going=False
    )
    assert payload["computed"] == 1 and payload["reused"] == 2
    assert len(calls) == 1 and calls[0]["to"] == "head"
    assert json.loads(e4.read_text())["complete"]


def test_killed_grid_resumes_without_redoing_finished_points(first_run, harness, tmp_path):
    # `cvxdist bench distill` (its quick grid replaced by the tiny one) killed by SIGKILL once
    # the E3 point is recorded; the rerun computes only E4, and both records are the ones
    # of the uninterrupted run (timings aside).
    _, _, uninterrupted = first_run
    out = tmp_path / "bench"
    setup = f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_bench_distill
from cvxdist.commands.bench import load_benchmark
h = load_benchmark("distill")
h.quick_grid = lambda: test_bench_distill._tiny(h)
block_after("benchmarks.distill", "write_json", 1)
"""
    argv = ["bench", "distill", "--quick", "--only", "E3", "E4", "--out", str(out)]
    kill_when_blocked(setup, argv, tmp_path / "marker")
    assert [json.loads(p.read_text())["experiment"] for p in (out / "records").iterdir()] == ["E3"]
    payload = harness.run(out, grid=_tiny(harness), only=["E3", "E4"], log=lambda _: None)
    assert (payload["computed"], payload["reused"]) == (1, 1)
    expected = {r["key"]: r for r in uninterrupted["records"] if r["experiment"] != "E1"}
    assert {r["key"]: without_timings(r) for r in payload["records"]} == {
        key: without_timings(r) for key, r in expected.items()
    }


def test_keys_follow_the_settings(harness):
    grid = _tiny(harness)
    stages = ["stage1", "stage2", "stage3"]

    def keys(g):
        return [
            harness.record_key(p["experiment"], "sha", p["settings"])
            for p in harness.points(g, harness.EXPERIMENTS, stages)
        ]

    base = keys(grid)
    assert len(set(base)) == len(base)
    assert keys(grid) == base  # deterministic
    more_steps = keys(dataclasses.replace(grid, adam_steps=61))
    assert set(more_steps) != set(base)
    two_seeds = keys(dataclasses.replace(grid, seeds=(0, 1)))
    assert set(base) < set(two_seeds) and len(two_seeds) == 2 * len(base)
    assert harness.record_key("E1", "other", {}) != harness.record_key("E1", "sha", {})


def _record(experiment, seed, results, **settings):
    return {"experiment": experiment, "settings": {"seed": seed, **settings}, "results": results}


def test_summary_means_stds_and_targets(harness):
    def res(method, acc, params=100):
        return {
            "method": method,
            "accuracy": acc,
            "agreement": acc,
            "block_params": params,
            "teacher_block_params": 1000,
            "compression": 1000 / params,
        }

    records = [
        _record("E2", s, [res("convex", a), res("relu-adam", b)], samples_per_class=10)
        for s, (a, b) in enumerate([(0.90, 0.85), (0.92, 0.86), (0.94, 0.87)])
    ]
    curve = [{"time_s": 0.01, "loss": 2.0}, {"time_s": 0.05, "loss": 1.0}]
    records.append(
        _record(
            "E3",
            0,
            [
                {"method": "convex-fista", "curve": curve, "loss": 1.0, "accuracy": 0.9},
                {
                    "method": "relu-adam",
                    "curve": [],
                    "loss": 1.5,
                    "train_time_s": 1.0,
                    "accuracy": 0.8,
                },
            ],
        )
    )
    payload = {
        "records": records,
        "teacher": {"test_accuracy": 0.95, "stages": ["stage3"], "block_params": {}},
    }
    summary = harness.summarize(payload)
    convex = next(r for r in summary["E2"] if r["method"] == "convex")
    assert convex["accuracy"]["mean"] == pytest.approx(0.92)
    assert convex["accuracy"]["std"] == pytest.approx(0.02)
    assert convex["seeds"] == 3
    e2 = summary["targets"]["E2_10_per_class"]
    assert e2["convex_minus_relu_adam_points"] == pytest.approx(6.0)
    assert e2["met"]
    e3 = summary["targets"]["E3_time_ratio"]
    assert e3["ratios"] == [pytest.approx(0.05)] and e3["met"]  # loss 1.0 ≤ 1.5 at 0.05 s
    # Adam better than every convex point: never reached, target not met.
    records[-1]["results"][1]["loss"] = 0.5
    e3 = harness.summarize(payload)["targets"]["E3_time_ratio"]
    assert e3["ratios"] == [None] and not e3["met"]


def test_cli_rejects_unknown_experiments(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["bench", "distill", "--only", "E9", "--out", str(out)]) == 2
    assert "E9" in capsys.readouterr().err
    assert not out.exists()
