"""E3: what each method reaches in how much time (the last stage, one size, one seed).

Two kinds of point, told apart by their settings:

* ``tols`` (loss against solver time): each convex solver run to a series of duality-gap
  tolerances (each solve from scratch, compiled beforehand) against the loss curves of Adam,
  on the same rows; compilation and row extraction excluded on both sides.
* ``lam_path`` (test accuracy against wall time): every method on the same images, its clock
  starting with the row extraction (which every method needs: the rows, or for logit KD the
  reductions that initialise its students). The convex student is a whole warm-started λ path
  (its point: the time of the whole path and the accuracy of its last, smallest-λ student,
  whose size every baseline is matched to); Adam and KD are curves of training snapshots.
  Compilation is recorded apart (``compile_s``) and not on the curves.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from benchmarks.distill.experiments import (
    Context,
    adam_config,
    config_of,
    kd_config,
    squared_loss,
    timed,
)


def run_e3_point(ctx: Context, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """E3, either kind (see the module docstring)."""
    if "lam_path" in settings:
        return run_path_point(ctx, settings)
    return run_tolerance_point(ctx, settings)


def spread(n: int, count: int) -> list[int]:
    """About ``count`` indices in ``range(n)``, log-spaced, always with the first and last."""
    if n <= count:
        return list(range(n))
    picks = {0, n - 1, *np.unique(np.geomspace(1, n - 1, count - 1).astype(int)).tolist()}
    return sorted(picks)


def _adam_runs(block: Any, convex: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The Adam students of E3 (snapshots kept), matched to the ``convex`` student."""
    from cvxdist import baselines as B

    budget, steps = convex.report["params"], settings["adam_steps"]
    return {
        "relu-adam": lambda: B.relu_block_student(
            block, budget, adam_config(settings, steps=steps), keep_params=True
        ),
        "relu-adam-mb": lambda: B.relu_block_student(
            block, budget, adam_config(settings, mini_batch=True, steps=steps), keep_params=True
        ),
        "fixed-gate-adam": lambda: B.fixed_gate_block_student(
            block, convex, adam_config(settings, steps=steps), keep_params=True
        ),
    }


def _adam_curve(
    ctx: Context, method: str, student: Any, convex: Any, block: Any, offset: float
) -> list[dict[str, Any]]:
    """Adam's loss curve with the test accuracy at about six snapshots, times + ``offset``."""
    from cvxdist import baselines as B
    from cvxdist.distill.student import BlockStudent

    report = student.report["adam"]
    snapshots = report.pop("snapshots")
    curve = [{**point, "time_s": point["time_s"] + offset} for point in report["curve"]]
    for i in spread(len(curve), 6):
        if method == "fixed-gate-adam":
            variables = B.fixed_gate_variables(convex, snapshots[i], block.reduction)
        else:
            variables = B.relu_variables_like(student, snapshots[i], block.reduction)
        probe = BlockStudent(block.stage, student.module, variables, {"params": 0})
        curve[i]["accuracy"] = ctx.evaluate([probe], block.stage, None)["accuracy"]
    return curve


# ----------------------------------------------------------------------------- loss vs time


def run_tolerance_point(ctx: Context, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Loss and accuracy against time: the convex solver(s) against Adam, same rows."""
    from cvxdist.distill.pipeline import build_student, prepare_block, solve_block
    from cvxdist.mapping import predict_convex
    from cvxdist.solvers import SOLVERS

    teacher, cut = ctx.teacher, settings["cut"]
    images = ctx.subset(settings["samples_per_class"], settings["seed"])
    config = config_of(settings)
    block = prepare_block(teacher, images, cut, config, progress=False)
    tols = sorted(settings["tols"], reverse=True)
    results = []
    final_convex = None
    for solver in sorted(SOLVERS):
        cfg = dataclasses.replace(config, solver=solver)
        try:  # compile once (tol is traced), not timed
            warm = time.perf_counter()
            solve_block(block, cfg, (cfg.lam_frac,), progress=False)
            compile_s = time.perf_counter() - warm
        except Exception as err:  # a solver that cannot take this problem is reported
            results.append({"method": f"convex-{solver}", "error": str(err)})
            continue
        curve = []
        for tol in tols:
            gates, [solution], _ = solve_block(
                block, dataclasses.replace(cfg, tol=tol), (cfg.lam_frac,), False
            )
            student = build_student(solution, gates, block.reduction, block.row_info, cut)
            metrics = ctx.evaluate([student], cut, None)
            curve.append(
                {
                    "tol": tol,
                    "time_s": float(solution.stats.time_s),
                    "iterations": int(solution.stats.iterations),
                    "rel_gap": float(solution.stats.rel_gap),
                    "objective": float(solution.stats.objective),
                    "loss": squared_loss(
                        predict_convex(solution, gates, block.rows), block.targets
                    ),
                    "accuracy": metrics["accuracy"],
                    "params": metrics["block_params"],
                }
            )
        final_convex = final_convex or student
        results.append(
            {
                "method": f"convex-{solver}",
                "curve": curve,
                "compile_s": max(compile_s - curve[0]["time_s"], 0.0),
                "accuracy": curve[-1]["accuracy"],
                "loss": curve[-1]["loss"],
                "block_params": curve[-1]["params"],
            }
        )
        ctx.log(f"    convex-{solver}: loss {curve[-1]['loss']:.4g} in {curve[-1]['time_s']:.2f} s")
    if final_convex is None:
        return results
    for method, train in _adam_runs(block, final_convex, settings).items():
        if method not in settings["methods"]:
            continue
        student = train()
        report = student.report["adam"]
        curve = _adam_curve(ctx, method, student, final_convex, block, 0.0)
        results.append(
            {
                "method": method,
                "curve": curve,
                "compile_s": report["compile_time_s"],
                "accuracy": curve[-1]["accuracy"],
                "loss": report["loss"],
                "train_time_s": report["train_time_s"],
                "block_params": student.report["params"],
            }
        )
        ctx.log(f"    {method}: loss {report['loss']:.4g} in {report['train_time_s']:.2f} s")
    return results


# ----------------------------------------------------------------------------- accuracy vs time


def run_path_point(ctx: Context, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Test accuracy against wall time, rows included, the convex student a whole λ path."""
    from cvxdist import baselines as B
    from cvxdist.distill.pipeline import build_student, prepare_block, solve_block
    from cvxdist.distill.student import BlockStudent

    teacher, cut = ctx.teacher, settings["cut"]
    images = ctx.subset(settings["samples_per_class"], settings["seed"])
    config = config_of(settings)
    path = sorted(settings["lam_path"], reverse=True)
    block, rows_s = timed(lambda: prepare_block(teacher, images, cut, config, progress=False))
    _, warm_s = timed(lambda: solve_block(block, config, path[:1], False))
    (gates, solutions, _), path_s = timed(lambda: solve_block(block, config, path, False))
    setup_s = path_s - sum(float(s.stats.time_s) for s in solutions)  # gates, problem, λ_max
    compile_s = max(warm_s - setup_s - float(solutions[0].stats.time_s), 0.0)
    elapsed = rows_s + setup_s
    curve = []
    for frac, solution in zip(path, solutions):
        elapsed += float(solution.stats.time_s)
        student = build_student(solution, gates, block.reduction, block.row_info, cut)
        metrics = ctx.evaluate([student], cut, None)
        curve.append(
            {
                "lam_frac": frac,
                "time_s": elapsed,
                "accuracy": metrics["accuracy"],
                "params": metrics["block_params"],
                "rel_gap": float(solution.stats.rel_gap),
                "iterations": int(solution.stats.iterations),
            }
        )
    convex = student  # the path's last: every baseline is matched to its size
    results = [
        {
            "method": "convex",
            "curve": curve,
            "rows_s": rows_s,
            "compile_s": compile_s,
            "time_s": curve[-1]["time_s"],
            "accuracy": curve[-1]["accuracy"],
            "block_params": curve[-1]["params"],
        }
    ]
    ctx.log(f"    convex λ path: acc {curve[-1]['accuracy']:.4f} in {curve[-1]['time_s']:.2f} s")
    for method, train in _adam_runs(block, convex, settings).items():
        if method not in settings["methods"]:
            continue
        student, wall = timed(train)
        report = student.report["adam"]
        setup = wall - report["train_time_s"] - report["compile_time_s"]
        curve = _adam_curve(ctx, method, student, convex, block, rows_s + setup)
        results.append(_timed_result(method, curve, rows_s, report, student.report["params"]))
    if "logit-kd" in settings["methods"]:  # it computes the teacher's logits itself (timed)
        students, wall = timed(
            lambda: B.kd_students(
                teacher,
                images,
                cut,
                cut,
                [block],
                [convex.report["params"]],
                kd_config(settings),
                keep_params=True,
            )
        )
        report = students[0].report["kd"]
        snapshots = report.pop("snapshots")
        setup = wall - report["train_time_s"] - report["compile_time_s"]
        curve = [{**p, "time_s": p["time_s"] + rows_s + setup} for p in report["curve"]]
        for i in spread(len(curve), 6):
            probes = [
                BlockStudent(s.stage, s.module, v, {"params": 0})
                for s, v in zip(students, snapshots[i])
            ]
            curve[i]["accuracy"] = ctx.evaluate(probes, cut, None)["accuracy"]
        params = sum(s.report["params"] for s in students)
        results.append(_timed_result("logit-kd", curve, rows_s, report, params))
    for r in results[1:]:
        ctx.log(f"    {r['method']}: acc {r['accuracy']:.4f} in {r['time_s']:.2f} s")
    return results


def _timed_result(
    method: str, curve: list[dict[str, Any]], rows_s: float, report: dict[str, Any], params: int
) -> dict[str, Any]:
    return {
        "method": method,
        "curve": curve,
        "rows_s": rows_s,
        "compile_s": report["compile_time_s"],
        "time_s": curve[-1]["time_s"],
        "accuracy": curve[-1]["accuracy"],
        "loss": report["loss"],
        "train_time_s": report["train_time_s"],
        "block_params": params,
    }
