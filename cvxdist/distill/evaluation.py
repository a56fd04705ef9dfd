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


def spliced_predict(
    teacher: Teacher,
    cut: str,
    to: str,
    students: Sequence[BlockStudent],
    batch_size: int = 500,
) -> Callable[[np.ndarray], np.ndarray]:
    """``images -> logits`` of the teacher with stages ``cut..to`` replaced by ``students``."""
    fns = teacher.cut_functions(cut, to)
    run_students = chain(students)

    @jax.jit
    def forward(state: tuple, x: jnp.ndarray) -> jnp.ndarray:
        variables, student_vars = state
        return fns.suffix(variables, run_students(student_vars, fns.prefix(variables, x)))

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


def evaluate_spliced(
    teacher: Teacher,
    students: Sequence[BlockStudent],
    cut: str,
    to: str | None,
    images: np.ndarray,
    labels: np.ndarray,
    latency_batch: int = 256,
) -> dict[str, Any]:
    """Accuracy, teacher agreement, block-output error, size, FLOPs and CPU latency."""
    last = cut if to is None else to
    fns = teacher.cut_functions(cut, last)  # validates the names
    teacher_logits = teacher.predict(images)
    spliced = spliced_predict(teacher, cut, last, students)
    student_logits = spliced(images)
    run_students = chain(students)
    student_vars = [s.variables for s in students]

    def block_outputs(v: Any, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        z = fns.prefix(v, x)
        return fns.block(v, z), run_students(student_vars, z)

    sq_err, total, total_sq, count = 0.0, 0.0, 0.0, 0
    for y_t, y_s in batched_apply(jax.jit(block_outputs), teacher.variables, images[:2000], 250):
        sq_err += float(np.sum((y_t - y_s) ** 2, dtype=np.float64))
        total = total + np.sum(y_t.reshape(-1, y_t.shape[-1]), axis=0, dtype=np.float64)
        total_sq += float(np.sum(y_t**2, dtype=np.float64))
        count += y_t.size // y_t.shape[-1]
    sq_total = total_sq - float(np.sum(np.asarray(total) ** 2)) / max(count, 1)
    probe = jnp.zeros((1, *images.shape[1:]), jnp.float32)
    z_probe = fns.prefix(teacher.variables, probe)
    teacher_block_flops = flops(lambda z: fns.block(teacher.variables, z), z_probe)
    student_flops = flops(lambda z: run_students(student_vars, z), z_probe)
    batch = images[:latency_batch]
    teacher_fn = jax.jit(teacher.apply)
    spliced_fn = jax.jit(
        lambda x: fns.suffix(
            teacher.variables, run_students(student_vars, fns.prefix(teacher.variables, x))
        )
    )
    teacher_params = teacher.block_params(cut, last)
    student_params = sum(s.report["params"] for s in students)
    return {
        "accuracy": float(np.mean(student_logits.argmax(-1) == labels)),
        "teacher_accuracy": float(np.mean(teacher_logits.argmax(-1) == labels)),
        "agreement": float(np.mean(student_logits.argmax(-1) == teacher_logits.argmax(-1))),
        "block_rel_mse": sq_err / max(sq_total, 1e-30),
        "block_mse": sq_err / max(count, 1),  # per output location, summed over channels
        "block_params": student_params,
        "teacher_block_params": teacher_params,
        "compression": teacher_params / max(student_params, 1),
        "block_flops": student_flops,
        "teacher_block_flops": teacher_block_flops,
        "latency_ms_per_image": _latency_ms(spliced_fn, batch),
        "teacher_latency_ms_per_image": _latency_ms(
            lambda x: teacher_fn(teacher.variables, x), batch
        ),
        "model_params": teacher.info.get("params", 0) - teacher_params + student_params,
        "teacher_params": teacher.info.get("params", 0),
        "test_images": len(images),
    }
