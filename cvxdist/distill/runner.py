"""What the `distill`, `evaluate` and `demo` commands do (kept out of the CLI parsers)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cvxdist.errors import UserError

if TYPE_CHECKING:
    from cvxdist.teachers import Teacher

#: The demo's teacher, and its fallback when Fashion-MNIST is not installed.
DEMO_TEACHER = "fashion-resnet20"
DEMO_FALLBACK = "digits-cnn"


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def load_teacher_and_data(
    teacher: str | Path | Teacher, dataset: str | None, data_dir: str | None
) -> tuple[Teacher, Any, Any]:
    """Teacher (given, or loaded from a shipped name or a folder), train and test splits;
    checks that the dataset fits the teacher."""
    from cvxdist.data import load_dataset
    from cvxdist.teachers import load_teacher

    if isinstance(teacher, (str, Path)):
        teacher = load_teacher(teacher)
    name = dataset or teacher.dataset
    train = load_dataset(name, "train", data_dir)
    test = load_dataset(name, "test", data_dir)
    expected = tuple(teacher.image_shape)
    if tuple(train.images.shape[1:]) != expected:
        raise UserError(
            f"teacher {teacher.name!r} takes images of shape {expected} but dataset {name!r} "
            f"has {tuple(train.images.shape[1:])}"
        )
    classes = teacher.info.get("num_classes", teacher.config.num_classes)
    if train.num_classes != classes:
        raise UserError(
            f"teacher {teacher.name!r} has {classes} classes but dataset {name!r} has "
            f"{train.num_classes}"
        )
    return teacher, train, test


def _default_cut(teacher: Any) -> str:
    """The last stage before the head."""
    return [c for c in teacher.cuts if c not in ("head", "stem")][-1]


def _check_positive(name: str, value: float | None, strict: bool = True) -> None:
    if value is None:
        return
    if not np.isfinite(value) or (value <= 0 if strict else value < 0):
        bound = "> 0" if strict else ">= 0"
        raise UserError(f"{name} must be a finite number {bound}, got {value}")


def _config_from_args(args: argparse.Namespace, cut: str) -> Any:
    from cvxdist.distill.pipeline import DistillConfig

    _check_positive("--lam-frac", args.lam_frac, strict=False)
    for value in args.lam_path or ():
        _check_positive("--lam-path", value, strict=False)
    if args.gates < 1:
        raise UserError(f"--gates must be at least 1, got {args.gates}")
    _check_positive("--logit-weight", args.logit_weight)
    for flag in ("max_params", "max_input_dim", "max_output_dim", "channel_dim", "max_images"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return DistillConfig(
        cut=cut,
        to=args.to,
        objective=args.objective,
        logit_weight=args.logit_weight,
        max_images=args.max_images,
        gates=args.gates,
        reg=args.reg,
        lam_frac=0.02 if args.lam_frac is None else args.lam_frac,
        lam_path=tuple(args.lam_path) if args.lam_path else None,
        agreement_tol=args.agreement_tol,
        max_params=args.max_params,
        solver=args.solver,
        tol=args.tol,
        max_iters=args.max_iters,
        max_rows=args.max_rows,
        input_variance=args.input_variance,
        output_variance=args.output_variance,
        max_input_dim=args.max_input_dim,
        channel_dim=args.channel_dim,
        max_output_dim=args.max_output_dim,
        kernel_size=args.kernel_size,
        skip=not args.no_skip,
        head_student=args.head_student,
        per_block=args.per_block,
        identity=args.identity,
        polish=args.polish,
        refit=args.refit,
        seed=args.seed,
    )


def _subset(train: Any, per_class: int | None, seed: int) -> Any:
    from cvxdist.data import samples_per_class

    if per_class is not None and per_class < 1:
        raise UserError(f"--samples-per-class must be at least 1, got {per_class}")
    subset = samples_per_class(train, per_class, seed)
    if len(subset) == 0:
        raise UserError("the training subset is empty")
    return subset


def run_distill(args: argparse.Namespace) -> int:
    from cvxdist.data import holdout_split
    from cvxdist.distill.evaluation import evaluate_spliced
    from cvxdist.distill.io import check_output_dir, save_students, staged_output, teacher_record
    from cvxdist.distill.pipeline import distill

    check_output_dir(args.out)
    if args.samples_per_class is not None and args.samples_per_class < 1:
        raise UserError(f"--samples-per-class must be at least 1, got {args.samples_per_class}")
    teacher, train, test = load_teacher_and_data(args.teacher, args.dataset, args.data_dir)
    cut = args.cut or _default_cut(teacher)
    config = _config_from_args(args, cut)
    teacher.resolve(cut, args.to)  # validates the cut names before any work
    last = args.to or cut
    subset = _subset(train, args.samples_per_class, args.seed)
    holdout = None
    if config.lam_path:
        subset, held = holdout_split(subset, 0.1, args.seed)
        holdout = held.images
    start = time.perf_counter()
    students = distill(
        teacher,
        subset.images,
        config,
        holdout_images=holdout,
        progress=not args.quiet,
        log=lambda m: _say(args.quiet, m),
        cache_dir=None if args.no_cache else args.out / "cache",
    )
    solve_time = time.perf_counter() - start
    metrics = evaluate_spliced(teacher, students, cut, args.to, test.images, test.labels)
    result = {
        "teacher": teacher.name,
        "dataset": train.name,
        "cut": cut,
        "to": last,
        "samples_per_class": args.samples_per_class,
        "train_images": len(subset),
        "config": {k: v for k, v in vars(config).items()},
        "time_s": solve_time,
        **metrics,
        "stages": [{"stage": s.stage, **s.report} for s in students],
    }
    with staged_output(args.out) as tmp:
        meta = {**teacher_record(args.teacher, teacher), "cut": cut, "to": last}
        save_students(tmp, students, meta)
        (tmp / "result.json").write_text(json.dumps(result, indent=2, default=_json) + "\n")
        _plot_distill(result, tmp / "plot.png")
    summary = {k: result[k] for k in ("accuracy", "teacher_accuracy", "agreement")}
    summary.update(block_params=result["block_params"], compression=result["compression"])
    print(json.dumps(summary))
    return 0


def _json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(type(value).__name__)


def run_evaluate(args: argparse.Namespace) -> int:
    from cvxdist.distill.evaluation import evaluate_spliced
    from cvxdist.distill.io import load_students, resolve_run_teacher

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    students, info = load_students(args.student)
    teacher = resolve_run_teacher(args.student, args.teacher)
    teacher, train, test = load_teacher_and_data(teacher, args.dataset, args.data_dir)
    data = test if args.split == "test" else train
    images, labels = data.images, data.labels
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    metrics = evaluate_spliced(teacher, students, info["cut"], info["to"], images, labels)
    print(json.dumps({"teacher": teacher.name, "cut": info["cut"], "to": info["to"], **metrics}))
    return 0


def _plot_distill(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    path_points = [p for stage in result["stages"] for p in stage.get("path", [])]
    if path_points:
        ax.plot(
            [p["params"] for p in path_points],
            [p["holdout_agreement"] for p in path_points],
            "o-",
            label="λ path (held-out agreement)",
        )
        ax.set_ylabel("agreement with teacher (held-out train images)")
    ax.axvline(result["teacher_block_params"], color="gray", ls="--", label="teacher block")
    ax.scatter([result["block_params"]], [result["agreement"]], color="C3", zorder=3)
    ax.annotate(
        f"student: acc {result['accuracy']:.3f}\nteacher: {result['teacher_accuracy']:.3f}",
        (result["block_params"], result["agreement"]),
    )
    ax.set_xlabel("block parameters (gates included)")
    ax.set_title(f"{result['teacher']}: {result['cut']}..{result['to']} replaced")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- demo


def _demo_settings(quick: bool, fallback: bool) -> dict[str, Any]:
    # The digits teacher's stage3 (13,952 parameters; 3×3×16 patches, 32 output channels):
    # as on Fashion-MNIST, few PCA dimensions, `nuclear` at a large λ and a refit keep the
    # student under 1/4 of the block (measured on 2 CPU cores: 3,290 parameters, 0.911 test
    # accuracy, a 4.7 s solve of 39 iterations; the whole demo 38 s).
    digits = {
        "samples_per_class": None,
        "gates": 48,
        "max_rows": 20_000,
        "adam_steps": 1500,
        "reg": "nuclear",
        "lam_frac": 0.2,
        "max_input_dim": 10,
        "max_output_dim": 8,
        "output_variance": 0.99,
        "refit": True,
    }
    if quick:  # the same student from 20 images per class (CI-sized)
        return {**digits, "samples_per_class": 20, "max_rows": 2000, "adam_steps": 300}
    if fallback:
        return digits
    # The shipped Fashion-MNIST teacher: all training images, fitted to the logits (the
    # suffix is linear), sized for the 5-minute budget on 2 CPU cores and for a student under
    # 1/4 of the teacher block (measured, see the README's "Objectives"): 16 input PCA
    # dimensions (the input projection is counted), `nuclear` at 0.03 λ_max (11,128
    # parameters, 0.897; 6,162 and 0.878 at 0.1 λ_max), then a least-squares refit of the
    # output layer on the same objective.
    return {
        "samples_per_class": None,
        "gates": 128,
        "max_rows": 40_000,
        "adam_steps": 1000,
        "reg": "nuclear",
        "lam_frac": 0.03,
        "max_input_dim": 16,
        "max_output_dim": 10,
        "output_variance": 0.99,
        "refit": True,
    }


def run_demo(args: argparse.Namespace) -> int:
    from cvxdist.baselines import (
        AdamConfig,
        matched_hidden,
        relu_student_variables,
        train_relu_head,
    )
    from cvxdist.data import DatasetNotFoundError
    from cvxdist.distill.evaluation import evaluate_spliced
    from cvxdist.distill.io import check_output_dir, save_students, staged_output, teacher_record
    from cvxdist.distill.pipeline import DistillConfig, prepare_block, solve_prepared
    from cvxdist.distill.student import BlockStudent, parameter_count
    from cvxdist.export import demo_onnx_record
    from cvxdist.teachers import shipped_teachers

    check_output_dir(args.out)
    quiet = args.quiet
    note = None
    name = args.teacher or (DEMO_FALLBACK if args.quick else DEMO_TEACHER)
    if name == DEMO_TEACHER and DEMO_TEACHER not in shipped_teachers():
        name, note = DEMO_FALLBACK, f"the shipped teacher {DEMO_TEACHER!r} is missing"
    try:
        teacher, train, test = load_teacher_and_data(name, None, None)
    except DatasetNotFoundError as err:
        if name != DEMO_TEACHER:
            raise
        note = f"Fashion-MNIST is not installed ({err}); using scikit-learn's digits instead"
        name = DEMO_FALLBACK
        teacher, train, test = load_teacher_and_data(name, None, None)
    if note:
        _say(False, f"cvxdist demo: {note}")
    settings = _demo_settings(args.quick, name == DEMO_FALLBACK)
    per_class = args.samples_per_class
    if per_class is None:  # (0 is bad input, refused by _subset, not "the default")
        per_class = settings["samples_per_class"]
    subset = _subset(train, per_class, args.seed)
    cut = _default_cut(teacher)
    distill_keys = (
        "gates",
        "max_rows",
        "reg",
        "lam_frac",
        "max_input_dim",
        "max_output_dim",
        "output_variance",
        "refit",
    )
    config = DistillConfig(
        cut=cut, seed=args.seed, **{k: settings[k] for k in distill_keys if k in settings}
    )
    _say(quiet, f"teacher {teacher.name}: distilling {cut} from {len(subset)} images")
    start = time.perf_counter()
    block = prepare_block(teacher, subset.images, cut, config, progress=not quiet)
    prepare_time = time.perf_counter() - start
    start = time.perf_counter()
    convex = solve_prepared(
        teacher, block, config, (config.lam_frac,), progress=not quiet, log=lambda m: _say(quiet, m)
    )
    convex_time = time.perf_counter() - start + prepare_time
    # The non-convex student: same rows, same reductions, same parameter count, Adam.
    info = block.row_info
    shared = convex.report["params"] - _gated_core_params(convex)
    hidden = matched_hidden(
        convex.report["params"], block.rows.shape[1], block.targets.shape[1], shared
    )
    start = time.perf_counter()
    params, adam = train_relu_head(
        block.terms,
        hidden,
        AdamConfig(steps=settings["adam_steps"], seed=args.seed),
        skip=block.skip,
        progress=not quiet,
    )
    module, variables = relu_student_variables(
        params,
        block.reduction,
        in_channels=int(info["input_shape"][-1]),
        out_channels=int(info["output_shape"][-1]),
        kernel_size=int(info["kernel_size"]),
        stride=int(info["stride"]),
    )
    relu_time = time.perf_counter() - start + prepare_time
    relu = BlockStudent(
        cut, module, variables, {"params": parameter_count(variables), "adam": adam}
    )
    _say(quiet, "evaluating on the test split")
    rows = []
    for method, student, seconds in (
        ("convex (gated ReLU, certified)", convex, convex_time),
        ("non-convex (ReLU, Adam)", relu, relu_time),
    ):
        metrics = evaluate_spliced(teacher, [student], cut, None, test.images, test.labels)
        rows.append({"method": method, "time_s": seconds, **metrics})
    result = {
        "teacher": teacher.name,
        "dataset": train.name,
        "cut": cut,
        "note": note,
        "teacher_accuracy": rows[0]["teacher_accuracy"],
        "teacher_block_params": rows[0]["teacher_block_params"],
        "samples_per_class": per_class,
        "train_images": len(subset),
        "students": rows,
        "convex_solve": {k: v for k, v in convex.report.items() if k != "path"},
        "adam": {k: v for k, v in adam.items() if k != "history"},
    }
    with staged_output(args.out) as tmp:
        save_students(tmp, [convex], {**teacher_record(name, teacher), "cut": cut, "to": cut})
        _say(quiet, "exporting the teacher and the compressed network to ONNX")
        result["onnx"] = demo_onnx_record(teacher, [convex], cut, None, test.images, tmp)
        (tmp / "result.json").write_text(json.dumps(result, indent=2, default=_json) + "\n")
        (tmp / "table.md").write_text(demo_table(result))
    print(demo_table(result))
    return 0


def _gated_core_params(student: Any) -> int:
    """Parameters of the gated layers proper (gates, both layers), without the reductions."""
    params = student.variables["params"]
    return sum(int(np.size(params[k])) for k in ("gates", "w_in", "w_out") if k in params)


def demo_table(result: dict[str, Any]) -> str:
    """Markdown table of teacher vs students."""
    lines = [
        f"Teacher `{result['teacher']}` on {result['dataset']}, stage `{result['cut']}` "
        f"replaced, {result['train_images']} training images, no labels, no fine-tuning.",
        "",
        "| model | test accuracy | agreement | block params | block FLOPs | time (s) |",
        "|---|---|---|---|---|---|",
        f"| teacher | {result['teacher_accuracy']:.4f} | 1.0000 | "
        f"{result['teacher_block_params']} | "
        f"{result['students'][0]['teacher_block_flops']:.3g} | |",
    ]
    for row in result["students"]:
        lines.append(
            f"| {row['method']} | {row['accuracy']:.4f} | {row['agreement']:.4f} | "
            f"{row['block_params']} | {row['block_flops']:.3g} | {row['time_s']:.1f} |"
        )
    from cvxdist.export import onnx_table

    return "\n".join(lines) + "\n" + onnx_table(result.get("onnx", {}))
