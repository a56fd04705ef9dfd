"""Evaluation of a spliced network: the teacher with some blocks replaced by students.

`spliced_predict` gives the logits; `evaluate_spliced` the accuracy, agreement with the
teacher, block-output error, sizes, FLOPs and CPU latency that every command and benchmark
reports. Labels are read here only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.distill.student import BlockStudent, chain, flops
from cvxdist.teachers.teacher import Teacher, batched_apply


def spliced_forward(
    teacher: Teacher,
    cut: str,
    to: str | None,
    students: Sequence[BlockStudent],
    jit: bool = True,
) -> Callable[[tuple, jnp.ndarray], jnp.ndarray]:
    """``forward((teacher_variables, student_variables), images) -> logits``: the teacher
    with ``cut..to`` replaced by ``students``, not itself jitted (to jit, trace or export);
    ``jit`` is that of the teacher's prefix and suffix (`Teacher.cut_functions`)."""
    fns = teacher.cut_functions(cut, to, jit=jit)
    run_students = chain(students)

    def forward(state: tuple, x: jnp.ndarray) -> jnp.ndarray:
        variables, student_vars = state
        return fns.suffix(variables, run_students(student_vars, fns.prefix(variables, x)))

    return forward


def spliced_predict(
    teacher: Teacher,
    cut: str,
    to: str,
    students: Sequence[BlockStudent],
    batch_size: int = 500,
) -> Callable[[np.ndarray], np.ndarray]:
    """``images -> logits`` of the teacher with stages ``cut..to`` replaced by ``students``."""
    forward = jax.jit(spliced_forward(teacher, cut, to, students))
    state = (teacher.variables, [s.variables for s in students])

    def predict(images: np.ndarray) -> np.ndarray:
        return np.concatenate(list(batched_apply(forward, state, images, batch_size)))

    return predict


def _latency_ms(fn: Callable[[np.ndarray], Any], images: np.ndarray, repeats: int = 5) -> float:
    fn(images)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(images))
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times)) / len(images)


class SplicedEvaluator:
    """Accuracy, teacher agreement and block error of spliced networks on one labelled set.

    Built once, called for many student sets: it keeps the teacher's predictions and one
    compiled forward per span and student architecture, so another student of the same
    shapes recompiles nothing. The block error compares the students' output with the
    teacher block's, from the same block input, over the first ``block_images`` images
    (``None``: all of them).
    """

    def __init__(
        self,
        teacher: Teacher,
        images: np.ndarray,
        labels: np.ndarray,
        block_images: int | None = 2000,
        batch_size: int = 500,
    ) -> None:
        self.teacher, self.images, self.labels = teacher, images, labels
        limit = len(images) if block_images is None else block_images
        self.block_images = max(1, min(limit, len(images)))
        self.batch_size = batch_size
        self._teacher_pred: np.ndarray | None = None
        self._compiled: dict[tuple, tuple[Callable, Callable, int]] = {}

    @property
    def teacher_pred(self) -> np.ndarray:
        """The teacher's class for every image, ``(N,)``."""
        if self._teacher_pred is None:
            self._teacher_pred = self.teacher.predict(self.images, self.batch_size).argmax(-1)
        return self._teacher_pred

    def _forwards(self, students: Sequence[BlockStudent], cut: str, last: str) -> tuple:
        """``(logits_fn, block_fn, locations)`` for this span and these student modules."""
        key = (cut, last, tuple(s.module for s in students))
        if key not in self._compiled:
            fns = self.teacher.cut_functions(cut, last, jit=False)
            run_students = chain(students)
            logits = spliced_forward(self.teacher, cut, last, students, jit=False)

            def with_block(state: tuple, x: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
                # per image: logits, squared error, and the sums of y and y² for the spread
                variables, student_vars = state
                z = fns.prefix(variables, x)
                out = run_students(student_vars, z)
                y = fns.block(variables, z)
                err = jnp.sum(((out - y) ** 2).reshape(len(y), -1), axis=1)
                flat = y.reshape(len(y), -1, y.shape[-1])
                sums = (flat.sum(axis=1), jnp.sum(flat**2, axis=(1, 2)))
                return fns.suffix(variables, out), err, *sums

            probe = jnp.zeros((1, *self.images.shape[1:]), jnp.float32)
            shape = jax.eval_shape(
                lambda x: fns.block(self.teacher.variables, fns.prefix(self.teacher.variables, x)),
                probe,
            ).shape
            locations = int(np.prod(shape[1:-1], dtype=np.int64))
            self._compiled[key] = (jax.jit(logits), jax.jit(with_block), locations)
        return self._compiled[key]

    def __call__(
        self, students: Sequence[BlockStudent], cut: str, to: str | None
    ) -> dict[str, Any]:
        """Metrics of the teacher with ``cut..to`` replaced by ``students``."""
        last = cut if to is None else to
        logits_fn, block_fn, locations = self._forwards(students, cut, last)
        state = (self.teacher.variables, [s.variables for s in students])
        m = self.block_images
        logits, sq_err, total, total_sq = [], 0.0, 0.0, 0.0
        for lg, err, y_sum, y_sq in batched_apply(
            block_fn, state, self.images[:m], self.batch_size
        ):
            logits.append(lg)
            sq_err += float(np.sum(err, dtype=np.float64))
            total = total + np.sum(y_sum, axis=0, dtype=np.float64)
            total_sq += float(np.sum(y_sq, dtype=np.float64))
        if m < len(self.images):
            logits.extend(batched_apply(logits_fn, state, self.images[m:], self.batch_size))
        count = m * locations
        spread = total_sq - float(np.sum(np.asarray(total) ** 2)) / count
        pred = np.concatenate(logits).argmax(-1)
        teacher_params = self.teacher.block_params(cut, last)
        student_params = sum(s.report["params"] for s in students)
        return {
            "accuracy": float(np.mean(pred == self.labels)),
            "teacher_accuracy": float(np.mean(self.teacher_pred == self.labels)),
            "agreement": float(np.mean(pred == self.teacher_pred)),
            "block_rel_mse": sq_err / max(spread, 1e-30),
            "block_mse": sq_err / count,  # per output location, summed over channels
            "block_params": student_params,
            "teacher_block_params": teacher_params,
            "compression": teacher_params / max(student_params, 1),
            "test_images": len(self.images),
        }


def evaluate_spliced(
    teacher: Teacher,
    students: Sequence[BlockStudent],
    cut: str,
    to: str | None,
    images: np.ndarray,
    labels: np.ndarray,
    latency_batch: int = 256,
) -> dict[str, Any]:
    """Accuracy, teacher agreement, block-output error (the first 2000 images), size, FLOPs
    and CPU latency (see :class:`SplicedEvaluator` to evaluate many student sets)."""
    last = cut if to is None else to
    fns = teacher.cut_functions(cut, last)  # validates the names
    metrics = SplicedEvaluator(teacher, images, labels)(students, cut, to)
    run_students = chain(students)
    student_vars = [s.variables for s in students]
    probe = jnp.zeros((1, *images.shape[1:]), jnp.float32)
    z_probe = fns.prefix(teacher.variables, probe)
    teacher_block_flops = flops(lambda z: fns.block(teacher.variables, z), z_probe)
    student_flops = flops(lambda z: run_students(student_vars, z), z_probe)
    batch = images[:latency_batch]
    teacher_fn = jax.jit(teacher.apply)
    forward = spliced_forward(teacher, cut, last, students)
    spliced_fn = jax.jit(lambda x: forward((teacher.variables, student_vars), x))
    teacher_params, student_params = metrics["teacher_block_params"], metrics["block_params"]
    return {
        **metrics,
        "block_flops": student_flops,
        "teacher_block_flops": teacher_block_flops,
        "latency_ms_per_image": _latency_ms(spliced_fn, batch),
        "teacher_latency_ms_per_image": _latency_ms(
            lambda x: teacher_fn(teacher.variables, x), batch
        ),
        "model_params": teacher.info.get("params", 0) - teacher_params + student_params,
        "teacher_params": teacher.info.get("params", 0),
    }
