"""ONNX export of a teacher or of its compressed network (teacher prefix, students, suffix),
checked with onnxruntime, and the numbers an edge user decides by (file size, latency).

The converter is ``jax2onnx``. The network is first traced to a jaxpr here (with a symbolic
batch dimension, so the ONNX model takes any batch), and the converter is given a function
that evaluates that jaxpr: it then sees only JAX primitives. Handing it the Flax modules
directly lets its Flax plugins re-lay-out convolutions, which produced graphs onnxruntime
rejects (jax2onnx 0.17.1). All weights become ONNX initializers (float32).

While tracing, each teacher ConvBN runs as `ConvBN.folded`: BatchNorm folded into the
convolution's kernel and bias, computed once as constants, so the graph holds one Conv and one
Add per layer; the unfolded JAX network is the reference the check compares against. The
students' products are 2-D (GEMMs, not Einsums). For the fashion-resnet20 teacher this took
the graph from 306 to 138 nodes and the file from 324 to 294 kB, and onnxruntime's median
latency from 0.54 to 0.42 ms at batch 1 and from 261 to 220 ms at batch 256 (CPU, measured in
turns on a shared 2-core machine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.errors import UserError
from cvxdist.teachers.checkpoint import write_atomic
from cvxdist.teachers.teacher import Teacher

FORMATS = ("onnx",)
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(UserError, RuntimeError):
    """The network cannot be exported, or the export does not reproduce it."""


def load_run(
    run_dir: str | os.PathLike, teacher: str | None = None
) -> tuple[Teacher, list[Any], str, str | None]:
    """``(teacher, students, cut, to)`` of a finished run folder (written by ``distill`` or
    ``demo``); one-line `UserError` for an unfinished or corrupt one."""
    from cvxdist.distill.io import load_students, resolve_run_teacher

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    try:
        students, info = load_students(run_dir)
        cut, to = info["cut"], info.get("to")
    except UserError as err:
        raise UserError(f"{err} (an unfinished or corrupt run?)") from None
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{run_dir}: corrupt run folder ({type(err).__name__}: {err})".splitlines()[0]
        ) from None
    if not students:
        raise UserError(f"{run_dir}: the run holds no students")
    resolved = resolve_run_teacher(run_dir, teacher)  # the recorded one, SHA-256 checked
    _check_coverage(resolved, students, cut, to)
    return resolved, students, cut, to


def _check_coverage(teacher: Teacher, students: Sequence[Any], cut: str, to: str | None) -> None:
    """The students' units (``stage3``, ``stage3.block2``, ``A..B``), in order, must cover
    exactly the teacher's segments ``cut..to``."""
    units = [s.stage for s in students]
    try:
        start, stop = teacher.resolve(cut, to)
        spans = [teacher.resolve(*unit.split("..")) for unit in units]
    except UserError as err:
        raise ExportError(f"the students do not fit teacher {teacher.name!r}: {err}") from None
    covered = [i for first, last in spans for i in range(first, last + 1)]
    if covered != list(range(start, stop + 1)):
        raise ExportError(
            f"the students ({', '.join(units)}) do not fit teacher {teacher.name!r}: "
            f"they do not cover its {cut}..{to or cut} exactly"
        )


def network_function(
    teacher: Teacher,
    students: Sequence[Any] = (),
    cut: str | None = None,
    to: str | None = None,
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """``images (N, H, W, C) -> logits (N, classes)``: the teacher, or with ``students``
    (`BlockStudent` s, in order) its blocks ``cut..to`` replaced (weights closed over; not
    jitted, see `to_onnx_model`)."""
    from cvxdist.distill.evaluation import spliced_forward

    variables = teacher.variables
    if not students:
        whole = teacher.cut_functions(teacher.segments[0], teacher.segments[-1], jit=False)
        return lambda x: whole.block(variables, x)
    if cut is None:
        raise ValueError("a cut is needed to splice students")
    forward = spliced_forward(teacher, cut, to, students, jit=False)
    state = (variables, [s.variables for s in students])
    return lambda x: forward(state, x)


def to_onnx_model(
    fn: Callable[[jnp.ndarray], jnp.ndarray], image_shape: tuple[int, int, int], name: str
) -> Any:
    """An ``onnx.ModelProto`` of ``fn`` with input ``images (batch, H, W, C)`` float32 and
    output ``logits``; the teacher's BatchNorms are folded into its convolutions (``fn``
    must not call jitted functions, whose cached traces would skip the folding)."""
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ExportError(
            "ONNX export needs jax2onnx, onnx and onnxruntime: pip install 'cvxdist[export]'"
        ) from None
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    from cvxdist.teachers.models import folded_batchnorm

    with folded_batchnorm():
        closed = jax.make_jaxpr(fn)(spec)

    def primitives_only(x: jnp.ndarray) -> jnp.ndarray:
        return jax.core.eval_jaxpr(closed.jaxpr, closed.consts, x)[0]

    return to_onnx(
        primitives_only,
        [spec],
        model_name=name,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )


def onnx_session(model_or_path: Any, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` of a model proto or file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if isinstance(model_or_path, (str, os.PathLike)):
        source = str(model_or_path)
    else:
        source = model_or_path.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_predict(session: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of an onnxruntime session, batch by batch."""
    outputs = [
        session.run(None, {INPUT_NAME: np.asarray(images[i : i + batch_size], np.float32)})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def batched_logits(
    fn: Callable[[jnp.ndarray], jnp.ndarray], images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """``fn`` (jitted) on ``images``, batch by batch, as numpy."""
    jitted = jax.jit(fn)
    return np.concatenate(
        [
            np.asarray(jitted(jnp.asarray(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
    )


def compare_logits(
    fn: Callable[[jnp.ndarray], jnp.ndarray],
    session: Any,
    images: np.ndarray,
    atol: float = 1e-4,
    eps: float = 1e-6,
    draws: int = 8,
) -> dict[str, Any]:
    """onnxruntime's logits against JAX's on ``images``.

    A gated student is discontinuous where a gate's pre-activation crosses 0, so float32
    rounding (XLA and onnxruntime add in different orders) can flip a mask and move the
    logits of an image lying within rounding distance of a gate boundary. Each image whose
    logits differ by more than ``atol`` (or whose top-1 differs) is tested in JAX alone: if
    ``draws`` perturbations of its pixels by ±``eps`` move JAX's own logits by more than
    ``atol``, it is *rounding-sensitive*. ``ok`` requires every other image within ``atol``
    with the same top-1. Returns ``max_abs_diff`` (all images), ``max_abs_diff_continuous``
    (the others), ``rounding_sensitive_images``, ``top1_identical``, ``top1_mismatches``,
    ``images_checked`` and ``ok``.
    """
    expected = batched_logits(fn, images)
    got = onnx_predict(session, images)
    diff = np.abs(got - expected).max(axis=-1)
    top1_differs = got.argmax(-1) != expected.argmax(-1)
    off = np.flatnonzero((diff > atol) | top1_differs)
    sensitive = np.zeros(len(images), bool)
    if len(off):
        signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(draws, *images.shape[1:]))
        perturbed = (images[off, None] + eps * signs).astype(np.float32)
        moved = batched_logits(fn, perturbed.reshape(-1, *images.shape[1:]))
        jump = np.abs(moved.reshape(len(off), draws, -1) - expected[off, None]).max(axis=(1, 2))
        sensitive[off] = jump > atol
    continuous = diff[~sensitive]
    return {
        "max_abs_diff": float(diff.max()),
        "max_abs_diff_continuous": float(continuous.max()) if len(continuous) else 0.0,
        "rounding_sensitive_images": int(sensitive.sum()),
        "top1_identical": not bool(top1_differs.any()),
        "top1_mismatches": int(top1_differs.sum()),
        "images_checked": len(images),
        "ok": bool(
            not np.any((diff > atol) & ~sensitive) and not np.any(top1_differs & ~sensitive)
        ),
    }


def export_onnx(
    teacher: Teacher,
    students: Sequence[Any],
    cut: str | None,
    to: str | None,
    path: str | os.PathLike,
    image_shape: tuple[int, int, int] | None = None,
    check_images: np.ndarray | None = None,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export the teacher (no ``students``) or the spliced network to ONNX at ``path``.

    The model is checked with onnxruntime before it is written (atomically): on
    ``check_images`` (default: 16 seeded uniform images) its logits must be within ``atol``
    of JAX's with identical top-1, except on images that lie within rounding distance of a
    gate boundary (see `compare_logits`), else `ExportError` and nothing is written. Returns
    ``{"path", "bytes", "max_abs_diff", "top1_identical", ...}`` (`compare_logits`' keys).
    """
    if not atol >= 0:
        raise UserError(f"the tolerance must be >= 0, got {atol}")
    image_shape = tuple(image_shape or teacher.image_shape)
    fn = network_function(teacher, students, cut, to)
    try:
        jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    except Exception as err:
        raise ExportError(
            f"the students do not fit teacher {teacher.name!r} at {cut}..{to or cut}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    name = f"{teacher.name}-{'compressed' if students else 'teacher'}"
    model = to_onnx_model(fn, image_shape, name)
    if check_images is None:
        rng = np.random.default_rng(0)
        check_images = rng.uniform(size=(16, *image_shape)).astype(np.float32)
    check = compare_logits(fn, onnx_session(model), check_images, atol)
    if not check["ok"]:
        raise ExportError(
            f"onnxruntime does not reproduce the network: max |Δlogit| "
            f"{check['max_abs_diff_continuous']:.3g} (tolerance {atol:g}) away from gate "
            f"boundaries, {check['top1_mismatches']} top-1 mismatches"
        )
    data = model.SerializeToString()
    write_atomic(path, data)
    return {"path": str(path), "bytes": len(data), **check}


def onnx_size_bytes(path: str | os.PathLike) -> int:
    """Size of an ONNX file on disk (with its external-data sidecar, if any)."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".data")
    return path.stat().st_size + (sidecar.stat().st_size if sidecar.is_file() else 0)


def onnx_latency_ms(path: str | os.PathLike, batch: int, repeats: int = 20) -> float:
    """Median onnxruntime CPU wall time (ms) of one call on a batch of ``batch`` images."""
    return onnx_latencies_ms({"model": path}, (batch,), repeats)["model"][batch]


def onnx_latencies_ms(
    paths: dict[str, str | os.PathLike],
    batches: Sequence[int] = (1, 256),
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, dict[int, float]]:
    """``{name: {batch: median ms per call}}`` of several ONNX models, measured in turns
    (model A, model B, A, B, ...) so that a shared machine's load changes hit all alike."""
    sessions = {name: onnx_session(path) for name, path in paths.items()}
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batches} for n in paths}
    rng = np.random.default_rng(0)
    for batch in batches:
        inputs = {}
        for name, session in sessions.items():
            dims = session.get_inputs()[0].shape
            shape = [d if isinstance(d, int) else batch for d in dims]
            inputs[name] = rng.uniform(size=shape).astype(np.float32)
        for step in range(warmup + repeats):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {INPUT_NAME: inputs[name]})
                if step >= warmup:
                    times[name][batch].append(time.perf_counter() - start)
    return {
        n: {b: 1000.0 * float(np.median(t)) for b, t in per.items()} for n, per in times.items()
    }


def demo_onnx_record(
    teacher: Teacher,
    students: Sequence[Any],
    cut: str,
    to: str | None,
    images: np.ndarray,
    out_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Export the teacher and the compressed network to ``out_dir`` (``teacher.onnx``,
    ``compressed.onnx``), check both with onnxruntime on ``images``, and measure file size
    and CPU latency at batch 1 and 256. Without the export packages: ``{"skipped": why}``."""
    try:
        import jax2onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return {"skipped": f"{err.name} is not installed (pip install 'cvxdist[export]')"}
    record: dict[str, Any] = {}
    paths = {}
    for name, replaced in (("teacher", ()), ("compressed", students)):
        paths[name] = Path(out_dir) / f"{name}.onnx"
        check = export_onnx(teacher, replaced, cut, to, paths[name], check_images=images)
        record[name] = {
            "file": paths[name].name,
            "bytes": onnx_size_bytes(paths[name]),
            **{k: v for k, v in check.items() if k not in ("path", "bytes")},
        }
    for name, latency in onnx_latencies_ms(paths).items():
        record[name]["latency_ms"] = {str(b): ms for b, ms in latency.items()}
    return record


def onnx_table(record: dict[str, Any]) -> str:
    """Markdown lines for `demo_onnx_record`'s result (empty if there is none)."""
    if not record:
        return ""
    if "skipped" in record:
        return f"\nONNX export skipped: {record['skipped']}.\n"
    first = record["compressed"]
    lines = [
        "",
        f"ONNX (onnxruntime, CPU): logits checked on {first['images_checked']} test images: "
        f"max |Δlogit| {max(r['max_abs_diff_continuous'] for r in record.values()):.2g} "
        f"({sum(r['rounding_sensitive_images'] for r in record.values())} images at a gate "
        f"boundary excepted: max {max(r['max_abs_diff'] for r in record.values()):.2g}), top-1 "
        f"{'identical' if all(r['top1_identical'] for r in record.values()) else 'DIFFERENT'}.",
        "",
        "| network | file | size (bytes) | latency batch 1 (ms) | latency batch 256 (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, row in record.items():
        latency = row["latency_ms"]
        lines.append(
            f"| {name} | {row['file']} | {row['bytes']} | {latency['1']:.3g} | "
            f"{latency['256']:.3g} |"
        )
    return "\n".join(lines) + "\n"
