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
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cvxdist.distill.config import GAUSS_NEWTON_IMAGES, DistillConfig, stages_of  # noqa: F401
from cvxdist.distill.evaluation import evaluate_spliced, spliced_predict  # noqa: F401
from cvxdist.distill.objectives import (
    TermData,
    convex_problem,
)
from cvxdist.distill.prepare import PreparedBlock, fit_reduction, prepare_block  # noqa: F401
from cvxdist.distill.student import (
    BlockStudent,
    Reduction,
    parameter_count,
    student_from_network,
)
from cvxdist.errors import UserError
from cvxdist.teachers.teacher import Teacher


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
