"""Convex block distillation end to end: activations, reduction, gates, objective, solve,
student, splice.

The block ``cut..to`` is split into *units*, one student each: the teacher's stages (a
partly covered stage is one unit), or with ``per_block`` every residual block. For each
unit (in order):

1. activations of a seeded subset of whole training images (``max_rows`` rows' worth,
   :func:`cvxdist.streaming.select_images`): the block input through the *already replaced*
   prefix (teacher stages before ``cut``, then the students solved so far), the teacher's own
   block output, and the Jacobian of the logits when the objective needs it;
2. rows: ``k×k`` patches of the input at every output location (pooled features for the
   ``head``); reduction: PCA of rows and targets keeping the requested variance (the
   ``logits`` objective takes the head's column space as output basis);
3. gates sampled from the rows (seeded) and deduplicated;
4. the objective's data terms (:mod:`cvxdist.distill.objectives`; the ``logits`` term reads
   all training images, or ``max_images``, pooled per image) and the convex problem
   (plain or composed), solved to a certified gap, optionally along a λ path with label-free
   selection on held-out images;
5. the solution mapped to a Flax :class:`~cvxdist.distill.student.GatedStudent`, its output
   layer optionally refitted on the same objective (:mod:`cvxdist.distill.refit`).

Labels are read only by :mod:`cvxdist.distill.evaluation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.distill.evaluation import evaluate_spliced, spliced_predict  # noqa: F401
from cvxdist.distill.objectives import (
    OBJECTIVES,
    TermData,
    activation_term,
    concatenate_terms,
    convex_problem,
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
    parameter_count,
    project_channels,
    student_from_network,
)
from cvxdist.errors import UserError
from cvxdist.teachers.teacher import Teacher

#: Images of the Gauss–Newton term by default (its Jacobians hold k·L·c' values per image).
GAUSS_NEWTON_IMAGES = 4000


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation (defaults suit the shipped Fashion-MNIST teacher)."""

    cut: str
    to: str | None = None
    objective: str | None = None  # None: the best measured for the cut (see objectives)
    logit_weight: float = 1.0  # mixed: weight of the downstream term
    max_images: int | None = None  # images of a downstream term (None: all; GN: 4000)
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
        if self.max_iters < 1:
            raise UserError(f"max_iters must be at least 1, got {self.max_iters}")
        if not 0 < self.tol < 1:
            raise UserError(f"tol (a relative duality gap) must be in (0, 1), got {self.tol}")
        if not 0 <= self.agreement_tol <= 1:
            raise UserError(f"agreement_tol must be in [0, 1], got {self.agreement_tol}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.max_images is not None and self.max_images < 1:
            raise UserError(f"max_images must be positive, got {self.max_images}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise UserError(
                f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}"
            )
        if not (np.isfinite(self.logit_weight) and self.logit_weight > 0):
            raise UserError(f"logit_weight must be a positive number, got {self.logit_weight}")
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


def solve_block(
    block: PreparedBlock,
    config: DistillConfig,
    lam_fracs: Sequence[float],
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, list[Any], dict[str, Any]]:
    """Gates and one solution per λ fraction of the block's objective (warm-started path,
    largest λ first).

    With ``cache_dir``, each solution is saved there as soon as it is certified and a rerun
    loads the ones already there, warm-starting the rest from the last of them: an
    interrupted path resumes at the first λ not solved, with the same results.
    """
    from cvxdist.gates import sample_gates
    from cvxdist.problems import lam_max
    from cvxdist.prox import get_regularizer
    from cvxdist.solvers import choose_solver, path_solver, solve

    gates = sample_gates(
        jax.random.key(config.seed), block.rows, config.gates, kind=config.gate_kind, noise=0.05
    )
    problem = convex_problem(block.terms, gates, skip=block.skip)
    auto = config.solver == "auto"
    solver = choose_solver(problem, path_length=len(lam_fracs)) if auto else config.solver
    reg = get_regularizer(config.reg)
    lmax = float(lam_max(problem, reg))
    start = time.perf_counter()
    # As solve_path: ADMM's kernel factored once for the path, R-FISTA's λ after the first
    # solved on working sets seeded by the sequential strong rule.
    solver_obj, _ = path_solver(problem, solver, reg, len(lam_fracs))
    strong = solver == "fista"
    solutions: list[Any] = []
    previous = lmax
    from tqdm.auto import tqdm

    for frac in tqdm(sorted(lam_fracs, reverse=True), "λ path", disable=not progress, leave=False):
        lam = float(frac) * lmax
        saved = None if cache_dir is None else Path(cache_dir) / f"lam-{float(frac)!r}.npz"
        solution = _load_solution(saved)
        if solution is None:
            init = solutions[-1].weights.U if solutions else None
            solution = solve(
                problem,
                lam,
                reg=reg,
                solver=solver_obj,
                tol=config.tol,
                max_iters=config.max_iters,
                init=init,
                strong_from=previous if strong else None,
            )
            _save_solution(saved, solution)
        solutions.append(solution)
        previous = lam
    info = {
        "fitted_to": block.objective,
        "terms": [
            {"kind": t.kind, "groups": t.num_groups, "weight": t.weight} for t in block.terms
        ],
        "gates_sampled": config.gates,
        "gates_distinct": int(gates.shape[1]),
        "solver": solver,
        "reg": config.reg,
        "lam_max": lmax,
        "solve_time_s": time.perf_counter() - start,
        "rows": int(block.rows.shape[0]),
        "features": int(block.rows.shape[1]),
        "outputs": int(block.terms[0].output_width),
    }
    return gates, solutions, info


def _save_solution(path: Path | None, solution: Any) -> None:
    """One solve's weights, result code and statistics, written atomically (npz)."""
    if path is None:
        return
    from cvxdist.solvers import SolveStats

    arrays = {"result": np.asarray(jax.tree.leaves(solution.result)[0])}
    for name, value in zip(("U", "V", "b"), solution.weights):
        if value is not None:
            arrays[name] = np.asarray(value)
    for name in SolveStats._fields:
        arrays[f"stats.{name}"] = np.asarray(getattr(solution.stats, name))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load_solution(path: Path | None) -> Any:
    """A solution saved by :func:`_save_solution`, or None (absent or unreadable)."""
    if path is None or not path.is_file():
        return None
    from cvxdist.solvers import RESULTS, Solution, SolveStats, Weights

    try:
        with np.load(path) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}  # dtypes as saved
    except (OSError, ValueError, EOFError):
        return None  # recomputed
    weights = Weights(arrays["U"], arrays.get("V"), arrays.get("b"))
    result = jax.tree.unflatten(jax.tree.structure(RESULTS.successful), [arrays["result"]])
    fields = {
        name: arrays[f"stats.{name}"] for name in SolveStats._fields if f"stats.{name}" in arrays
    }
    try:  # statistics added since the file was written keep their defaults
        stats = SolveStats(**fields)
    except TypeError:
        return None  # recomputed
    return Solution(weights, result, stats)


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


def build_student(
    solution: Any,
    gates: np.ndarray,
    reduction: Reduction,
    row_info: dict[str, Any],
    stage: str,
    refit: tuple[Sequence[TermData], float] | None = None,
) -> BlockStudent:
    """The deployable student of one solution (``refit``: the data terms and the ridge of
    :func:`~cvxdist.distill.refit.refit_output`, applied to the mapped network)."""
    from cvxdist.distill.refit import refit_output
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
    checkpoint, the images, the settings and the stages before it, and so is every solved λ
    of the stage in progress; a rerun after an interruption loads the finished stages and λs
    instead of solving them again.
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
        path_cache = None if cache_dir is None else Path(cache_dir) / f"path-{key}"
        student = solve_prepared(
            teacher, block, stage_config, fracs, students, holdout_images, progress, log, path_cache
        )
        _save_stage(cache_dir, key, student)
        if path_cache is not None:  # the finished stage replaces its λ solutions
            shutil.rmtree(path_cache, ignore_errors=True)
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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_students(tmp, [student], {"key": key})
        if folder.exists():  # an unreadable entry that was just recomputed
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # the entry appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def solve_prepared(
    teacher: Teacher,
    block: PreparedBlock,
    config: DistillConfig,
    lam_fracs: Sequence[float],
    replaced: Sequence[BlockStudent] = (),
    holdout_images: np.ndarray | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> BlockStudent:
    """Solve a prepared stage (one λ, or a path with label-free selection); ``cache_dir``
    keeps each solved λ (see :func:`solve_block`)."""
    log = log or (lambda _: None)
    gates, solutions, solve_info = solve_block(block, config, lam_fracs, progress, cache_dir)
    refit = (block.terms, config.refit_ridge) if config.refit else None
    candidates = [
        build_student(s, gates, block.reduction, block.row_info, block.stage, refit)
        for s in solutions
    ]
    if refit is not None and not all(
        c.report.get("refit", {}).get("applied", True) for c in candidates
    ):
        log(
            f"{block.stage}: too few images to identify the refitted output layer; kept the solve's"
        )
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
    from cvxdist.problems import lam_max
    from cvxdist.prox import Coupled, GroupElastic
    from cvxdist.solvers import solve

    U = np.asarray(solution.weights.U)
    kept = np.flatnonzero(np.linalg.norm(U.reshape(U.shape[0], -1), axis=1) > 0)
    if kept.size == 0:
        return solution, {"gates": gates, "kept_gates": 0}
    sub_gates = gates[:, kept]
    problem = convex_problem(block.terms, sub_gates, skip=block.skip)
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
