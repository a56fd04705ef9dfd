"""The distillation objectives on one cut: accuracy against student size, and the convex
student against the Adam students trained on the same objective at the same size.

Two experiments, each appending one JSON record per measured point to ``--out`` (a JSON-lines
file; a rerun skips the configurations already recorded, so an interrupted sweep resumes):

- ``path``: one prepared block (``--objective``, the DistillConfig overrides in ``--config``),
  a λ path (``--fracs``), every solution evaluated on the test split with and without the
  output refit;
- ``compare``: at ``--per-class`` images per class (``all`` for every image), the convex
  student at ``lam_frac`` and, at its parameter count and on the same objective, the ReLU
  student and the fixed-gate student trained by Adam (``--steps``).

    python -m benchmarks.objectives path --objective logits --fracs 0.1 0.05 0.03
    python -m benchmarks.objectives compare --per-class 10 --config '{"objective": "mixed"}'

Every record carries the machine description. The README's "Objectives" tables come from
``benchmarks/results/objectives.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_description
from cvxdist import baselines
from cvxdist.data import samples_per_class
from cvxdist.distill.evaluation import SplicedEvaluator
from cvxdist.distill.pipeline import (
    DistillConfig,
    build_student,
    prepare_block,
    solve_block,
    solve_prepared,
)
from cvxdist.distill.runner import load_teacher_and_data

RESULTS = Path(__file__).parent / "results" / "objectives.jsonl"

# The stage3 settings of the README's tables (128 gates, 16 input PCA dimensions, nuclear).
BASE = {
    "cut": "stage3",
    "gates": 128,
    "max_rows": 40_000,
    "reg": "nuclear",
    "lam_frac": 0.05,
    "max_input_dim": 16,
    "max_output_dim": 10,
    "output_variance": 0.99,
    "refit": True,
}


def _done(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _append(out: Path, record: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "machine"}, default=str), flush=True)


def run_path(args: argparse.Namespace, key: dict[str, Any]) -> None:
    teacher, train, test = load_teacher_and_data(args.teacher, None, None)
    config = DistillConfig(**{**BASE, **args.config, "objective": args.objective})
    tic = time.perf_counter()
    block = prepare_block(teacher, train.images, config.cut, config, progress=True)
    prepare_s = time.perf_counter() - tic
    tic = time.perf_counter()
    gates, solutions, _ = solve_block(block, config, args.fracs, progress=True)
    solve_s = time.perf_counter() - tic
    evaluate = SplicedEvaluator(teacher, test.images, test.labels)
    machine = machine_description()
    for frac, solution in zip(sorted(args.fracs, reverse=True), solutions, strict=True):
        for refit in (False, True):
            student = build_student(
                solution,
                gates,
                block.reduction,
                block.row_info,
                config.cut,
                (block.terms, config.refit_ridge) if refit else None,
            )
            metrics = evaluate([student], config.cut, None)
            _append(
                args.out,
                {
                    **key,
                    "fitted_to": block.objective,
                    "frac": frac,
                    "refit": refit,
                    "accuracy": metrics["accuracy"],
                    "teacher_accuracy": metrics["teacher_accuracy"],
                    "agreement": metrics["agreement"],
                    "params": metrics["block_params"],
                    "teacher_block_params": metrics["teacher_block_params"],
                    "iterations": int(solution.stats.iterations),
                    "rel_gap": float(solution.stats.rel_gap),
                    "neurons": student.report["neurons"],
                    "gates_used": student.report["gates_used"],
                    "prepare_s": round(prepare_s, 1),
                    "path_solve_s": round(solve_s, 1),
                    "machine": machine,
                },
            )


def run_compare(args: argparse.Namespace, key: dict[str, Any]) -> None:
    teacher, train, test = load_teacher_and_data(args.teacher, None, None)
    per_class = None if args.per_class == "all" else int(args.per_class)
    images = samples_per_class(train, per_class, args.seed).images if per_class else train.images
    config = DistillConfig(**{**BASE, **args.config, "objective": args.objective})
    tic = time.perf_counter()
    block = prepare_block(teacher, images, config.cut, config, progress=True)
    prepare_s = time.perf_counter() - tic
    tic = time.perf_counter()
    convex = solve_prepared(teacher, block, config, (config.lam_frac,), progress=True)
    times = {"convex": time.perf_counter() - tic}
    adam = baselines.AdamConfig(steps=args.steps, batch_size=1024, seed=args.seed)
    budget = convex.report["params"]
    tic = time.perf_counter()
    relu = baselines.relu_block_student(block, budget, adam)
    times["relu-adam"] = time.perf_counter() - tic
    tic = time.perf_counter()
    fixed = baselines.fixed_gate_block_student(block, convex, adam)
    times["fixed-gate-adam"] = time.perf_counter() - tic
    evaluate = SplicedEvaluator(teacher, test.images, test.labels)
    rows = {}
    for name, student in (("convex", convex), ("relu-adam", relu), ("fixed-gate-adam", fixed)):
        metrics = evaluate([student], config.cut, None)
        rows[name] = {
            "accuracy": metrics["accuracy"],
            "params": metrics["block_params"],
            "time_s": round(times[name], 1),
        }
    _append(
        args.out,
        {
            **key,
            "fitted_to": block.objective,
            "skip": block.skip,
            "teacher_accuracy": metrics["teacher_accuracy"],
            "prepare_s": round(prepare_s, 1),
            "rows": rows,
            "machine": machine_description(),
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("path", "compare"))
    parser.add_argument("--teacher", default="fashion-resnet20")
    parser.add_argument("--objective", default=None, help="default: the cut's default objective")
    parser.add_argument("--config", type=json.loads, default={}, help="DistillConfig overrides")
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.1, 0.05, 0.03])
    parser.add_argument("--per-class", default="10", help="images per class, or 'all'")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps of the baselines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    key: dict[str, Any] = {
        "experiment": args.experiment,
        "teacher": args.teacher,
        "objective": args.objective,
        "config": args.config,
        "seed": args.seed,
    }
    if args.experiment == "path":
        key["fracs"] = args.fracs
    else:
        key.update(per_class=args.per_class, steps=args.steps)
    if any(all(r.get(k) == v for k, v in key.items()) for r in _done(args.out)):
        print(f"already recorded in {args.out}: {json.dumps(key)}")
        return
    (run_path if args.experiment == "path" else run_compare)(args, key)


if __name__ == "__main__":
    main()
