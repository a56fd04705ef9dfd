"""Convex block distillation end to end: rows, reduction, gates, solve, student, splice.

The block ``cut..to`` is split into *units*, one student each: the teacher's stages (a
partly covered stage is one unit), or with ``per_block`` every residual block. For each
unit ``b`` (in order):

1. stream the training images; the block input is computed through the *already replaced*
   prefix (teacher stages before ``cut`` then the students solved so far), the target is the
   teacher's own stage output on the teacher's path;
2. rows: ``k×k`` patches of the input at each output location (a seeded subsample of
   locations, at most ``max_rows`` rows), or pooled features for the ``head``;
3. reduction: PCA of rows and targets, keeping the requested fraction of variance;
4. gates sampled from the rows (seeded) and deduplicated; the convex problem (``coupled`` or
   ``nuclear``, a linear skip and bias) solved to a certified gap, optionally along a λ path;
5. the solution mapped to a Flax :class:`~cvxdist.distill.student.GatedStudent`.

Labels are read only by :func:`evaluate_spliced`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.distill.student import (
    GatedStudent,
    Reduction,
    flops,
    parameter_count,
    project_channels,
    student_from_network,
)
from cvxdist.errors import UserError
from cvxdist.teachers.teacher import Teacher, batched_apply


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation (defaults suit the shipped Fashion-MNIST teacher)."""

    cut: str
    to: str | None = None
    gates: int = 128
    gate_kind: str = "data"
    reg: str = "nuclear"
    lam_frac: float = 0.02
    lam_path: tuple[float, ...] | None = None  # label-free selection over these fractions
    agreement_tol: float = 0.01  # allowed drop of held-out agreement with the teacher
    max_params: int | None = None  # λ path: size budget of all replaced stages together
    solver: str = "auto"
    tol: float = 1e-3
    max_iters: int = 3000
    kernel_size: int = 3
    max_rows: int = 40_000
    input_variance: float = 0.999
    max_input_dim: int = 128
    channel_dim: int | None = None  # PCA of the block input's channels before the patches
    output_variance: float = 0.995
    max_output_dim: int = 64
    skip: bool = True
    polish: bool = False  # refit the kept gates with group_elastic (see `polish`)
    refit: bool = False  # least-squares refit of the output layer (see `refit_output`)
    refit_ridge: float = 1e-4
    polish_alpha: float = 0.5
    polish_lam_frac: float = 1e-3
    head_student: bool = False  # one student on pooled features for cut..head
    per_block: bool = False  # one student per residual block instead of per stage
    identity: bool = False  # identity shortcut where the block keeps its shape (fits y - z)
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.gates < 1:
            raise UserError(f"the number of gates must be at least 1, got {self.gates}")
        if not self.lam_frac >= 0:
            raise UserError(f"lam_frac must be >= 0, got {self.lam_frac}")
        if self.max_params is not None and self.max_params < 1:
            raise UserError(f"max_params must be positive, got {self.max_params}")
        if self.max_rows < 1:
            raise UserError(f"max_rows must be positive, got {self.max_rows}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise UserError(f"kernel size must be a positive odd number, got {self.kernel_size}")
        if self.channel_dim is not None and self.channel_dim < 1:
            raise UserError(f"channel_dim must be at least 1, got {self.channel_dim}")
        for name in ("max_input_dim", "max_output_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("input_variance", "output_variance"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise UserError(f"{name} must be in (0, 1], got {value}")


@dataclasses.dataclass
class BlockStudent:
    """One solved stage: the Flax module, its variables and what it took to get there."""

    stage: str
    module: GatedStudent
    variables: dict[str, Any]
    report: dict[str, Any]

    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        return self.module.apply(self.variables, z)


def stages_of(teacher: Teacher, cut: str, to: str | None, per_block: bool = False) -> list[str]:
    """The units of the block ``cut..to``, one student each (validates the names, listing
    the valid ones): every segment with ``per_block``, else one unit per stage touched, a
    partly covered stage written ``first..last`` (``stage3.block2..stage3.block3``)."""
    from cvxdist.teachers.models import group_by_stage

    start, stop = teacher.resolve(cut, to)
    segments = teacher.segments[start : stop + 1]
    if per_block:
        return list(segments)
    units = []
    for stage, run in group_by_stage(segments):
        if teacher.resolve(stage) == teacher.resolve(run[0], run[-1]):
            units.append(stage)
        else:
            units.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}")
    return units


def chain(students: Sequence[BlockStudent]) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    """``f(variables_list, z)`` applying the students in order (variables traced)."""
    modules = [s.module for s in students]

    def run(variables: Sequence[Any], z: jnp.ndarray) -> jnp.ndarray:
        for module, v in zip(modules, variables):
            z = module.apply(v, z)
        return z

    return run


def _replaced_input_fn(
    teacher: Teacher, first_stage: str, students: Sequence[BlockStudent]
) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    prefix = teacher.cut_functions(first_stage).prefix
    run_students = chain(students)
    student_vars = [s.variables for s in students]

    def fn(variables: Any, x: jnp.ndarray) -> jnp.ndarray:
        return run_students(student_vars, prefix(variables, x))

    return fn


def collect_rows(
    teacher: Teacher,
    images: np.ndarray,
    stage: str,
    input_fn: Callable[[Any, jnp.ndarray], jnp.ndarray],
    config: DistillConfig,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Raw rows ``(N, D)`` and targets ``(N, C)`` for ``stage`` (bounded by ``max_rows``).

    Patch rows come from a seeded subsample of output locations of every image (so the row
    budget is spread over all images); head rows are pooled block inputs, one per image.
    """
    from cvxdist.streaming import image_patches, infer_stride

    first, _, last = stage.partition("..")
    teacher_fns = teacher.cut_functions(first, last or None)
    head = (last or first) == "head"

    def io(variables: Any, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        z = input_fn(variables, x)
        y = teacher_fns.block(variables, teacher_fns.prefix(variables, x))
        return z, y

    probe_z, probe_y = jax.eval_shape(io, teacher.variables, jnp.zeros((1, *images.shape[1:])))
    info: dict[str, Any] = {"input_shape": list(probe_z.shape[1:])}
    info["output_shape"] = list(probe_y.shape[1:])
    if head:
        k, stride, locations = 0, 1, 1
    else:
        if len(probe_y.shape) != 4:
            raise UserError(f"stage {stage!r} does not output feature maps; use --cut head")
        k = config.kernel_size
        stride = infer_stride(tuple(probe_z.shape[1:3]), tuple(probe_y.shape[1:3]))
        locations = probe_y.shape[1] * probe_y.shape[2]
    per_image = max(1, min(locations, -(-config.max_rows // max(len(images), 1))))
    identity = config.identity and not head and probe_z.shape == probe_y.shape
    info.update(kernel_size=k, stride=stride, locations_per_image=per_image, identity=identity)

    def rows_fn(variables: Any, x: jnp.ndarray, pick: jnp.ndarray) -> tuple:
        z, y = io(variables, x)
        if head:
            return z.mean(axis=(1, 2)) if z.ndim == 4 else z, y
        if identity:  # the student adds its own input back: fit what the block adds to it
            y = y - z
        patches = image_patches(z, k, stride)
        patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        y = y.reshape(y.shape[0], -1, y.shape[-1])
        take = jax.vmap(lambda a, idx: a[idx])
        return take(patches, pick), take(y, pick)

    rng = np.random.default_rng(config.seed)
    picks = np.stack(
        [rng.choice(locations, per_image, replace=False) for _ in range(len(images))]
    ).astype(np.int32)
    jitted = jax.jit(rows_fn)
    rows, targets = [], []
    from tqdm.auto import tqdm

    size = max(1, min(config.batch_size, len(images)))
    for begin in tqdm(
        range(0, len(images), size), desc=f"rows {stage}", disable=not progress, leave=False
    ):
        x, pick = images[begin : begin + size], picks[begin : begin + size]
        valid = len(x)
        if valid < size:  # pad the last batch so the function compiles once
            x = np.concatenate([x, np.zeros((size - valid, *x.shape[1:]), x.dtype)])
            pick = np.concatenate([pick, np.zeros((size - valid, *pick.shape[1:]), pick.dtype)])
        r, t = jax.device_get(jitted(teacher.variables, x, pick))
        rows.append(r[:valid].reshape(-1, r.shape[-1]))
        targets.append(t[:valid].reshape(-1, t.shape[-1]))
    rows_np = np.concatenate(rows).astype(np.float32)
    targets_np = np.concatenate(targets).astype(np.float32)
    if len(rows_np) > config.max_rows:
        keep = np.sort(rng.choice(len(rows_np), config.max_rows, replace=False))
        rows_np, targets_np = rows_np[keep], targets_np[keep]
    info["rows"] = len(rows_np)
    return rows_np, targets_np, info


def fit_reduction(
    rows: np.ndarray,
    targets: np.ndarray,
    config: DistillConfig,
    reduce_input: bool = True,
    patch: tuple[int, int] | None = None,
) -> Reduction:
    """PCA bases keeping ``input_variance`` / ``output_variance`` (capped in dimension).

    With ``config.channel_dim`` and ``patch = (k, C_in)`` of conv rows, the channels are
    reduced first: the PCA basis of the patches' centre pixels (``C_in -> channel_dim``) is
    applied to every pixel, and the patch PCA is fitted on the result.
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
    out_mean, out_basis, out_kept = basis(targets, config.output_variance, config.max_output_dim)
    if not reduce_input or in_basis.shape[1] >= rows.shape[1]:
        in_basis, in_kept = None, 1.0
        in_mean = np.zeros(rows.shape[1])
    if out_basis.shape[1] >= targets.shape[1]:
        out_basis, out_kept = None, 1.0
    return Reduction(
        in_mean, in_basis, out_mean, out_basis, in_kept, out_kept, channel_basis, channel_kept
    )


def solve_block(
    rows: np.ndarray,
    targets: np.ndarray,
    config: DistillConfig,
    lam_fracs: Sequence[float],
    progress: bool = True,
) -> tuple[np.ndarray, list[Any], dict[str, Any]]:
    """Gates and one solution per λ fraction (warm-started path, largest λ first)."""
    from cvxdist.gates import sample_gates
    from cvxdist.problems import lam_max, make_problem
    from cvxdist.prox import get_regularizer
    from cvxdist.solvers import choose_solver, solve_path

    gates = sample_gates(
        jax.random.key(config.seed), rows, config.gates, kind=config.gate_kind, noise=0.05
    )
    problem = make_problem(rows, targets, gates, skip=config.skip, bias=True)
    auto = config.solver == "auto"
    solver = choose_solver(problem, path_length=len(lam_fracs)) if auto else config.solver
    reg = get_regularizer(config.reg)
    lmax = float(lam_max(problem, reg))
    start = time.perf_counter()
    solutions = solve_path(
        problem,
        lam_fracs=list(lam_fracs),
        reg=reg,
        solver=solver,
        tol=config.tol,
        max_iters=config.max_iters,
        progress=progress,
    )
    info = {
        "gates_sampled": config.gates,
        "gates_distinct": int(gates.shape[1]),
        "solver": solver,
        "reg": config.reg,
        "lam_max": lmax,
        "solve_time_s": time.perf_counter() - start,
        "rows": int(rows.shape[0]),
        "features": int(rows.shape[1]),
        "outputs": int(targets.shape[1]),
    }
    return gates, solutions, info


def _solution_report(solution: Any) -> dict[str, Any]:
    stats = solution.stats
    return {
        "lam": float(stats.lam),
        "iterations": int(stats.iterations),
        "rel_gap": float(stats.rel_gap),
        "objective": float(stats.objective),
        "converged": bool(solution.converged),
        "active_gates": int(stats.active_gates),
        "time_s": float(stats.time_s),
    }


def refit_output(
    net: Any, rows: np.ndarray, targets: np.ndarray, ridge: float = 1e-4
) -> tuple[Any, dict[str, Any]]:
    """Least-squares refit of the output layer (``w_out``, skip, bias) on the fixed hidden layer.

    The regularized solve picks the gates and the neurons' input weights but shrinks every
    weight towards zero. With the hidden layer ``h = (a W_in) ⊙ masks`` fixed, the output
    layer is a ridge regression of the targets on ``[h, a, 1]`` (``ridge`` relative to the
    mean diagonal of the Gram matrix): no new parameter, no gate or neuron added, and the
    shrinkage of the second layer is undone. Returns the new network and the training
    relative squared errors before and after.
    """
    from cvxdist.mapping import predict

    X = np.asarray(rows, np.float64)
    T = np.asarray(targets, np.float64)
    masks = (X @ np.asarray(net.gates, np.float64)) >= 0
    hidden = (X @ np.asarray(net.w_in, np.float64)) * masks[:, np.asarray(net.neuron_gate)]
    blocks = [hidden] + ([X] if net.skip is not None else []) + [np.ones((len(X), 1))]
    F = np.concatenate(blocks, axis=1)
    gram = F.T @ F
    gram[np.diag_indices_from(gram)] += ridge * max(float(np.trace(gram)) / len(gram), 1e-30)
    W = np.linalg.solve(gram, F.T @ T)
    K, d = hidden.shape[1], X.shape[1]
    dtype = np.asarray(net.w_out).dtype
    refit = net._replace(
        w_out=jnp.asarray(W[:K], dtype),
        skip=None if net.skip is None else jnp.asarray(W[K : K + d], dtype),
        bias=jnp.asarray(W[-1], dtype),
    )
    total = max(float(np.sum((T - T.mean(axis=0)) ** 2)), 1e-30)
    before = float(np.sum((np.asarray(predict(net, rows), np.float64) - T) ** 2)) / total
    after = float(np.sum((F @ W - T) ** 2)) / total
    return refit, {"ridge": ridge, "train_rel_err_before": before, "train_rel_err_after": after}


def build_student(
    solution: Any,
    gates: np.ndarray,
    reduction: Reduction,
    row_info: dict[str, Any],
    stage: str,
    refit: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> BlockStudent:
    """The deployable student of one solution (``refit``: rows, targets, ridge of
    :func:`refit_output`, applied to the mapped network)."""
    from cvxdist.mapping import to_network

    net = to_network(solution, gates)
    refit_info = None
    if refit is not None and net.num_neurons > 0:
        net, refit_info = refit_output(net, *refit)
    in_shape, out_shape = row_info["input_shape"], row_info["output_shape"]
    module, variables = student_from_network(
        net,
        reduction,
        in_channels=int(in_shape[-1]),
        out_channels=int(out_shape[-1]),
        kernel_size=int(row_info["kernel_size"]),
        stride=int(row_info["stride"]),
        identity=bool(row_info.get("identity", False)),
    )
    report = {
        **_solution_report(solution),
        "neurons": net.num_neurons,
        "gates_used": net.num_gates,
        "params": parameter_count(variables),
        "input_dim": module.features,
        "output_dim": module.outputs,
        "input_variance_kept": reduction.in_kept,
        "channel_dim": module.reduced_channels,
        "channel_variance_kept": reduction.channel_kept,
        "output_variance_kept": reduction.out_kept,
    }
    if refit_info is not None:
        report["refit"] = refit_info
    return BlockStudent(stage, module, variables, report)


def distill(
    teacher: Teacher,
    train_images: np.ndarray,
    config: DistillConfig,
    *,
    holdout_images: np.ndarray | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[BlockStudent]:
    """Replace the stages ``config.cut..config.to`` of ``teacher`` by convex students.

    With ``config.lam_path`` and ``holdout_images``, each stage is solved along the λ path
    and the smallest student whose held-out agreement with the teacher is within
    ``agreement_tol`` of the best one is kept (label-free model selection). With
    ``config.max_params`` (a budget for all the stages together), each stage competes only
    among students within an equal share of the budget the stages before it left.

    With ``cache_dir``, every finished stage is saved there under a key of the teacher
    checkpoint, the images, the settings and the stages before it; a rerun after an
    interruption loads the finished stages instead of solving them again.
    """
    stages = stages_of(teacher, config.cut, config.to, config.per_block)
    if len(train_images) == 0:
        raise UserError("no training images: the subset is empty")
    log = log or (lambda _: None)
    students: list[BlockStudent] = []
    if config.head_student:
        if stages[-1] != "head":
            raise UserError(f"a head student replaces {config.cut}..head; use --to head")
        stages = [f"{config.cut}..head"]  # one pooled-feature student for the whole range
    key = _cache_seed(teacher, train_images, holdout_images, config)
    for index, stage in enumerate(stages):
        key = hashlib.sha256(f"{key}/{stage}".encode()).hexdigest()[:24]
        cached = _load_stage(cache_dir, key)
        if cached is not None:
            log(f"{stage}: loaded from the cache ({key})")
            students.append(cached)
            continue
        block = prepare_block(teacher, train_images, stage, config, students, progress)
        fracs = config.lam_path if config.lam_path else (config.lam_frac,)
        stage_config = config
        if config.max_params is not None:  # an equal share of what the stages before left
            left = config.max_params - sum(s.report["params"] for s in students)
            share = max(1, left // (len(stages) - index))
            stage_config = dataclasses.replace(config, max_params=share)
        student = solve_prepared(
            teacher, block, stage_config, fracs, students, holdout_images, progress, log
        )
        _save_stage(cache_dir, key, student)
        students.append(student)
    return students


def _cache_seed(
    teacher: Teacher, images: np.ndarray, holdout: np.ndarray | None, config: DistillConfig
) -> str:
    from cvxdist.streaming import images_fingerprint

    parts = [
        teacher.checkpoint_sha256,
        images_fingerprint(images),
        "" if holdout is None else images_fingerprint(holdout),
        json.dumps(dataclasses.asdict(config), sort_keys=True, default=str),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _load_stage(cache_dir: str | os.PathLike | None, key: str) -> BlockStudent | None:
    if cache_dir is None:
        return None
    from cvxdist.distill.io import load_students

    folder = Path(cache_dir) / f"stage-{key}"
    if not folder.is_dir():
        return None
    try:
        students, _ = load_students(folder)
    except UserError:
        return None  # an unreadable entry is recomputed
    return students[0] if students else None


def _save_stage(cache_dir: str | os.PathLike | None, key: str, student: BlockStudent) -> None:
    if cache_dir is None:
        return
    from cvxdist.distill.io import save_students

    folder = Path(cache_dir) / f"stage-{key}"
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_students(tmp, [student], {"key": key})
    os.replace(tmp, folder)


@dataclasses.dataclass
class PreparedBlock:
    """Reduced rows ``(N, d')`` and targets ``(N, c')`` of one stage, with their reduction."""

    stage: str
    rows: np.ndarray
    targets: np.ndarray
    reduction: Reduction
    row_info: dict[str, Any]


def prepare_block(
    teacher: Teacher,
    train_images: np.ndarray,
    stage: str,
    config: DistillConfig,
    replaced: Sequence[BlockStudent] = (),
    progress: bool = True,
) -> PreparedBlock:
    """Rows of ``stage`` with inputs through the already ``replaced`` stages, reduced."""
    input_fn = _replaced_input_fn(teacher, config.cut, replaced)
    rows, targets, row_info = collect_rows(teacher, train_images, stage, input_fn, config, progress)
    patch = (int(row_info["kernel_size"]), int(row_info["input_shape"][-1]))
    reduction = fit_reduction(rows, targets, config, patch=patch)
    return PreparedBlock(
        stage, reduction.rows(rows), reduction.targets(targets), reduction, row_info
    )


def solve_prepared(
    teacher: Teacher,
    block: PreparedBlock,
    config: DistillConfig,
    lam_fracs: Sequence[float],
    replaced: Sequence[BlockStudent] = (),
    holdout_images: np.ndarray | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> BlockStudent:
    """Solve a prepared stage (one λ, or a path with label-free selection)."""
    log = log or (lambda _: None)
    gates, solutions, solve_info = solve_block(
        block.rows, block.targets, config, lam_fracs, progress
    )
    refit = (block.rows, block.targets, config.refit_ridge) if config.refit else None
    candidates = [
        build_student(s, gates, block.reduction, block.row_info, block.stage, refit)
        for s in solutions
    ]
    path_report: list[dict[str, Any]] = []
    pick = 0
    if len(candidates) > 1:
        pick, path_report = _select(
            teacher, config, list(replaced), candidates, holdout_images, log
        )
    chosen = candidates[pick]
    if config.polish:
        polished, polish_info = polish(block, gates, solutions[pick], config)
        chosen = build_student(
            polished, polish_info.pop("gates"), block.reduction, block.row_info, block.stage, refit
        )
        chosen.report["polish"] = polish_info
    chosen.report.update(row_info=block.row_info, **solve_info, path=path_report)
    log(
        f"{block.stage}: {chosen.report['active_gates']} gates, {chosen.report['neurons']} "
        f"neurons, {chosen.report['params']} params, gap {chosen.report['rel_gap']:.1e}"
    )
    return chosen


def _select(
    teacher: Teacher,
    config: DistillConfig,
    done: list[BlockStudent],
    candidates: list[BlockStudent],
    holdout_images: np.ndarray | None,
    log: Callable[[str], None],
) -> tuple[int, list[dict[str, Any]]]:
    """Index of the smallest candidate within ``agreement_tol`` of the best held-out agreement.

    With ``config.max_params``, only candidates of at most that size compete (the smallest
    candidate if none fits).
    """
    if holdout_images is None or len(holdout_images) == 0:
        raise UserError("a λ path needs held-out training images for model selection")
    teacher_pred = teacher.predict(holdout_images).argmax(-1)
    stage = candidates[0].stage
    agreements = []
    for candidate in candidates:
        last = stage.split("..")[-1]
        spliced = spliced_predict(teacher, config.cut, last, [*done, candidate])
        agreements.append(float(np.mean(spliced(holdout_images).argmax(-1) == teacher_pred)))
    sizes = [c.report["params"] for c in candidates]
    eligible = list(range(len(candidates)))
    if config.max_params is not None:
        fits = [i for i in eligible if sizes[i] <= config.max_params]
        if not fits:
            log(f"{stage}: no student on the λ path fits {config.max_params} parameters")
        eligible = fits or [min(eligible, key=lambda i: sizes[i])]
    best = max(agreements[i] for i in eligible)
    ok = [i for i in eligible if agreements[i] >= best - config.agreement_tol]
    pick = min(ok, key=lambda i: sizes[i])
    report = [
        {"lam": c.report["lam"], "params": c.report["params"], "holdout_agreement": a}
        for c, a in zip(candidates, agreements)
    ]
    log(f"{stage}: selected λ={candidates[pick].report['lam']:.3g} of {len(candidates)}")
    return pick, report


def polish(
    block: PreparedBlock, gates: np.ndarray, solution: Any, config: DistillConfig
) -> tuple[Any, dict[str, Any]]:
    """Refit on the gates the sparse solve kept, with the ``group_elastic`` regularizer.

    The group-lasso solve selects the gates (the hidden layer's patterns) but shrinks every
    weight towards zero. Polishing re-solves the convex problem restricted to the kept gates
    with ``α||U_i|| + (1-α)/2 ||U_i||²`` at a small λ (mostly ridge), warm-started from the
    solution: the fit improves, no new gate can appear, and the refit is certified too.
    """
    from cvxdist.problems import lam_max, make_problem
    from cvxdist.prox import Coupled, GroupElastic
    from cvxdist.solvers import solve

    U = np.asarray(solution.weights.U)
    kept = np.flatnonzero(np.linalg.norm(U.reshape(U.shape[0], -1), axis=1) > 0)
    if kept.size == 0:
        return solution, {"gates": gates, "kept_gates": 0}
    sub_gates = gates[:, kept]
    problem = make_problem(block.rows, block.targets, sub_gates, skip=config.skip, bias=True)
    # λ on the scale of the group-lasso part (λ_max of ``coupled``), so α and the ridge
    # weight are comparable to the selection solve rather than inflated by 1/α.
    lam = config.polish_lam_frac * float(lam_max(problem, Coupled()))
    refit = solve(
        problem,
        lam,
        reg=GroupElastic(alpha=config.polish_alpha),
        tol=config.tol,
        max_iters=config.max_iters,
        init=U[kept],
    )
    info = {
        "gates": sub_gates,
        "kept_gates": int(kept.size),
        "alpha": config.polish_alpha,
        "lam": float(refit.stats.lam),
        "objective": float(refit.stats.objective),
        "rel_gap": float(refit.stats.rel_gap),
        "iterations": int(refit.stats.iterations),
        "time_s": float(refit.stats.time_s),
    }
    return refit, info


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
