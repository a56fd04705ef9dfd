"""Steps 1–4 of :mod:`cvxdist.distill.pipeline` for one unit: the activations of whole
images through the already replaced prefix, the rows, the reduction, and the objective's data
terms (`PreparedBlock`), ready for any solver or baseline."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.distill.config import GAUSS_NEWTON_IMAGES, DistillConfig
from cvxdist.distill.evaluation import evaluate_spliced, spliced_predict  # noqa: F401
from cvxdist.distill.objectives import (
    TermData,
    activation_term,
    concatenate_terms,
    gauss_newton_term,
    head_basis,
    identified,
    linear_head,
    logit_term,
    normalise,
    resolve_objective,
)
from cvxdist.distill.student import (
    BlockStudent,
    Reduction,
    chain,
    project_channels,
)
from cvxdist.errors import UserError
from cvxdist.teachers.teacher import Teacher


def _replaced_input_fn(
    teacher: Teacher, first_stage: str, students: Sequence[BlockStudent]
) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    prefix = teacher.cut_functions(first_stage).prefix
    run_students = chain(students)
    student_vars = [s.variables for s in students]

    def fn(variables: Any, x: jnp.ndarray) -> jnp.ndarray:
        return run_students(student_vars, prefix(variables, x))

    return fn


def fit_reduction(
    rows: np.ndarray,
    targets: np.ndarray,
    config: DistillConfig,
    reduce_input: bool = True,
    patch: tuple[int, int] | None = None,
    output_basis: np.ndarray | None = None,
) -> Reduction:
    """PCA bases keeping ``input_variance`` / ``output_variance`` (capped in dimension).

    With ``config.channel_dim`` and ``patch = (k, C_in)`` of conv rows, the channels are
    reduced first: the PCA basis of the patches' centre pixels (``C_in -> channel_dim``) is
    applied to every pixel, and the patch PCA is fitted on the result. ``output_basis``
    ``(C, r)`` replaces the output PCA (uncentred): the ``logits`` objective's ``orth(W)``.
    """

    def basis(data: np.ndarray, fraction: float, cap: int) -> tuple[np.ndarray, np.ndarray, float]:
        mean = data.mean(axis=0, dtype=np.float64)
        centered = data.astype(np.float64) - mean
        cov = centered.T @ centered / max(len(data) - 1, 1)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
        total = eigval.sum()
        if total <= 0:
            return mean, eigvec[:, :1], 1.0
        cumulative = np.cumsum(eigval) / total
        dim = int(min(np.searchsorted(cumulative, fraction) + 1, cap, len(eigval)))
        return mean, eigvec[:, :dim], float(cumulative[dim - 1])

    channel_basis, channel_kept = None, 1.0
    if config.channel_dim is not None and patch is not None and patch[0] > 0:
        k, channels = patch
        if config.channel_dim < channels:
            centre = rows.reshape(len(rows), k * k, channels)[:, (k * k) // 2]
            _, channel_basis, channel_kept = basis(centre, 1.0, config.channel_dim)
            rows = project_channels(rows, channel_basis.astype(rows.dtype))
    in_mean, in_basis, in_kept = basis(rows, config.input_variance, config.max_input_dim)
    if output_basis is None:
        out_mean, out_basis, out_kept = basis(
            targets, config.output_variance, config.max_output_dim
        )
    else:
        out_mean, out_kept = np.zeros(targets.shape[1]), _kept(targets, output_basis)
        out_basis = output_basis
    if not reduce_input or in_basis.shape[1] >= rows.shape[1]:
        in_basis, in_kept = None, 1.0
        in_mean = np.zeros(rows.shape[1])
    if out_basis.shape[1] >= targets.shape[1] and output_basis is None:
        out_basis, out_kept = None, 1.0
    return Reduction(
        in_mean, in_basis, out_mean, out_basis, in_kept, out_kept, channel_basis, channel_kept
    )


@dataclasses.dataclass
class PreparedBlock:
    """One unit ready to solve: the fit images' reduced rows, the reduction and the data terms.

    Attributes:
        stage: the unit (``stage3``, ``stage3.block2``, ``stage2..head``).
        rows: ``(N·L, d')`` reduced rows of the fit images (gates are sampled from these).
        targets: ``(N·L, c')`` their reduced block targets.
        reduction: the input/output reductions.
        row_info: shapes, kernel size, stride, locations per image, identity.
        terms: the objective's data terms (:class:`~cvxdist.distill.objectives.TermData`).
        objective: the objective's name.
        skip: whether the student has the unregularized linear skip (``config.skip``, unless
            the data cannot identify it: see :func:`~cvxdist.distill.objectives.identified`).
    """

    stage: str
    rows: np.ndarray
    targets: np.ndarray
    reduction: Reduction
    row_info: dict[str, Any]
    terms: list[TermData]
    objective: str = "activations"
    skip: bool = True


def prepare_block(
    teacher: Teacher,
    train_images: np.ndarray,
    stage: str,
    config: DistillConfig,
    replaced: Sequence[BlockStudent] = (),
    progress: bool = True,
    reduction: Reduction | None = None,
) -> PreparedBlock:
    """Activations, reduction and data terms of ``stage``, its input through ``replaced``,
    reduced by ``reduction`` (e.g. another chain's, to share its coordinates) or by one
    fitted here."""
    from cvxdist.streaming import collect_activations, select_images, stream_activations

    first, _, last = stage.partition("..")
    last = last or first
    head = last == "head"
    input_fn = _replaced_input_fn(teacher, config.cut, replaced)
    info = _row_info(teacher, train_images, first, last, input_fn, config)
    linear = None if head else linear_head(teacher, last)
    objective = "activations" if head else resolve_objective(config.objective, linear is not None)
    downstream = "logits" if linear is not None else "gauss-newton"
    wanted = {"activations": {"activations"}, "logits": {"logits"}}.get(objective)
    wanted = wanted or (
        {"gauss-newton"} if objective == "gauss-newton" else {"activations", downstream}
    )
    L = info["locations_per_image"]
    fit_ids = select_images(len(train_images), math.ceil(config.max_rows / L), config.seed)
    stream_args = {
        "input_fn": input_fn,
        "rows": "pooled" if head else "patch",
        "kernel_size": config.kernel_size,
        "identity": info["identity"],
        "batch_size": config.batch_size,
        "progress": progress,
    }
    acts = collect_activations(
        teacher,
        train_images,
        first,
        last,
        image_ids=fit_ids,
        jacobian="gauss-newton" in wanted,
        **stream_args,
    )
    raw_rows, raw_targets = acts.flat_rows()
    patch = (int(info["kernel_size"]), int(info["input_shape"][-1]))
    if reduction is None:
        basis = head_basis(linear[0]) if objective == "logits" else None
        reduction = fit_reduction(raw_rows, raw_targets, config, patch=patch, output_basis=basis)
    rows = reduction.rows(raw_rows).astype(np.float32)
    targets = reduction.targets(raw_targets).astype(np.float32)
    N = len(acts)
    terms: list[TermData] = []
    if "activations" in wanted:
        terms.append(activation_term(rows.reshape(N, L, -1), targets.reshape(N, L, -1)))
    for kind in ("logits", "gauss-newton"):
        if kind not in wanted:
            continue
        cap = config.max_images
        if cap is None and kind == "gauss-newton":
            cap = GAUSS_NEWTON_IMAGES
        ids = select_images(len(train_images), cap, config.seed)
        if np.array_equal(ids, fit_ids):
            term = _downstream_term(kind, rows.reshape(N, L, -1), acts, reduction, linear)
        else:
            chunks = stream_activations(
                teacher,
                train_images,
                first,
                last,
                image_ids=ids,
                jacobian=kind == "gauss-newton",
                **stream_args,
            )
            term = concatenate_terms(
                [_downstream_term(kind, None, chunk, reduction, linear) for chunk in chunks]
            )
        terms.append(term)
        info[f"{kind}_images"] = term.num_groups
    if objective == "mixed":
        terms = normalise(terms, config.logit_weight)
    skip = config.skip and identified(terms, rows.shape[1] + 1)
    info.update(rows=len(rows), fit_images=N, objective=objective, skip=skip)
    return PreparedBlock(stage, rows, targets, reduction, info, terms, objective, skip)


def _row_info(
    teacher: Teacher,
    images: np.ndarray,
    first: str,
    last: str,
    input_fn: Callable[[Any, jnp.ndarray], jnp.ndarray],
    config: DistillConfig,
) -> dict[str, Any]:
    """Shapes of the unit's input and output, kernel size, stride, locations, identity."""
    from cvxdist.streaming import infer_stride

    fns = teacher.cut_functions(first, last)

    def io(variables: Any, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return input_fn(variables, x), fns.block(variables, fns.prefix(variables, x))

    z, y = jax.eval_shape(io, teacher.variables, jnp.zeros((1, *images.shape[1:])))
    info: dict[str, Any] = {"input_shape": list(z.shape[1:]), "output_shape": list(y.shape[1:])}
    if last == "head":
        return {**info, "kernel_size": 0, "stride": 1, "locations_per_image": 1, "identity": False}
    if len(y.shape) != 4:
        raise UserError(f"stage {first!r} does not output feature maps; use --cut head")
    stride = infer_stride(tuple(z.shape[1:3]), tuple(y.shape[1:3]))
    return {
        **info,
        "kernel_size": config.kernel_size,
        "stride": stride,
        "locations_per_image": y.shape[1] * y.shape[2],
        "identity": bool(config.identity and z.shape == y.shape),
    }


def _downstream_term(
    kind: str,
    rows: np.ndarray | None,
    acts: Any,
    reduction: Reduction,
    linear: tuple[np.ndarray, np.ndarray] | None,
) -> TermData:
    """The ``logits`` or ``gauss-newton`` term of the images of ``acts`` (their reduced rows
    ``rows``, computed here when ``None``)."""
    if rows is None:
        flat = acts.rows.reshape(-1, acts.rows.shape[-1])
        rows = reduction.rows(flat).astype(np.float32).reshape(len(acts), acts.locations, -1)
    if kind == "logits":
        return logit_term(rows, acts.targets.mean(axis=1), linear[0], reduction)
    return gauss_newton_term(rows, acts.targets, acts.jacobian, reduction)


def _kept(targets: np.ndarray, basis: np.ndarray) -> float:
    """Fraction of the targets' (uncentred) energy in the span of ``basis``."""
    total = float(np.sum(np.square(targets, dtype=np.float64)))
    kept = float(np.sum(np.square(targets @ basis, dtype=np.float64)))
    return kept / total if total > 0 else 1.0
