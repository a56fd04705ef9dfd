"""One point of E1, E2 or E4: every method on one block, size, sample count and seed.

Every method sees the same rows and targets (``prepare_block``), fits the same squared loss in
the same reduced coordinates and is matched to the convex student's parameter count (gates and
reductions included); all are evaluated on the same test images by the library's
:class:`~cvxdist.distill.evaluation.SplicedEvaluator`. E3 lives in :mod:`.timing`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.distill.grid import DEFAULT_OBJECTIVE, EVALUATED, Grid


class Context:
    """Teacher, data and the test-set evaluator shared by every point of a grid."""

    def __init__(self, grid: Grid, log: Callable[[str], None]) -> None:
        from cvxdist.data import load_dataset
        from cvxdist.distill.evaluation import SplicedEvaluator
        from cvxdist.teachers import load_teacher

        self.grid = grid
        self.log = log
        self.teacher = load_teacher(grid.teacher)
        self.train = load_dataset(self.teacher.dataset, "train")
        test = load_dataset(self.teacher.dataset, "test")
        limit = grid.test_limit
        if limit is not None and limit < len(test):
            test = test.take(np.sort(np.random.default_rng(1234).permutation(len(test))[:limit]))
        self.test = test
        self.stages = [c for c in self.teacher.cuts if c not in ("stem", "head")]
        self.evaluator = SplicedEvaluator(self.teacher, test.images, test.labels, block_images=None)
        self._logits_of: np.ndarray | None = None
        self._logits = np.zeros((0,))

    def subset(self, per_class: int | None, seed: int) -> np.ndarray:
        from cvxdist.data import samples_per_class

        return samples_per_class(self.train, per_class, seed).images

    def train_logits(self, images: np.ndarray) -> np.ndarray:
        """The teacher's logits on a training subset (cached: the full set is reused)."""
        if self._logits_of is not images:  # identity (the reference keeps it alive)
            self._logits = self.teacher.predict(images, batch_size=500)
            self._logits_of = images
        return self._logits

    @property
    def teacher_accuracy(self) -> float:
        return float(np.mean(self.evaluator.teacher_pred == self.test.labels))

    def evaluate(self, students: Sequence[Any], cut: str, to: str | None) -> dict[str, Any]:
        """Test accuracy, agreement with the teacher, block-output relative MSE and size."""
        metrics = self.evaluator(students, cut, to)
        return {key: metrics[key] for key in EVALUATED}


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers


def config_of(settings: dict[str, Any], **overrides: Any) -> Any:
    """The ``DistillConfig`` of a point (``max_rows`` ``None``: every location of every image).

    Raises:
        ValueError: an objective this version of the pipeline does not offer.
    """
    from cvxdist.distill.pipeline import DistillConfig

    size = settings.get("size")
    max_rows = settings["max_rows"]
    fields: dict[str, Any] = {
        "cut": settings["cut"],
        "to": settings["to"],
        "reg": settings["reg"],
        "tol": settings["tol"],
        "max_iters": settings["max_iters"],
        "max_rows": sys.maxsize if max_rows is None else max_rows,
        "seed": settings["seed"],
    }
    fields["objective"] = settings.get("objective", DEFAULT_OBJECTIVE)
    if size is not None:
        fields.update(
            gates=size["gates"],
            lam_frac=size["lam_frac"],
            input_variance=1.0,
            max_input_dim=size["input_dim"],
            output_variance=1.0,
            max_output_dim=size["output_dim"],
        )
    fields.update(overrides)
    return DistillConfig(**fields)


def adam_config(
    settings: dict[str, Any], mini_batch: bool = False, steps: int | None = None
) -> Any:
    from cvxdist.baselines import AdamConfig

    return AdamConfig(
        steps=steps or settings["adam_steps"],
        learning_rate=settings["adam_lr"],
        batch_size=settings["adam_batch"] if mini_batch else None,
        seed=settings["seed"],
    )


def kd_config(settings: dict[str, Any]) -> Any:
    from cvxdist.baselines import KDConfig

    return KDConfig(
        steps=settings["kd_steps"],
        learning_rate=settings["kd_lr"],
        batch_size=settings["kd_batch"],
        temperature=settings["kd_temperature"],
        seed=settings["seed"],
    )


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def squared_loss(pred: Any, targets: np.ndarray) -> float:
    """``1/(2N) ||pred - targets||²`` over rows ``(N, c)``: the loss every method fits."""
    return float(0.5 * np.mean(np.sum((np.asarray(pred) - targets) ** 2, axis=-1)))


def gated_loss(student: Any, block: Any) -> float:
    """:func:`squared_loss` of a gated student (convex, polished) on ``block``'s reduced rows,
    through the library's gated forward :func:`cvxdist.mapping.predict`."""
    import jax.numpy as jnp

    from cvxdist.mapping import GatedNetwork, predict

    p = student.variables["params"]
    net = GatedNetwork(
        p["gates"],
        jnp.asarray(student.module.neuron_gate, jnp.int32),
        p["w_in"],
        p["w_out"],
        p.get("skip"),
        p["bias"],
    )
    out = np.asarray(predict(net, block.rows))
    if student.module.reduced_out is None:  # the targets were centred, the bias was not
        out = out - block.reduction.out_mean
    return squared_loss(out, block.targets)


def convex_summary(student: Any) -> dict[str, Any]:
    keys = ("lam", "iterations", "rel_gap", "converged", "active_gates", "neurons", "params")
    out = {k: student.report[k] for k in keys if k in student.report}
    out.update(
        input_dim=student.report.get("input_dim"),
        output_dim=student.report.get("output_dim"),
        gates_distinct=student.report.get("gates_distinct"),
        solve_time_s=student.report.get("solve_time_s"),
        rows=student.report.get("rows"),
    )
    if "polish" in student.report:
        out["polish"] = {k: v for k, v in student.report["polish"].items() if k != "gates"}
    return out


def adam_summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("loss", "train_time_s", "compile_time_s", "steps", "batch_size", "learning_rate")
    return {k: report[k] for k in keys if k in report}


# ----------------------------------------------------------------------------- E1, E2


def run_block_point(ctx: Context, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """E1/E2: every method on the stages ``cut..to`` at one size and seed."""
    from cvxdist import baselines as B
    from cvxdist.distill.pipeline import prepare_block, solve_prepared, stages_of

    teacher, methods = ctx.teacher, settings["methods"]
    cut, to = settings["cut"], settings["to"]
    stages = stages_of(teacher, cut, to)
    images = ctx.subset(settings["samples_per_class"], settings["seed"])
    config = config_of(settings)
    blocks, convex, prep_time, convex_time = [], [], 0.0, 0.0
    for stage in stages:  # the convex chain: each stage on the outputs of the solved ones
        block, seconds = timed(
            lambda s=stage: prepare_block(teacher, images, s, config, convex, progress=False)
        )
        prep_time += seconds
        student, seconds = timed(
            lambda b=block: solve_prepared(
                teacher, b, config, (config.lam_frac,), convex, None, False
            )
        )
        convex_time += seconds
        blocks.append(block)
        convex.append(student)
    budgets = [s.report["params"] for s in convex]
    results = []

    def add(method: str, students: list[Any], seconds: float, extra: dict[str, Any]) -> None:
        metrics = ctx.evaluate(students, cut, to)
        results.append({"method": method, **metrics, "time_s": seconds, **extra})
        ctx.log(
            f"    {method:16s} acc {metrics['accuracy']:.4f} params {metrics['block_params']:6d}"
            f" ({seconds:.1f} s)"
        )

    add(
        "convex",
        convex,
        convex_time,
        {
            "prepare_s": prep_time,
            "loss": sum(gated_loss(s, b) for s, b in zip(convex, blocks)),
            "stages": [convex_summary(s) for s in convex],
        },
    )
    adam_methods = {
        "relu-adam": lambda b, i: B.relu_block_student(b, budgets[i], adam_config(settings)),
        "relu-adam-mb": lambda b, i: B.relu_block_student(
            b, budgets[i], adam_config(settings, mini_batch=True)
        ),
        "fixed-gate-adam": lambda b, i: B.fixed_gate_block_student(
            b, convex[i], adam_config(settings)
        ),
    }
    for method, train in adam_methods.items():
        if method not in methods:
            continue
        start = time.perf_counter()
        done: list[Any] = []
        for i, stage in enumerate(stages):
            block = blocks[i]
            if done:  # rows through this method's own earlier students, shared reduction
                block = prepare_block(
                    teacher, images, stage, config, done, False, reduction=blocks[i].reduction
                )
            done.append(train(block, i))
        adam = [s.report["adam"] for s in done]  # its loss: on the rows it was trained on
        add(
            method,
            done,
            time.perf_counter() - start,
            {"loss": sum(r["loss"] for r in adam), "adam": [adam_summary(r) for r in adam]},
        )
    if "logit-kd" in methods:
        students, seconds = timed(
            lambda: B.kd_students(
                teacher,
                images,
                cut,
                to,
                blocks,
                budgets,
                kd_config(settings),
                teacher_logits=ctx.train_logits(images),
            )
        )
        report = students[0].report["kd"]
        add("logit-kd", students, seconds, {"kd_loss": report["loss"], **adam_summary(report)})
    if "pruning" in methods:
        pruned, seconds = timed(lambda: B.pruned_block(teacher, cut, to, sum(budgets)))
        extra = {k: v for k, v in pruned.report.items() if k not in ("method", "params")}
        add("pruning", [pruned], seconds, extra)
    return results


# ----------------------------------------------------------------------------- E4


def run_e4_point(ctx: Context, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """E4: the head student (pooled features -> logits), with and without polishing."""
    from cvxdist import baselines as B
    from cvxdist.distill.pipeline import prepare_block, solve_prepared

    teacher, cut = ctx.teacher, settings["cut"]
    images = ctx.subset(settings["samples_per_class"], settings["seed"])
    config = config_of(
        settings, gates=settings["gates"], lam_frac=settings["lam_frac"], head_student=True
    )
    stage = f"{cut}..head"
    block, prep = timed(lambda: prepare_block(teacher, images, stage, config, progress=False))
    results = []
    for method, polish in (("convex", False), ("convex+polish", True)):
        cfg = dataclasses.replace(config, polish=polish)
        student, seconds = timed(
            lambda c=cfg: solve_prepared(teacher, block, c, (c.lam_frac,), progress=False)
        )
        metrics = ctx.evaluate([student], cut, "head")
        results.append(
            {
                "method": method,
                **metrics,
                "time_s": seconds,
                "prepare_s": prep,
                "loss": gated_loss(student, block),
                "stages": [convex_summary(student)],
            }
        )
        if not polish:
            budget = student.report["params"]
    relu, seconds = timed(lambda: B.relu_block_student(block, budget, adam_config(settings)))
    metrics = ctx.evaluate([relu], cut, "head")
    adam = relu.report["adam"]
    results.append(
        {
            "method": "relu-adam",
            **metrics,
            "time_s": seconds,
            "loss": adam["loss"],
            "adam": [adam_summary(adam)],
        }
    )
    for r in results:
        ctx.log(f"    {r['method']:16s} acc {r['accuracy']:.4f} params {r['block_params']}")
    return results
