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
        e2_samples=(5,),
        e2_size=size,
        e2_methods=("convex",),
        e2_max_rows=(None, 100),
        e3_samples=5,
        e3_size=size,
        e3_tols=(1e-1, 1e-3),
        e3_adam_steps=60,
        e3_methods=("relu-adam",),
        e3_lam_path=(0.2,),
        e3_path_methods=("relu-adam", "logit-kd"),
        e4_samples=(5,),
        e4_gates=8,
    )


def _records(payload, experiment, kind=None):
    return [
        r
        for r in payload["records"]
        if r["experiment"] == experiment
        and (kind is None or ("lam_path" in r["settings"]) == (kind == "path"))
    ]


@pytest.fixture(scope="module")
def first_run(harness, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-distill")
    grid = _tiny(harness)
    payload = harness.run_grid(out, grid, harness.EXPERIMENTS, log=lambda _: None, keep_going=False)
    return out, grid, payload


def test_tiny_grid_writes_records_report_and_plots(first_run, harness):
    out, _, payload = first_run
    assert payload["computed"] == 6 and payload["reused"] == 0
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 6
    for path in records:
        record = json.loads(path.read_text())
        assert record["complete"] and path.stem == record["key"]
    (e1,) = _records(payload, "E1")
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
    (e3,) = _records(payload, "E3", "tolerances")
    curves = {r["method"]: r["curve"] for r in e3["results"]}
    assert [p["tol"] for p in curves["convex-fista"]] == [1e-1, 1e-3]
    assert curves["convex-fista"][-1]["rel_gap"] <= 1e-3
    assert len(curves["relu-adam"]) >= 2 and "accuracy" in curves["relu-adam"][-1]
    (e4,) = _records(payload, "E4")
    assert [r["method"] for r in e4["results"]] == ["convex", "convex+polish", "relu-adam"]
    report = (out / "REPORT.md").read_text()
    for heading in ("## E1", "## E2", "## E3", "## E4", "## Machine"):
        assert heading in report
    plots = ("e1_accuracy_vs_size.png", "e2_accuracy_vs_samples.png", "e3_loss_vs_time.png")
    plots += ("e3_accuracy_vs_time.png", "e4_head_student.png")
    for plot in plots:
        assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    saved = json.loads((out / "distill.json").read_text())
    assert saved["machine"]["cpu_model"] and saved["summary"]["E1"]


def test_the_convex_loss_through_the_gated_forward_is_the_certified_data_term(harness):
    """The loss the harness reports for a convex student (its network on the reduced rows,
    through ``cvxdist.mapping.predict``) is the data term of the solver's own certificate."""
    import jax.numpy as jnp

    from benchmarks.distill.experiments import config_of, gated_loss
    from cvxdist.data import load_dataset, samples_per_class
    from cvxdist.distill.pipeline import build_student, prepare_block, solve_block
    from cvxdist.problems import certify, make_problem
    from cvxdist.prox import get_regularizer
    from cvxdist.teachers import load_teacher

    teacher = load_teacher("digits-cnn")
    images = samples_per_class(load_dataset("digits", "train"), 5, 0).images
    settings = harness.points(_tiny(harness), ["E2"], ["stage2", "stage3"])[0]["settings"]
    # 6 reduced outputs, then all 32 channels (no output reduction: the targets are centred
    # and the mean sits in the bias)
    for output_dim in (6, 64):
        config = config_of({**settings, "size": {**settings["size"], "output_dim": output_dim}})
        block = prepare_block(teacher, images, "stage3", config, progress=False)
        assert (block.reduction.out_basis is None) == (output_dim == 64)
        gates, [solution], _ = solve_block(block, config, (0.05,), False)
        student = build_student(solution, gates, block.reduction, block.row_info, "stage3")
        problem = make_problem(block.rows, block.targets, gates, skip=True, bias=True)
        lam = jnp.asarray(solution.stats.lam, problem.dtype)
        data_term = certify(problem, get_regularizer(config.reg), lam, solution.U).evaluation.loss
        assert gated_loss(student, block) == pytest.approx(float(data_term), rel=1e-4)


def test_e2_runs_each_row_cap_and_shows_its_effect(first_run):
    out, _, payload = first_run
    e2 = {r["settings"]["max_rows"]: r for r in _records(payload, "E2")}
    assert set(e2) == {None, 100}
    rows = {cap: r["results"][0]["stages"][0]["rows"] for cap, r in e2.items()}
    assert rows == {None: 4 * 50, 100: 100}  # 5 images × 10 classes × 4 locations of stage3
    summary = payload["summary"]["E2"]
    assert {(r["max_rows"], r["method"]) for r in summary} == {(None, "convex"), (100, "convex")}
    report = (out / "REPORT.md").read_text()
    assert "Effect of the row cap on the convex student (main series: every location)" in report
    assert "**Rows: at most 100 per stage**" in report


def test_e3_accuracy_against_time_counts_the_rows_and_a_whole_path(first_run, harness):
    out, _, payload = first_run
    (record,) = _records(payload, "E3", "path")
    assert record["settings"]["lam_path"] == [0.2, 0.05]  # down to the size's λ
    by = {r["method"]: r for r in record["results"]}
    assert list(by) == ["convex", "relu-adam", "logit-kd"]
    convex = by["convex"]
    assert [p["lam_frac"] for p in convex["curve"]] == [0.2, 0.05]
    times = [p["time_s"] for p in convex["curve"]]
    assert convex["rows_s"] > 0 and convex["rows_s"] < times[0] < times[1] == convex["time_s"]
    assert convex["accuracy"] == convex["curve"][-1]["accuracy"]
    assert all(p["rel_gap"] <= 1e-3 for p in convex["curve"])
    for method in ("relu-adam", "logit-kd"):
        result = by[method]
        # every clock starts with the same row extraction, compilation kept apart
        assert result["rows_s"] == convex["rows_s"]
        assert all(p["time_s"] >= convex["rows_s"] for p in result["curve"])
        assert result["time_s"] == result["curve"][-1]["time_s"] and result["compile_s"] > 0
        assert "accuracy" in result["curve"][0] and "accuracy" in result["curve"][-1]
        assert abs(result["block_params"] - convex["block_params"]) <= 0.1 * convex["block_params"]
    (seed,) = payload["summary"]["E3"]["accuracy_time"]["per_seed"]
    assert seed["convex_over_kd_time"] == pytest.approx(convex["time_s"] / by["logit-kd"]["time_s"])
    assert "E3_kd_time" in payload["summary"]["targets"]
    assert "## E3: test accuracy vs wall time, rows included" in (out / "REPORT.md").read_text()


def test_rerun_recomputes_nothing(first_run, harness, monkeypatch):
    out, grid, _ = first_run
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "records").iterdir()}

    def refuse(ctx, settings):
        raise AssertionError("a finished point was recomputed")

    loop = harness.harness
    monkeypatch.setattr(loop, "RUNNERS", dict.fromkeys(loop.RUNNERS, refuse))
    payload = harness.run_grid(out, grid, harness.EXPERIMENTS, log=lambda _: None, keep_going=False)
    assert payload["computed"] == 0 and payload["reused"] == 6
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "records").iterdir()}
    assert after == before


def test_report_only_covers_recorded_points_and_counts_the_rest(first_run, harness, monkeypatch):
    out, grid, _ = first_run

    def refuse(*args, **kwargs):
        raise AssertionError("a report loaded the teacher or computed a point")

    loop = harness.harness
    monkeypatch.setattr(loop, "RUNNERS", dict.fromkeys(loop.RUNNERS, refuse))
    monkeypatch.setattr(loop, "Context", refuse)
    two_seeds = dataclasses.replace(grid, seeds=(0, 1))
    payload, _ = harness.refresh(out, two_seeds, harness.EXPERIMENTS)
    assert (len(payload["records"]), payload["missing"]) == (6, 6)
    assert {r["settings"]["seed"] for r in payload["records"]} == {0}
    assert "6 not yet computed: this report is partial" in (out / "REPORT.md").read_text()
    # the CLI's --report-only: the grid recorded in distill.json (now the two-seed one)
    assert main(["bench", "distill", "--report-only", "--out", str(out)]) == 0
    assert json.loads((out / "distill.json").read_text())["missing"] == 6
    harness.refresh(out, grid, harness.EXPERIMENTS)  # back to the grid that ran
    assert "not yet computed" not in (out / "REPORT.md").read_text()


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

    loop = harness.harness
    monkeypatch.setattr(loop, "RUNNERS", dict.fromkeys(loop.RUNNERS, stub))
    payload = harness.run_grid(out, grid, harness.EXPERIMENTS, log=lambda _: None, keep_going=False)
    assert payload["computed"] == 1 and payload["reused"] == 5
    assert len(calls) == 1 and calls[0]["to"] == "head"
    assert json.loads(e4.read_text())["complete"]


def test_killed_grid_resumes_without_redoing_finished_points(first_run, harness, tmp_path):
    # `cvxdist bench distill` (its quick grid replaced by the tiny one) killed by SIGKILL once
    # its first point is recorded; the rerun computes only the others, and every record is
    # the uninterrupted run's (timings aside).
    _, _, uninterrupted = first_run
    out = tmp_path / "bench"
    setup = f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_bench_distill
from cvxdist.commands.bench import load_benchmark
h = load_benchmark("distill")
h.quick_grid = lambda: test_bench_distill._tiny(h)
block_after("benchmarks.distill.records", "write_json", 1)
"""
    argv = ["bench", "distill", "--quick", "--only", "E3", "E4", "--out", str(out)]
    kill_when_blocked(setup, argv, tmp_path / "marker")
    assert len(list((out / "records").iterdir())) == 1
    payload = harness.run_grid(out, _tiny(harness), ["E3", "E4"], log=lambda _: None)
    expected = {r["key"]: r for r in uninterrupted["records"] if r["experiment"] in ("E3", "E4")}
    assert (payload["computed"], payload["reused"]) == (len(expected) - 1, 1)
    assert {r["key"]: without_timings(r) for r in payload["records"]} == {
        key: without_timings(r) for key, r in expected.items()
    }


def test_an_interrupted_grid_is_reportable_and_resumes(harness, tmp_path, monkeypatch):
    """distill.json follows every finished point, so a report can be made mid-run; a rerun
    computes only what the interruption left."""
    grid = dataclasses.replace(_tiny(harness), seeds=(0, 1, 2))
    calls = []

    def stub(ctx, settings):
        calls.append(settings["seed"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # not caught by keep_going
        return [{"method": "convex", "accuracy": 0.5, "block_params": 1}]

    loop = harness.harness
    monkeypatch.setattr(loop, "RUNNERS", dict.fromkeys(loop.RUNNERS, stub))
    with pytest.raises(KeyboardInterrupt):
        harness.run_grid(tmp_path, grid, ["E4"], log=lambda _: None)
    assert json.loads((tmp_path / "distill.json").read_text())["computed"] == 2
    payload, _ = harness.refresh(tmp_path)
    assert (len(payload["records"]), payload["missing"]) == (2, 1)
    payload = harness.run_grid(tmp_path, grid, ["E4"], log=lambda _: None)
    assert (payload["computed"], payload["reused"], calls) == (1, 2, [0, 1, 2, 2])


def test_settings_added_at_their_old_value_keep_the_old_keys(harness):
    """Grids gained the objective axis and E2's caps after records existed: at the values
    those records had, the points (and their keys) are unchanged; other values are new."""
    grid = _tiny(harness)
    stages = ["stage1", "stage2", "stage3"]
    settings = harness.points(grid, ["E1"], stages)[0]["settings"]
    assert settings["objective"] == "activations"
    older = {k: v for k, v in settings.items() if k != "objective"}
    assert harness.record_key("E1", "sha", settings) == harness.record_key("E1", "sha", older)
    logits = {**settings, "objective": "logits"}
    assert harness.record_key("E1", "sha", logits) != harness.record_key("E1", "sha", settings)
    capped = dataclasses.replace(grid, e2_max_rows=())  # E2 at ``max_rows`` only, as before
    (e2,) = harness.points(capped, ["E2"], stages)
    assert e2["settings"]["max_rows"] == grid.max_rows
    two = dataclasses.replace(grid, objectives=("activations", "logits"))
    assert len(harness.points(two, ["E1"], stages)) == 2 * len(harness.points(grid, ["E1"], stages))
    stored = json.loads(json.dumps(dataclasses.asdict(grid)))
    del stored["objectives"], stored["e2_max_rows"]  # a grid recorded before these existed
    assert harness.Grid.from_dict(stored) == dataclasses.replace(grid, e2_max_rows=())


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


def test_report_only_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "distill", "--report-only", "--out", str(tmp_path)]) == 2
    assert "no distillation results" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_committed_results_report_the_same_from_their_records(harness, tmp_path):
    """The committed REPORT.md is what the report code makes of the committed records."""
    import shutil

    results = bench_command.benchmarks_root() / "benchmarks" / "results"
    dirs = []
    for name in ("distill-fashion", "distill-digits"):
        shutil.copytree(results / name, tmp_path / name)
        dirs.append(tmp_path / name)
    target = tmp_path / "REPORT.md"
    assert harness.combined_report(dirs, target) == (results / "REPORT.md").read_text()
