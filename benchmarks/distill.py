"""`cvxdist bench distill`: convex block distillation against its baselines (DESIGN §5-6).

Experiments (each point: one seed; the seed changes the gates, the training subset, the row
subsample and the Adam initialisations; tables give mean ± std over seeds):

* **E1** accuracy vs student size (a ladder of gates / reduced dimensions / λ) for the last
  stage, the one before it, and both (the second solved on the outputs of the first);
* **E2** accuracy vs samples per class (the last stage, one size);
* **E3** distillation loss and accuracy vs wall time: the convex solver(s) run to a series of
  duality-gap tolerances (each solve from scratch, compiled beforehand) against the loss
  curves of Adam (learned ReLU full batch and mini-batch, fixed gates), compilation excluded;
* **E4** the two-layer head student on pooled features, with and without polishing.

Methods (same block, same rows and targets from ``prepare_block``, same squared loss, sizes
matched to the convex student's parameter count with gates and reductions included): the
convex student; ``relu-adam`` / ``relu-adam-mb`` (learned ReLU, Adam, full / mini-batch);
``fixed-gate-adam`` (the convex student's gated network trained by Adam); ``logit-kd``
(Hinton logit distillation of learned-ReLU blocks, label-free); ``pruning`` (global magnitude
pruning of the teacher block's conv kernels, no fine-tuning). See :mod:`cvxdist.baselines`.

The grid is resumable: every finished point is written to ``OUT/records/<key>.json`` (the key
hashes the teacher checkpoint and every setting the point depends on) and skipped when the
harness runs again. ``OUT/distill.json`` gathers the records, the summary and the machine;
``OUT/REPORT.md`` and ``OUT/*.png`` are the tables and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import fmt, load_average, machine_description, markdown_table, write_json

VERSION = 1
EXPERIMENTS = ("E1", "E2", "E3", "E4")
METHODS = ("convex", "relu-adam", "relu-adam-mb", "fixed-gate-adam", "logit-kd", "pruning")
E1_METHODS = ("convex", "relu-adam", "fixed-gate-adam", "logit-kd", "pruning")
E4_METHODS = ("convex", "convex+polish", "relu-adam")
LABELS = {
    "convex": "convex (certified)",
    "convex+polish": "convex + polish",
    "relu-adam": "ReLU, Adam (full batch)",
    "relu-adam-mb": "ReLU, Adam (mini-batch)",
    "fixed-gate-adam": "fixed gates, Adam",
    "logit-kd": "logit KD (Hinton)",
    "pruning": "magnitude pruning",
}


@dataclasses.dataclass(frozen=True)
class Size:
    """One rung of the student-size ladder."""

    name: str
    gates: int
    input_dim: int
    output_dim: int
    lam_frac: float


@dataclasses.dataclass(frozen=True)
class Grid:
    """Everything the harness runs (a point's record key hashes the fields it depends on)."""

    teacher: str
    seeds: tuple[int, ...]
    max_rows: int
    test_limit: int | None
    # ``coupled`` (group lasso): the nuclear norm's batched SVDs can deadlock jaxlib 0.10's
    # CPU LAPACK kernels on a 2-thread pool (see REPORT.md); override per grid if unaffected.
    reg: str = "coupled"
    tol: float = 1e-3
    max_iters: int = 3000
    adam_steps: int = 2000
    adam_lr: float = 3e-3
    adam_batch: int = 1024
    kd_steps: int = 1000
    kd_lr: float = 1e-3
    kd_batch: int = 128
    kd_temperature: float = 4.0
    e1_blocks: tuple[str, ...] = ("last", "previous", "both")
    e1_sizes: tuple[Size, ...] = ()
    e1_samples: int | None = 100
    e1_methods: tuple[str, ...] = METHODS
    e2_samples: tuple[int | None, ...] = (1, 10, 25, 100, None)
    e2_size: Size | None = None
    e2_methods: tuple[str, ...] = METHODS
    e3_samples: int | None = 100
    e3_size: Size | None = None
    e3_tols: tuple[float, ...] = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4)
    e3_adam_steps: int = 3000
    e3_methods: tuple[str, ...] = ("relu-adam", "relu-adam-mb", "fixed-gate-adam")
    e4_samples: tuple[int | None, ...] = (10, 100)
    e4_gates: int = 64
    e4_lam_frac: float = 0.01


def quick_grid() -> Grid:
    """Digits teacher, tiny sizes, two seeds (CI: a couple of minutes on two cores)."""
    small = Size("S", gates=8, input_dim=12, output_dim=8, lam_frac=0.05)
    medium = Size("M", gates=16, input_dim=24, output_dim=12, lam_frac=0.02)
    return Grid(
        teacher="digits-cnn",
        seeds=(0, 1),
        max_rows=600,
        test_limit=None,
        adam_steps=200,
        adam_batch=128,
        kd_steps=100,
        kd_batch=64,
        e1_sizes=(small, medium),
        e1_samples=10,
        e1_methods=("convex", "relu-adam", "pruning"),
        e2_samples=(1, 10),
        e2_size=medium,
        e2_methods=("convex", "relu-adam", "fixed-gate-adam", "logit-kd"),
        e3_samples=10,
        e3_size=medium,
        e3_tols=(1e-1, 1e-3),
        e3_adam_steps=200,
        e4_samples=(10,),
        e4_gates=16,
    )


def full_grid(teacher: str) -> Grid:
    """The measured grid: three seeds, sizes up to the teacher block's."""
    if teacher == "digits-cnn":
        sizes = (
            Size("XS", gates=8, input_dim=8, output_dim=6, lam_frac=0.05),
            Size("S", gates=16, input_dim=16, output_dim=8, lam_frac=0.03),
            Size("M", gates=32, input_dim=24, output_dim=12, lam_frac=0.02),
        )
        return Grid(
            teacher=teacher,
            seeds=(0, 1, 2),
            max_rows=4000,
            test_limit=None,
            adam_steps=1000,
            kd_steps=300,
            kd_batch=64,
            e1_sizes=sizes,
            e1_methods=E1_METHODS,
            e1_samples=None,
            e2_size=sizes[2],
            e3_samples=None,
            e3_size=sizes[2],
        )
    sizes = (
        Size("XS", gates=8, input_dim=12, output_dim=8, lam_frac=0.01),
        Size("S", gates=16, input_dim=16, output_dim=8, lam_frac=0.01),
        Size("M", gates=32, input_dim=24, output_dim=12, lam_frac=0.01),
    )
    return Grid(
        teacher=teacher,
        seeds=(0, 1, 2),
        max_rows=4000,
        test_limit=3000,
        adam_steps=1000,
        kd_steps=300,
        kd_batch=64,
        e1_sizes=sizes,
        e1_methods=("convex", "relu-adam", "logit-kd", "pruning"),  # fixed gates: E2, E3
        e1_samples=100,
        e2_size=sizes[1],
        e3_samples=100,
        e3_size=sizes[1],
        e3_adam_steps=2000,
        e4_samples=(10, 100),
    )


def default_teacher() -> str:
    """The shipped Fashion-MNIST ResNet when it and its dataset are installed, else digits."""
    from cvxdist.data import DatasetNotFoundError, load_dataset
    from cvxdist.teachers import shipped_teachers

    if "fashion-resnet20" not in shipped_teachers():
        return "digits-cnn"
    try:
        load_dataset("fashion_mnist", "test")
    except DatasetNotFoundError:
        return "digits-cnn"
    return "fashion-resnet20"


def select_problems(quick: bool, only: Sequence[str] | None = None) -> tuple[str, ...]:
    """The experiments to run (``only``: names such as ``E1``; case-insensitive)."""
    del quick
    if not only:
        return EXPERIMENTS
    chosen = tuple(dict.fromkeys(name.upper() for name in only))
    unknown = [name for name in chosen if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(
            f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}"
        )
    return chosen


# ----------------------------------------------------------------------------- context


class Context:
    """Teacher, data, test-set evaluation with cached activations, and counters."""

    def __init__(self, grid: Grid, log: Callable[[str], None]) -> None:
        from cvxdist.data import load_dataset
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
        self._teacher_pred: np.ndarray | None = None
        self._prefix: dict[str, np.ndarray] = {}
        self._block_out: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
        self._forward: dict[tuple, Callable] = {}
        self._logits_of: np.ndarray | None = None
        self._logits = np.zeros((0,))

    @property
    def last(self) -> str:
        return self.stages[-1]

    @property
    def previous(self) -> str:
        return self.stages[-2]

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
    def teacher_pred(self) -> np.ndarray:
        if self._teacher_pred is None:
            self._teacher_pred = self.teacher.predict(self.test.images).argmax(-1)
        return self._teacher_pred

    @property
    def teacher_accuracy(self) -> float:
        return float(np.mean(self.teacher_pred == self.test.labels))

    def _prefix_of(self, cut: str) -> np.ndarray:
        from cvxdist.teachers import batched_apply

        if cut not in self._prefix:
            fn = self.teacher.cut_functions(cut).prefix
            out = batched_apply(fn, self.teacher.variables, self.test.images, 500)
            self._prefix[cut] = np.concatenate(list(out))
        return self._prefix[cut]

    def _teacher_block(self, cut: str, last: str) -> tuple[np.ndarray, float]:
        import jax

        from cvxdist.teachers import batched_apply

        if (cut, last) not in self._block_out:
            fn = jax.jit(self.teacher.cut_functions(cut, last, jit=False).block)
            z = self._prefix_of(cut)
            y = np.concatenate(list(batched_apply(fn, self.teacher.variables, z, 500)))
            flat = y.reshape(-1, y.shape[-1]).astype(np.float64)
            spread = float(np.sum((flat - flat.mean(axis=0)) ** 2))
            self._block_out[(cut, last)] = (y, spread)
        return self._block_out[(cut, last)]

    def evaluate(self, students: Sequence[Any], cut: str, to: str | None) -> dict[str, Any]:
        """Test accuracy, agreement with the teacher, block-output relative MSE and size."""
        import jax

        from cvxdist.distill.pipeline import chain, stages_of

        last = stages_of(self.teacher, cut, to)[-1]
        key = (cut, last, tuple(s.module for s in students))
        forward = self._forward.get(key)
        if forward is None:  # one compilation per student architecture, not per call
            fns = self.teacher.cut_functions(cut, last, jit=False)
            tv = self.teacher.variables
            run = chain(students)

            @jax.jit
            def forward(sv: Any, batch: tuple) -> tuple:
                z, y = batch
                out = run(sv, z)
                err = ((out - y) ** 2).reshape(out.shape[0], -1).sum(axis=1)
                return fns.suffix(tv, out), err

            self._forward[key] = forward
        y_teacher, spread = self._teacher_block(cut, last)
        z = self._prefix_of(cut)
        sv = [s.variables for s in students]
        logits, errors = [], []
        for lg, err in _batched(forward, sv, (z, y_teacher), 500):
            logits.append(lg)
            errors.append(err)
        pred = np.concatenate(logits).argmax(-1)
        params = int(sum(s.report["params"] for s in students))
        teacher_params = self.teacher.block_params(cut, last)
        return {
            "accuracy": float(np.mean(pred == self.test.labels)),
            "agreement": float(np.mean(pred == self.teacher_pred)),
            "block_rel_mse": float(np.sum(np.concatenate(errors), dtype=np.float64) / spread),
            "block_params": params,
            "teacher_block_params": teacher_params,
            "compression": teacher_params / max(params, 1),
        }


def _batched(fn: Callable, variables: Any, arrays: tuple, size: int) -> Any:
    """``fn(variables, (a[i:i+size], ...))`` over aligned arrays, last batch padded."""
    n = len(arrays[0])
    size = max(1, min(size, n))
    for begin in range(0, n, size):
        parts = [a[begin : begin + size] for a in arrays]
        valid = len(parts[0])
        if valid < size:
            parts = [
                np.concatenate([p, np.zeros((size - valid, *p.shape[1:]), p.dtype)]) for p in parts
            ]
        out = fn(variables, tuple(parts))
        yield tuple(np.asarray(o)[:valid] for o in out)


# ----------------------------------------------------------------------------- records


def record_key(experiment: str, teacher_sha: str, settings: dict[str, Any]) -> str:
    text = json.dumps({"v": VERSION, "e": experiment, "t": teacher_sha, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # missing or half-written: recompute
    return record if record.get("complete") else None


def _adam_settings(grid: Grid) -> dict[str, Any]:
    return {
        "adam_steps": grid.adam_steps,
        "adam_lr": grid.adam_lr,
        "adam_batch": grid.adam_batch,
        "kd_steps": grid.kd_steps,
        "kd_lr": grid.kd_lr,
        "kd_batch": grid.kd_batch,
        "kd_temperature": grid.kd_temperature,
    }


def _common_settings(grid: Grid) -> dict[str, Any]:
    return {
        "teacher": grid.teacher,
        "max_rows": grid.max_rows,
        "test_limit": grid.test_limit,
        "reg": grid.reg,
        "tol": grid.tol,
        "max_iters": grid.max_iters,
    }


def points(grid: Grid, experiments: Sequence[str], stages: Sequence[str]) -> list[dict[str, Any]]:
    """Every point of the grid: ``{"experiment", "settings"}`` (settings are JSON)."""
    last, previous = stages[-1], stages[-2] if len(stages) > 1 else None
    common = _common_settings(grid)
    out = []
    if "E1" in experiments:
        named = {"last": (last, last)}
        if previous is not None:
            named.update(previous=(previous, previous), both=(previous, last))
        blocks = [named[name] for name in grid.e1_blocks if name in named]
        for cut, to in blocks:
            for size in grid.e1_sizes:
                for seed in grid.seeds:
                    settings = {
                        **common,
                        **_adam_settings(grid),
                        "cut": cut,
                        "to": to,
                        "size": dataclasses.asdict(size),
                        "samples_per_class": grid.e1_samples,
                        "methods": list(grid.e1_methods),
                        "seed": seed,
                    }
                    out.append({"experiment": "E1", "settings": settings})
    if "E2" in experiments and grid.e2_size is not None:
        for per_class in grid.e2_samples:
            for seed in grid.seeds:
                settings = {
                    **common,
                    **_adam_settings(grid),
                    "cut": last,
                    "to": last,
                    "size": dataclasses.asdict(grid.e2_size),
                    "samples_per_class": per_class,
                    "methods": list(grid.e2_methods),
                    "seed": seed,
                }
                out.append({"experiment": "E2", "settings": settings})
    if "E3" in experiments and grid.e3_size is not None:
        for seed in grid.seeds:
            settings = {
                **common,
                "adam_lr": grid.adam_lr,
                "adam_batch": grid.adam_batch,
                "adam_steps": grid.e3_adam_steps,
                "cut": last,
                "to": last,
                "size": dataclasses.asdict(grid.e3_size),
                "samples_per_class": grid.e3_samples,
                "tols": list(grid.e3_tols),
                "methods": list(grid.e3_methods),
                "seed": seed,
            }
            out.append({"experiment": "E3", "settings": settings})
    if "E4" in experiments:
        for per_class in grid.e4_samples:
            for seed in grid.seeds:
                settings = {
                    **common,
                    "adam_steps": grid.adam_steps,
                    "adam_lr": grid.adam_lr,
                    "cut": last,
                    "to": "head",
                    "gates": grid.e4_gates,
                    "lam_frac": grid.e4_lam_frac,
                    "samples_per_class": per_class,
                    "seed": seed,
                }
                out.append({"experiment": "E4", "settings": settings})
    return out


# ----------------------------------------------------------------------------- one point


def _config(settings: dict[str, Any], **overrides: Any) -> Any:
    from cvxdist.distill.pipeline import DistillConfig

    size = settings.get("size")
    fields: dict[str, Any] = {
        "cut": settings["cut"],
        "to": settings["to"],
        "reg": settings["reg"],
        "tol": settings["tol"],
        "max_iters": settings["max_iters"],
        "max_rows": settings["max_rows"],
        "seed": settings["seed"],
    }
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


def _adam(settings: dict[str, Any], mini_batch: bool = False, steps: int | None = None) -> Any:
    from cvxdist.baselines import AdamConfig

    return AdamConfig(
        steps=steps or settings["adam_steps"],
        learning_rate=settings["adam_lr"],
        batch_size=settings["adam_batch"] if mini_batch else None,
        seed=settings["seed"],
    )


def rows_through(
    teacher: Any, images: np.ndarray, stage: str, config: Any, replaced: Sequence[Any], block: Any
) -> Any:
    """``block``'s rows recomputed with the block input through ``replaced`` students.

    The targets (the teacher's own stage outputs), the row locations (seeded) and the
    reduction are ``block``'s: the students of a chain share coordinates.
    """
    from cvxdist.distill.pipeline import PreparedBlock, chain, collect_rows

    prefix = teacher.cut_functions(config.cut, jit=False).prefix
    run = chain(replaced)
    student_vars = [s.variables for s in replaced]

    def input_fn(variables: Any, x: Any) -> Any:
        return run(student_vars, prefix(variables, x))

    rows, targets, info = collect_rows(teacher, images, stage, input_fn, config, progress=False)
    reduction = block.reduction
    return PreparedBlock(stage, reduction.rows(rows), reduction.targets(targets), reduction, info)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _row_loss(student: Any, block: Any) -> float:
    """1/(2N)||student - target||² on the block's reduced rows (the loss every method fits)."""
    import jax.numpy as jnp

    p = student.variables["params"]
    a = jnp.asarray(block.rows)
    if "gates" in p:
        masks = (a @ p["gates"] >= 0)[:, jnp.asarray(student.module.neuron_gate, jnp.int32)]
        out = ((a @ p["w_in"]) * masks) @ p["w_out"] + p["bias"]
    else:
        out = jnp.maximum(a @ p["w_in"] + p["b_in"], 0) @ p["w_out"] + p["bias"]
    if "skip" in p:
        out = out + a @ p["skip"]
    if student.module.reduced_out is None:
        out = out - jnp.asarray(block.reduction.out_mean, out.dtype)
    return float(0.5 * jnp.mean(jnp.sum((out - jnp.asarray(block.targets)) ** 2, axis=-1)))


def run_block_point(ctx: Context, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """E1/E2: every method on the stages ``cut..to`` at one size and seed."""
    from cvxdist import baselines as B
    from cvxdist.distill.pipeline import prepare_block, solve_prepared, stages_of

    teacher, methods = ctx.teacher, settings["methods"]
    cut, to = settings["cut"], settings["to"]
    stages = stages_of(teacher, cut, to)
    images = ctx.subset(settings["samples_per_class"], settings["seed"])
    config = _config(settings)
    blocks, convex, prep_time, convex_time = [], [], 0.0, 0.0
    for stage in stages:  # the convex chain: each stage on the outputs of the solved ones
        block, seconds = _timed(
            lambda s=stage: prepare_block(teacher, images, s, config, convex, progress=False)
        )
        prep_time += seconds
        student, seconds = _timed(
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
            "loss": sum(_row_loss(s, b) for s, b in zip(convex, blocks)),
            "stages": [_convex_summary(s) for s in convex],
        },
    )
    adam_methods = {
        "relu-adam": lambda b, i, done: B.relu_block_student(b, budgets[i], _adam(settings)),
        "relu-adam-mb": lambda b, i, done: B.relu_block_student(
            b, budgets[i], _adam(settings, mini_batch=True)
        ),
        "fixed-gate-adam": lambda b, i, done: B.fixed_gate_block_student(
            b, convex[i], _adam(settings)
        ),
    }
    for method, train in adam_methods.items():
        if method not in methods:
            continue
        start = time.perf_counter()
        done: list[Any] = []
        loss = 0.0
        for i, stage in enumerate(stages):
            block = blocks[i]
            if done:  # rows through this method's own earlier students, shared reduction
                block = rows_through(teacher, images, stage, config, done, blocks[i])
            student = train(block, i, done)
            loss += _row_loss(student, block)
            done.append(student)
        add(
            method,
            done,
            time.perf_counter() - start,
            {"loss": loss, "adam": [_adam_summary(s.report["adam"]) for s in done]},
        )
    if "logit-kd" in methods:
        kd_config = B.KDConfig(
            steps=settings["kd_steps"],
            learning_rate=settings["kd_lr"],
            batch_size=settings["kd_batch"],
            temperature=settings["kd_temperature"],
            seed=settings["seed"],
        )
        students, seconds = _timed(
            lambda: B.kd_students(
                teacher,
                images,
                cut,
                to,
                blocks,
                budgets,
                kd_config,
                teacher_logits=ctx.train_logits(images),
            )
        )
        report = students[0].report["kd"]
        add("logit-kd", students, seconds, {"kd_loss": report["loss"], **_adam_summary(report)})
    if "pruning" in methods:
        pruned, seconds = _timed(lambda: B.pruned_block(teacher, cut, to, sum(budgets)))
        extra = {k: v for k, v in pruned.report.items() if k not in ("method", "params")}
        add("pruning", [pruned], seconds, extra)
    return results


def _convex_summary(student: Any) -> dict[str, Any]:
    keys = ("lam", "iterations", "rel_gap", "converged", "active_gates", "neurons", "params")
    out = {k: student.report[k] for k in keys if k in student.report}
    out.update(
        input_dim=student.report.get("input_dim"),
        output_dim=student.report.get("output_dim"),
        gates_distinct=student.report.get("gates_distinct"),
        solve_time_s=student.report.get("solve_time_s"),
    )
    if "polish" in student.report:
        out["polish"] = {k: v for k, v in student.report["polish"].items() if k != "gates"}
    return out


def _adam_summary(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("loss", "train_time_s", "compile_time_s", "steps", "batch_size", "learning_rate")
    return {k: report[k] for k in keys if k in report}


def run_e3_point(ctx: Context, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """E3: loss and accuracy vs wall time, convex solver(s) against Adam."""
    from cvxdist import baselines as B
    from cvxdist.distill.pipeline import BlockStudent, build_student, prepare_block, solve_block
    from cvxdist.mapping import predict_convex
    from cvxdist.solvers import SOLVERS

    teacher, cut = ctx.teacher, settings["cut"]
    images = ctx.subset(settings["samples_per_class"], settings["seed"])
    config = _config(settings)
    block = prepare_block(teacher, images, cut, config, progress=False)
    tols = sorted(settings["tols"], reverse=True)
    results = []
    final_convex = None
    for solver in sorted(SOLVERS):
        cfg = dataclasses.replace(config, solver=solver)
        try:  # compile once (tol is traced), not timed
            warm = time.perf_counter()
            solve_block(block.rows, block.targets, cfg, (cfg.lam_frac,), progress=False)
            compile_s = time.perf_counter() - warm
        except Exception as err:  # a solver that cannot take this problem is reported
            results.append({"method": f"convex-{solver}", "error": str(err)})
            continue
        curve = []
        for tol in tols:
            gates, [solution], _ = solve_block(
                block.rows, block.targets, dataclasses.replace(cfg, tol=tol), (cfg.lam_frac,), False
            )
            pred = np.asarray(predict_convex(solution, gates, block.rows))
            loss = float(0.5 * np.mean(np.sum((pred - block.targets) ** 2, axis=-1)))
            student = build_student(solution, gates, block.reduction, block.row_info, cut)
            metrics = ctx.evaluate([student], cut, None)
            curve.append(
                {
                    "tol": tol,
                    "time_s": float(solution.stats.time_s),
                    "iterations": int(solution.stats.iterations),
                    "rel_gap": float(solution.stats.rel_gap),
                    "objective": float(solution.stats.objective),
                    "loss": loss,
                    "accuracy": metrics["accuracy"],
                    "params": metrics["block_params"],
                }
            )
        final_convex = final_convex or (student, solution, gates)
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
    convex_student = final_convex[0]
    budget = convex_student.report["params"]
    steps = settings["adam_steps"]
    runs = {
        "relu-adam": lambda: B.relu_block_student(
            block, budget, _adam(settings, steps=steps), keep_params=True
        ),
        "relu-adam-mb": lambda: B.relu_block_student(
            block, budget, _adam(settings, mini_batch=True, steps=steps), keep_params=True
        ),
        "fixed-gate-adam": lambda: B.fixed_gate_block_student(
            block, convex_student, _adam(settings, steps=steps), keep_params=True
        ),
    }
    for method, train in runs.items():
        if method not in settings["methods"]:
            continue
        student = train()
        report = student.report["adam"]
        snapshots = report.pop("snapshots")
        curve = [dict(point) for point in report["curve"]]
        for i in _spread(len(curve), 6):
            if method == "fixed-gate-adam":
                variables = B.fixed_gate_variables(convex_student, snapshots[i], block.reduction)
            else:
                variables = B.relu_variables_like(student, snapshots[i], block.reduction)
            probe = BlockStudent(cut, student.module, variables, {"params": budget})
            curve[i]["accuracy"] = ctx.evaluate([probe], cut, None)["accuracy"]
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


def _spread(n: int, count: int) -> list[int]:
    """About ``count`` indices in ``range(n)``, log-spaced, always with the first and last."""
    if n <= count:
        return list(range(n))
    picks = {0, n - 1, *np.unique(np.geomspace(1, n - 1, count - 1).astype(int)).tolist()}
    return sorted(picks)


def run_e4_point(ctx: Context, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """E4: the head student (pooled features -> logits), with and without polishing."""
    from cvxdist import baselines as B
    from cvxdist.distill.pipeline import prepare_block, solve_prepared

    teacher, cut = ctx.teacher, settings["cut"]
    images = ctx.subset(settings["samples_per_class"], settings["seed"])
    config = _config(
        settings, gates=settings["gates"], lam_frac=settings["lam_frac"], head_student=True
    )
    stage = f"{cut}..head"
    block, prep = _timed(lambda: prepare_block(teacher, images, stage, config, progress=False))
    results = []
    for method, polish in (("convex", False), ("convex+polish", True)):
        cfg = dataclasses.replace(config, polish=polish)
        student, seconds = _timed(
            lambda c=cfg: solve_prepared(teacher, block, c, (c.lam_frac,), progress=False)
        )
        metrics = ctx.evaluate([student], cut, "head")
        results.append(
            {
                "method": method,
                **metrics,
                "time_s": seconds,
                "prepare_s": prep,
                "loss": _row_loss(student, block),
                "stages": [_convex_summary(student)],
            }
        )
        if not polish:
            budget = student.report["params"]
    relu, seconds = _timed(lambda: B.relu_block_student(block, budget, _adam(settings)))
    metrics = ctx.evaluate([relu], cut, "head")
    results.append(
        {
            "method": "relu-adam",
            **metrics,
            "time_s": seconds,
            "loss": _row_loss(relu, block),
            "adam": [_adam_summary(relu.report["adam"])],
        }
    )
    for r in results:
        ctx.log(f"    {r['method']:16s} acc {r['accuracy']:.4f} params {r['block_params']}")
    return results


RUNNERS = {"E1": run_block_point, "E2": run_block_point, "E3": run_e3_point, "E4": run_e4_point}


# ----------------------------------------------------------------------------- the harness


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    only: Sequence[str] | None = None,
    repeats: int | None = None,
    grid: Grid | None = None,
    log: Callable[[str], None] | None = None,
    keep_going: bool = True,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the grid; writes records, ``distill.json``, ``REPORT.md`` and plots.

    ``report_only`` computes nothing: the report covers the points already recorded (while a
    grid is still running, or after an interruption) and counts the others as ``missing``.

    ``repeats`` sets the number of seeds (``0..repeats-1``). Returns the payload, whose
    ``computed`` / ``reused`` count the points run now and the points read from records. With
    ``keep_going`` a point that raises is logged, listed in ``failed`` and left for the next
    run (no record is written); otherwise the error propagates.
    """
    if log is None:

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

    experiments = select_problems(quick, only)
    if grid is None:
        grid = quick_grid() if quick else full_grid(default_teacher())
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"repeats (seeds) must be at least 1, got {repeats}")
        grid = dataclasses.replace(grid, seeds=tuple(range(repeats)))
    out_dir = Path(out_dir)
    records_dir = out_dir / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description(("flax", "optax"))
    started = time.perf_counter()
    ctx = Context(grid, log)
    todo = points(grid, experiments, ctx.stages)
    records, computed, reused, missing = [], 0, 0, 0
    failed: list[dict[str, Any]] = []
    for index, point in enumerate(todo, 1):
        key = record_key(point["experiment"], ctx.teacher.checkpoint_sha256, point["settings"])
        path = records_dir / f"{key}.json"
        record = _load_record(path)
        if record is None and report_only:
            missing += 1
            continue
        if record is None:
            s = point["settings"]
            size = s.get("size", {}).get("name", "") if isinstance(s.get("size"), dict) else ""
            log(
                f"[{index}/{len(todo)}] {point['experiment']} {s['cut']}..{s['to']} {size} "
                f"samples/class={s['samples_per_class']} seed={s['seed']}"
            )
            start = time.perf_counter()
            try:
                results = RUNNERS[point["experiment"]](ctx, point["settings"])
            except Exception as err:  # a failed point is retried on the next run
                if not keep_going:
                    raise
                log(f"    FAILED: {type(err).__name__}: {err}")
                failed.append({"key": key, **point, "error": f"{type(err).__name__}: {err}"})
                continue
            record = {
                "key": key,
                "version": VERSION,
                **point,
                "teacher_checkpoint_sha256": ctx.teacher.checkpoint_sha256,
                "teacher_accuracy": ctx.teacher_accuracy,
                "test_images": len(ctx.test),
                "results": results,
                "time_s": time.perf_counter() - start,
                "finished_utc": _now(),
                "load_average": load_average(),
                "complete": True,
            }
            write_json(path, record)
            computed += 1
        else:
            reused += 1
        records.append(record)
    payload = {
        "benchmark": "distill",
        "quick": quick,
        "experiments": list(experiments),
        "grid": dataclasses.asdict(grid),
        "teacher": {
            "name": ctx.teacher.name,
            "dataset": ctx.teacher.dataset,
            "checkpoint_sha256": ctx.teacher.checkpoint_sha256,
            "test_accuracy": ctx.teacher_accuracy,
            "test_images": len(ctx.test),
            "params": ctx.teacher.info.get("params"),
            "stages": ctx.stages,
            "block_params": {s: ctx.teacher.block_params(s) for s in ctx.stages},
        },
        "machine": machine,
        "load_average_at_end": load_average(),
        "computed": computed,
        "reused": reused,
        "missing": missing,
        "failed": failed,
        "wall_time_s": time.perf_counter() - started,
        "records": records,
    }
    payload["summary"] = summarize(payload)
    write_json(out_dir / "distill.json", payload)
    plots = make_plots(payload, out_dir)
    (out_dir / "REPORT.md").write_text(markdown_report(payload, plots), encoding="utf-8")
    return payload


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _group(records: Sequence[dict[str, Any]], experiment: str, fields: Sequence[str]) -> dict:
    """``{(field values..., method): [result, ...]}`` over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        if record["experiment"] != experiment:
            continue
        s = record["settings"]
        base = tuple(json.dumps(s.get(f), sort_keys=True) for f in fields)
        for result in record["results"]:
            groups.setdefault((*base, result["method"]), []).append(result)
    return groups


def _aggregate(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": len(results)}
    for key in keys:
        mean, std = _mean_std([r.get(key) for r in results])
        out[key] = {"mean": mean, "std": std}
    return out


METRICS = (
    "accuracy",
    "agreement",
    "block_rel_mse",
    "block_params",
    "teacher_block_params",
    "compression",
    "time_s",
)


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std tables per experiment and the checks against the issue's targets."""
    records = payload["records"]
    teacher_acc = payload["teacher"]["test_accuracy"]
    summary: dict[str, Any] = {"teacher_accuracy": teacher_acc}
    e1 = []
    for key, results in _group(records, "E1", ("cut", "to", "size")).items():
        cut, to, size, method = json.loads(key[0]), json.loads(key[1]), json.loads(key[2]), key[3]
        e1.append(
            {
                "cut": cut,
                "to": to,
                "size": size["name"],
                "method": method,
                **_aggregate(results, METRICS),
            }
        )
    summary["E1"] = e1
    e2 = []
    for key, results in _group(records, "E2", ("samples_per_class",)).items():
        e2.append(
            {
                "samples_per_class": json.loads(key[0]),
                "method": key[1],
                **_aggregate(results, METRICS),
            }
        )
    summary["E2"] = e2
    e4 = []
    for key, results in _group(records, "E4", ("samples_per_class",)).items():
        e4.append(
            {
                "samples_per_class": json.loads(key[0]),
                "method": key[1],
                **_aggregate(results, METRICS),
            }
        )
    summary["E4"] = e4
    summary["E3"] = _summarize_e3(records)
    summary["targets"] = _targets(summary, teacher_acc, payload["teacher"])
    return summary


def _summarize_e3(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per seed: Adam's final loss and time, and when each convex solver first reached it."""
    per_seed = []
    for record in records:
        if record["experiment"] != "E3":
            continue
        by_method = {r["method"]: r for r in record["results"] if "curve" in r}
        adam = by_method.get("relu-adam")
        entry: dict[str, Any] = {"seed": record["settings"]["seed"]}
        if adam is not None:
            entry.update(adam_loss=adam["loss"], adam_time_s=adam["train_time_s"])
            entry["adam_accuracy"] = adam["accuracy"]
        for method, result in by_method.items():
            if not method.startswith("convex"):
                continue
            entry[method] = {
                "final_loss": result["loss"],
                "final_time_s": result["curve"][-1]["time_s"],
                "final_accuracy": result["accuracy"],
            }
            for name in ("relu-adam", "relu-adam-mb", "fixed-gate-adam"):
                other = by_method.get(name)
                if other is None:
                    continue
                reach = [p for p in result["curve"] if p["loss"] <= other["loss"]]
                time_to = reach[0]["time_s"] if reach else None
                entry[method][f"time_to_{name}_loss_s"] = time_to
                entry[method][f"ratio_to_{name}"] = (
                    None if time_to is None else time_to / max(other["train_time_s"], 1e-12)
                )
        convex_losses = [r["loss"] for m, r in by_method.items() if m.startswith("convex")]
        target = min(convex_losses) if convex_losses else None
        runs = {}
        for name in ("relu-adam", "relu-adam-mb", "fixed-gate-adam"):
            other = by_method.get(name)
            if other is None:
                continue
            reach = [p for p in other["curve"] if target is not None and p["loss"] <= target]
            runs[name] = {
                "final_loss": other["loss"],
                "train_time_s": other["train_time_s"],
                "accuracy": other["accuracy"],
                "time_to_convex_loss_s": reach[0]["time_s"] if reach else None,
            }
        entry["adam_runs"] = runs
        per_seed.append(entry)
    return {"per_seed": per_seed}


def _find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _targets(summary: dict[str, Any], teacher_acc: float, teacher: dict[str, Any]) -> dict:
    targets: dict[str, Any] = {}
    convex = _find(summary["E2"], samples_per_class=10, method="convex")
    relu = _find(summary["E2"], samples_per_class=10, method="relu-adam")
    if convex and relu:
        gap = convex["accuracy"]["mean"] - relu["accuracy"]["mean"]
        std = math.hypot(convex["accuracy"]["std"], relu["accuracy"]["std"])
        targets["E2_10_per_class"] = {
            "convex_minus_relu_adam_points": 100 * gap,
            "std_points": 100 * std,
            "target_points": 3.0,
            "met": gap >= 0.03,
        }
    ratios = []
    for entry in summary["E3"]["per_seed"]:
        for method, value in entry.items():
            if method.startswith("convex") and isinstance(value, dict):
                ratios.append(value.get("ratio_to_relu-adam"))
    if ratios:
        reached = [r for r in ratios if r is not None]
        targets["E3_time_ratio"] = {
            "ratios": ratios,
            "reached_in_all_seeds": len(reached) == len(ratios),
            "mean_ratio": statistics.fmean(reached) if reached else None,
            "target": 0.1,
            "met": len(reached) == len(ratios) and max(reached) <= 0.1,
        }
    stages = teacher["stages"]
    if len(stages) > 1:
        both = [
            r
            for r in summary["E1"]
            if r["method"] == "convex" and r["cut"] == stages[-2] and r["to"] == stages[-1]
        ]
        rows = []
        for r in sorted(both, key=lambda r: r["block_params"]["mean"]):
            rows.append(
                {
                    "size": r["size"],
                    "compression": r["compression"]["mean"],
                    "accuracy": r["accuracy"]["mean"],
                    "accuracy_std": r["accuracy"]["std"],
                    "drop_points": 100 * (teacher_acc - r["accuracy"]["mean"]),
                }
            )
        ten = [r for r in rows if r["compression"] >= 9.5]
    if len(stages) > 1 and rows:  # only when E1 ran on the last two stages
        targets["E1_last_two_stages_10x"] = {
            "rows": rows,
            "best_at_10x": max(ten, key=lambda r: r["accuracy"]) if ten else None,
            "note": "the paper: about 10x smaller last two stages without a significant drop",
        }
    return targets


# ----------------------------------------------------------------------------- plots


def make_plots(payload: dict[str, Any], out_dir: Path) -> list[str]:
    """PNG plots of each experiment present; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, made = payload["summary"], []
    teacher_acc = summary["teacher_accuracy"]
    if summary["E1"]:
        blocks = list(dict.fromkeys((r["cut"], r["to"]) for r in summary["E1"]))
        fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
        for ax, (cut, to) in zip(axes[0], blocks):
            rows = [r for r in summary["E1"] if (r["cut"], r["to"]) == (cut, to)]
            for method in _methods_in(rows):
                pts = sorted(
                    (r for r in rows if r["method"] == method),
                    key=lambda r: r["block_params"]["mean"],
                )
                ax.errorbar(
                    [r["block_params"]["mean"] for r in pts],
                    [r["accuracy"]["mean"] for r in pts],
                    yerr=[r["accuracy"]["std"] for r in pts],
                    marker="o",
                    capsize=3,
                    label=LABELS.get(method, method),
                )
            ax.axhline(teacher_acc, color="gray", ls="--", label="teacher")
            ax.axvline(rows[0]["teacher_block_params"]["mean"], color="gray", ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("block parameters (gates included)")
            ax.set_ylabel("test accuracy")
            ax.set_title(cut if cut == to else f"{cut}..{to}")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "e1_accuracy_vs_size.png", dpi=110)
        plt.close(fig)
        made.append("e1_accuracy_vs_size.png")
    if summary["E2"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = _sample_axis(summary["E2"])
        for method in _methods_in(summary["E2"]):
            pts = [r for r in summary["E2"] if r["method"] == method]
            pts.sort(key=lambda r: xs[json.dumps(r["samples_per_class"])])
            ax.errorbar(
                [xs[json.dumps(r["samples_per_class"])] for r in pts],
                [r["accuracy"]["mean"] for r in pts],
                yerr=[r["accuracy"]["std"] for r in pts],
                marker="o",
                capsize=3,
                label=LABELS.get(method, method),
            )
        ax.axhline(teacher_acc, color="gray", ls="--", label="teacher")
        ax.set_xscale("log")
        ticks = sorted(xs.values())
        ax.set_xticks(ticks)
        ax.set_xticklabels([_sample_label(k) for k in sorted(xs, key=xs.get)])
        ax.set_xlabel("training images per class (labels unused)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "e2_accuracy_vs_samples.png", dpi=110)
        plt.close(fig)
        made.append("e2_accuracy_vs_samples.png")
    e3 = [r for r in payload["records"] if r["experiment"] == "E3"]
    if e3:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        colors: dict[str, str] = {}
        for record in e3:
            for result in record["results"]:
                if "curve" not in result:
                    continue
                method = result["method"]
                color = colors.setdefault(method, f"C{len(colors)}")
                curve = [p for p in result["curve"] if p["time_s"] > 0]
                label = method if record is e3[0] else None
                style = "o-" if method.startswith("convex") else "-"
                ax_loss.plot(
                    [p["time_s"] for p in curve],
                    [p["loss"] for p in curve],
                    style,
                    color=color,
                    alpha=0.8,
                    label=label,
                    ms=3,
                )
                acc = [p for p in curve if "accuracy" in p]
                ax_acc.plot(
                    [p["time_s"] for p in acc],
                    [p["accuracy"] for p in acc],
                    "o-",
                    color=color,
                    alpha=0.8,
                    label=label,
                    ms=3,
                )
        for ax in (ax_loss, ax_acc):
            ax.set_xscale("log")
            ax.set_xlabel("wall time, compilation excluded (s)")
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("distillation loss 1/(2N)||ŷ-y||² (training rows)")
        ax_acc.set_ylabel("test accuracy")
        ax_acc.axhline(teacher_acc, color="gray", ls="--")
        ax_loss.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "e3_loss_vs_time.png", dpi=110)
        plt.close(fig)
        made.append("e3_loss_vs_time.png")
    if summary["E4"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        samples = list(dict.fromkeys(json.dumps(r["samples_per_class"]) for r in summary["E4"]))
        methods = _methods_in(summary["E4"])
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            rows = {
                json.dumps(r["samples_per_class"]): r
                for r in summary["E4"]
                if r["method"] == method
            }
            xs = [i + j * width for i, s in enumerate(samples) if s in rows]
            ax.bar(
                xs,
                [rows[s]["accuracy"]["mean"] for s in samples if s in rows],
                width,
                yerr=[rows[s]["accuracy"]["std"] for s in samples if s in rows],
                capsize=3,
                label=LABELS.get(method, method),
            )
        ax.axhline(teacher_acc, color="gray", ls="--", label="teacher")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(samples))])
        ax.set_xticklabels([f"{_sample_label(s)} / class" for s in samples])
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "e4_head_student.png", dpi=110)
        plt.close(fig)
        made.append("e4_head_student.png")
    return made


def _methods_in(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = list(dict.fromkeys(r["method"] for r in rows))
    order = [*METHODS, *E4_METHODS]
    return sorted(present, key=lambda m: order.index(m) if m in order else len(order))


def _sample_axis(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    known = sorted({r["samples_per_class"] for r in rows if r["samples_per_class"] is not None})
    top = known[-1] if known else 1
    return {
        json.dumps(k): float(k) if k is not None else float(top * 10)
        for k in {r["samples_per_class"] for r in rows}
    }


def _sample_label(key: Any) -> str:
    value = json.loads(key) if isinstance(key, str) else key
    return "all" if value is None else str(value)


# ----------------------------------------------------------------------------- markdown


def _pm(stat: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std = stat["mean"], stat["std"]
    if not math.isfinite(mean):
        return "—"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown_report(payload: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The tables of every experiment present, the target checks and the machine."""
    summary, teacher = payload["summary"], payload["teacher"]
    grid, machine = payload["grid"], payload["machine"]
    seeds = len(grid["seeds"])
    lines = [
        "# Convex distillation against its baselines",
        "",
        f"Teacher `{teacher['name']}` ({teacher['dataset']}, {teacher['params']} parameters), "
        f"test accuracy {100 * teacher['test_accuracy']:.2f} % on {teacher['test_images']} test "
        f"images. Every number is mean ± std over {seeds} seeds (the seed changes the gates, the "
        "training subset, the row subsample and the Adam initialisations). No labels are read "
        "except to report accuracy; no student is fine-tuned.",
        "",
        f"Settings: `{grid['reg']}` regularizer, solved to a relative duality gap ≤ {grid['tol']}; "
        f"at most {grid['max_rows']} rows per stage; Adam lr {grid['adam_lr']}, "
        f"{grid['adam_steps']} steps (mini-batch {grid['adam_batch']} rows); logit KD "
        f"T = {grid['kd_temperature']}, {grid['kd_steps']} steps of {grid['kd_batch']} images, "
        f"lr {grid['kd_lr']}. Baselines are matched to the convex student's parameter count "
        "(gates and PCA projections included); pruning reports the non-zeros it kept "
        "(BatchNorm scale/bias are never pruned).",
        "",
    ]
    stage_params = ", ".join(f"{k}: {v}" for k, v in teacher["block_params"].items())
    lines += [f"Teacher block parameters: {stage_params}.", ""]
    if summary["E1"]:
        lines += ["## E1: accuracy vs student size", ""]
        blocks = list(dict.fromkeys((r["cut"], r["to"]) for r in summary["E1"]))
        for cut, to in blocks:
            name = cut if cut == to else f"{cut}..{to}"
            rows = [r for r in summary["E1"] if (r["cut"], r["to"]) == (cut, to)]
            lines += [
                f"**{name}** replaced (teacher block: "
                f"{rows[0]['teacher_block_params']['mean']:.0f} parameters)",
                "",
            ]
            table = []
            for size in dict.fromkeys(r["size"] for r in rows):
                for method in _methods_in([r for r in rows if r["size"] == size]):
                    r = _find(rows, size=size, method=method)
                    table.append(
                        [
                            size,
                            LABELS.get(method, method),
                            f"{r['block_params']['mean']:.0f}",
                            f"{r['compression']['mean']:.1f}×",
                            _pm(r["accuracy"], 100, 2),
                            _pm(r["agreement"], 100, 2),
                            _pm(r["block_rel_mse"], 1, 3),
                        ]
                    )
            header = [
                "size",
                "method",
                "params",
                "compression",
                "accuracy %",
                "agreement %",
                "block rel. MSE",
            ]
            lines += [markdown_table(header, table), ""]
    if summary["E2"]:
        lines += ["## E2: accuracy vs samples per class (last stage)", ""]
        samples = list(dict.fromkeys(json.dumps(r["samples_per_class"]) for r in summary["E2"]))
        methods = _methods_in(summary["E2"])
        table = []
        for method in methods:
            cells = [LABELS.get(method, method)]
            for s in samples:
                r = _find(summary["E2"], samples_per_class=json.loads(s), method=method)
                cells.append(_pm(r["accuracy"], 100, 2) if r else "—")
            table.append(cells)
        sizes = ["convex student params"]
        for s in samples:
            r = _find(summary["E2"], samples_per_class=json.loads(s), method="convex")
            sizes.append(f"{r['block_params']['mean']:.0f}" if r else "—")
        table.append(sizes)
        teacher_params = summary["E2"][0]["teacher_block_params"]["mean"]
        header = ["method", *[f"{_sample_label(s)} / class" for s in samples]]
        lines += [
            "Test accuracy (%), mean ± std over seeds; every baseline is matched to the convex "
            f"student's size in its column (teacher block: {teacher_params:.0f} parameters).",
            "",
            markdown_table(header, table),
            "",
        ]
    e3 = summary["E3"]["per_seed"]
    if e3:
        lines += ["## E3: distillation loss and accuracy vs wall time (last stage)", ""]
        table = []
        for entry in e3:
            for method, value in entry.items():
                if not (method.startswith("convex") and isinstance(value, dict)):
                    continue
                table.append(
                    [
                        entry["seed"],
                        method,
                        fmt(value["final_loss"], 4),
                        fmt(value["final_time_s"], 3),
                        fmt(entry.get("adam_loss"), 4),
                        fmt(entry.get("adam_time_s"), 3),
                        fmt(value.get("time_to_relu-adam_loss_s"), 3),
                        fmt(value.get("ratio_to_relu-adam"), 3),
                        fmt(value.get("ratio_to_relu-adam-mb"), 3),
                        fmt(value.get("ratio_to_fixed-gate-adam"), 3),
                    ]
                )
        header = [
            "seed",
            "solver",
            "convex loss (tightest tol)",
            "convex time (s)",
            "Adam final loss",
            "Adam time (s)",
            "convex time to Adam's loss (s)",
            "ratio (ReLU Adam)",
            "ratio (mini-batch Adam)",
            "ratio (fixed-gate Adam)",
        ]
        lines += [
            "Loss is 1/(2N)||ŷ − y||² on the training rows (reduced space), the loss every method "
            "fits. Convex: independent solves to gap tolerances "
            f"{', '.join(str(t) for t in grid['e3_tols'])}; Adam: full batch, "
            f"{grid['e3_adam_steps']} steps. Compilation excluded on both sides. "
            "'ratio' = convex time to reach Adam's final loss / Adam's training time (— = never).",
            "",
            markdown_table(header, table),
            "",
        ]
        table = []
        for entry in e3:
            for name, run in entry.get("adam_runs", {}).items():
                table.append(
                    [
                        entry["seed"],
                        LABELS.get(name, name),
                        fmt(run["final_loss"], 4),
                        fmt(run["train_time_s"], 3),
                        f"{100 * run['accuracy']:.2f}",
                        fmt(run["time_to_convex_loss_s"], 3),
                    ]
                )
        header = [
            "seed",
            "Adam run",
            "final loss",
            "time (s)",
            "accuracy %",
            "time to the convex loss (s)",
        ]
        lines += [
            "The other direction: when each Adam run first reached the convex student's loss "
            "(best solver, tightest tolerance).",
            "",
            markdown_table(header, table),
            "",
        ]
    if summary["E4"]:
        lines += ["## E4: head student (pooled features -> logits)", ""]
        table = []
        for r in summary["E4"]:
            table.append(
                [
                    _sample_label(r["samples_per_class"]),
                    LABELS.get(r["method"], r["method"]),
                    f"{r['block_params']['mean']:.0f}",
                    _pm(r["accuracy"], 100, 2),
                    _pm(r["agreement"], 100, 2),
                ]
            )
        header = ["samples / class", "method", "params", "accuracy %", "agreement %"]
        lines += [markdown_table(header, table), ""]
    lines += _targets_markdown(summary.get("targets", {}))
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += [
        "## Machine",
        "",
        f"{machine['cpu_model']}, {machine['usable_cores']} usable cores "
        f"({machine['logical_cores']} logical), {machine['memory_gib']} GiB, "
        f"{machine['os']}; JAX {machine['versions'].get('jax')} on {machine['jax_backend']}; "
        f"XLA_FLAGS `{machine.get('xla_flags') or '(none)'}`; commit {machine['git_commit']}"
        f"{' (package modified)' if machine.get('package_modified_since_commit') else ''}. "
        f"Load average at start {machine['load_average_at_start']}, at end "
        f"{payload.get('load_average_at_end')}: the machine was shared, so wall times are "
        f"pessimistic. Harness wall time {payload['wall_time_s']:.0f} s "
        f"({payload['computed']} points computed, {payload['reused']} reused, "
        f"{len(payload.get('failed', []))} failed"
        + (
            f", {payload['missing']} not yet computed: this report is partial"
            if payload.get("missing")
            else ""
        )
        + ").",
        "",
    ]
    return "\n".join(lines)


def _targets_markdown(targets: dict[str, Any]) -> list[str]:
    if not targets:
        return []
    lines = ["## Targets", ""]
    e2 = targets.get("E2_10_per_class")
    if e2:
        lines.append(
            f"- E2, 10 images per class: convex − ReLU/Adam = "
            f"{e2['convex_minus_relu_adam_points']:+.2f} ± {e2['std_points']:.2f} points "
            f"(target ≥ +3): **{'met' if e2['met'] else 'not met'}**."
        )
    e3 = targets.get("E3_time_ratio")
    if e3:
        ratios = ", ".join("never" if r is None else f"{r:.3f}" for r in e3["ratios"])
        lines.append(
            f"- E3, convex time to Adam's final loss / Adam's time: {ratios} "
            f"(target ≤ 0.1 in every seed): **{'met' if e3['met'] else 'not met'}**."
        )
    e1 = targets.get("E1_last_two_stages_10x")
    if e1:
        best = e1["best_at_10x"]
        if best:
            lines.append(
                f"- E1, last two stages about 10× smaller: size {best['size']} "
                f"({best['compression']:.1f}×) loses {best['drop_points']:.2f} ± "
                f"{100 * best['accuracy_std']:.2f} points of accuracy."
            )
        else:
            top = max(e1["rows"], key=lambda r: r["compression"]) if e1["rows"] else None
            lines.append(
                "- E1, last two stages: no size on the ladder reached 10× compression"
                + (
                    f" (largest: {top['compression']:.1f}×, drop {top['drop_points']:.2f} points)."
                    if top
                    else "."
                )
            )
    return [*lines, ""]


def combined_report(dirs: Sequence[Path], target: Path, preamble: str = "") -> str:
    """One markdown document with the report of each run in ``dirs`` (headings demoted)."""
    parts = ["# Convex distillation against its baselines", ""]
    if preamble:
        parts += [preamble.strip(), ""]
    for directory in dirs:
        payload = json.loads((Path(directory) / "distill.json").read_text())
        payload["summary"] = summarize(payload)  # with this version's summary
        plots = make_plots(payload, Path(directory))
        prefix = os.path.relpath(directory, target.parent)
        text = markdown_report(payload, [os.path.join(prefix, p) for p in plots])
        body = text.split("\n", 1)[1]  # drop the document title
        teacher = payload["teacher"]
        parts.append(f"## Teacher `{teacher['name']}` ({teacher['dataset']})")
        parts += ["#" + line if line.startswith("#") else line for line in body.splitlines()]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.distill report DIR... [--to PATH]``: rewrite the report(s).

    With one DIR and no ``--to`` it rewrites ``DIR/REPORT.md``; with ``--to`` it writes one
    document holding every DIR's report (image links relative to it).
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distill")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="rewrite REPORT.md from DIR/distill.json")
    report.add_argument("dirs", type=Path, nargs="+")
    report.add_argument("--to", type=Path, help="write one combined report here")
    report.add_argument("--preamble", type=Path, help="markdown to put under the title")
    args = parser.parse_args(argv)
    if args.to is None:
        for directory in args.dirs:
            payload = json.loads((directory / "distill.json").read_text())
            payload["summary"] = summarize(payload)
            write_json(directory / "distill.json", payload)
            plots = make_plots(payload, directory)
            (directory / "REPORT.md").write_text(markdown_report(payload, plots), "utf-8")
            print(f"wrote {directory / 'REPORT.md'}", file=sys.stderr)
        return 0
    preamble = args.preamble.read_text() if args.preamble else ""
    args.to.write_text(combined_report(args.dirs, args.to, preamble), encoding="utf-8")
    print(f"wrote {args.to}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
