"""What the distillation harness runs: student sizes, the grid, and the settings of every point.

A point is one experiment at one setting and one seed; its ``settings`` (JSON) are everything
its result depends on, and their hash is the point's record key (:mod:`.records`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

EXPERIMENTS = ("E1", "E2", "E3", "E4")
METHODS = ("convex", "relu-adam", "relu-adam-mb", "fixed-gate-adam", "logit-kd", "pruning")
E1_METHODS = ("convex", "relu-adam", "fixed-gate-adam", "logit-kd", "pruning")
E3_METHODS = ("relu-adam", "relu-adam-mb", "fixed-gate-adam")
E3_PATH_METHODS = ("relu-adam", "relu-adam-mb", "fixed-gate-adam", "logit-kd")
E4_METHODS = ("convex", "convex+polish", "relu-adam")
#: What a result keeps of the evaluation of a spliced network.
EVALUATED = (
    "accuracy",
    "agreement",
    "block_rel_mse",
    "block_params",
    "teacher_block_params",
    "compression",
)
#: What the convex student fits (DESIGN §2a); the lead's ``--objective`` adds the others.
OBJECTIVES = ("activations", "logits", "mixed", "gauss-newton")
DEFAULT_OBJECTIVE = "activations"
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
    """Everything the harness runs (a point's record key hashes the settings it depends on).

    ``max_rows`` caps the rows per stage (``None``: every output location of every image, so
    the rows scale with the images). E2 runs one series per cap in ``e2_max_rows`` (empty:
    ``max_rows`` only); the first is the main series, the others show the effect of the cap.
    E3 has two parts: the solvers run to the tolerances ``e3_tols`` against Adam's loss curve
    (``e3_methods``), and, with ``e3_lam_path``, every method's test accuracy against wall time
    (``e3_path_methods``), rows included, the convex student a warm-started λ path from the
    largest fraction down to ``e3_size.lam_frac``.
    """

    teacher: str
    seeds: tuple[int, ...]
    max_rows: int | None
    test_limit: int | None
    # ``coupled`` (group lasso): the nuclear norm's batched SVDs can deadlock jaxlib 0.10's
    # CPU LAPACK kernels on a 2-thread pool (see REPORT.md); override per grid if unaffected.
    reg: str = "coupled"
    tol: float = 1e-3
    max_iters: int = 3000
    objectives: tuple[str, ...] = (DEFAULT_OBJECTIVE,)
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
    e2_max_rows: tuple[int | None, ...] = ()
    e3_samples: int | None = 100
    e3_size: Size | None = None
    e3_tols: tuple[float, ...] = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4)
    e3_adam_steps: int = 3000
    e3_methods: tuple[str, ...] = E3_METHODS
    e3_lam_path: tuple[float, ...] = ()
    e3_path_methods: tuple[str, ...] = E3_PATH_METHODS
    e4_samples: tuple[int | None, ...] = (10, 100)
    e4_gates: int = 64
    e4_lam_frac: float = 0.01

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grid:
        """The grid stored in a payload (JSON lists back to tuples; new fields at their
        defaults, so a grid recorded by an older harness keeps its points)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                continue
            if key.endswith(("_size", "_sizes")):
                value = _sizes(value)
            elif isinstance(value, list):
                value = tuple(value)
            out[key] = value
        return cls(**out)


def _sizes(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return Size(**value)
    return tuple(Size(**v) for v in value)


def quick_grid() -> Grid:
    """Digits teacher, tiny sizes, two seeds (CI: a few minutes on two cores)."""
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
        e2_max_rows=(None, 100),
        e3_samples=10,
        e3_size=medium,
        e3_tols=(1e-1, 1e-3),
        e3_adam_steps=200,
        e3_lam_path=(0.2,),
        e4_samples=(10,),
        e4_gates=16,
    )


def full_grid(teacher: str) -> Grid:
    """The measured grid: three seeds, sizes up to the teacher block's."""
    common: dict[str, Any] = {
        "teacher": teacher,
        "seeds": (0, 1, 2),
        "max_rows": 4000,
        "adam_steps": 1000,
        "kd_steps": 300,
        "kd_batch": 64,
        "e2_max_rows": (None, 4000),
    }
    if teacher == "digits-cnn":
        sizes = (
            Size("XS", gates=8, input_dim=8, output_dim=6, lam_frac=0.05),
            Size("S", gates=16, input_dim=16, output_dim=8, lam_frac=0.03),
            Size("M", gates=32, input_dim=24, output_dim=12, lam_frac=0.02),
        )
        return Grid(
            **common,
            test_limit=None,
            e1_sizes=sizes,
            e1_methods=E1_METHODS,
            e1_samples=None,
            e2_size=sizes[2],
            e3_samples=None,
            e3_size=sizes[2],
            e3_lam_path=(0.3, 0.1, 0.05),
        )
    sizes = tuple(
        Size(name, gates=gates, input_dim=d, output_dim=c, lam_frac=0.01)
        for name, gates, d, c in (("XS", 8, 12, 8), ("S", 16, 16, 8), ("M", 32, 24, 12))
    )
    return Grid(
        **common,
        test_limit=3000,
        e1_sizes=sizes,
        e1_methods=("convex", "relu-adam", "logit-kd", "pruning"),  # fixed gates: E2, E3
        e1_samples=100,
        e2_size=sizes[1],
        e3_samples=100,
        e3_size=sizes[1],
        e3_adam_steps=2000,
        e3_lam_path=(0.3, 0.1, 0.03),
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


def select_experiments(only: Sequence[str] | None = None) -> tuple[str, ...]:
    """The experiments to run (``only``: names such as ``E1``; case-insensitive).

    Raises:
        ValueError: an unknown name.
    """
    if not only:
        return EXPERIMENTS
    chosen = tuple(dict.fromkeys(name.upper() for name in only))
    unknown = [name for name in chosen if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(
            f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}"
        )
    return chosen


def e2_caps(grid: Grid) -> tuple[int | None, ...]:
    """E2's row caps, the main series first."""
    return grid.e2_max_rows or (grid.max_rows,)


def lam_path(grid: Grid) -> list[float]:
    """E3's λ path (fractions of λ_max, largest first), ending at ``e3_size.lam_frac``."""
    end = grid.e3_size.lam_frac
    return sorted({end, *(f for f in grid.e3_lam_path if f > end)}, reverse=True)


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


def _common_settings(grid: Grid, objective: str) -> dict[str, Any]:
    return {
        "teacher": grid.teacher,
        "max_rows": grid.max_rows,
        "test_limit": grid.test_limit,
        "reg": grid.reg,
        "tol": grid.tol,
        "max_iters": grid.max_iters,
        "objective": objective,
    }


def points(grid: Grid, experiments: Sequence[str], stages: Sequence[str]) -> list[dict[str, Any]]:
    """Every point of the grid: ``{"experiment", "settings"}`` (settings are JSON)."""
    out = []
    for objective in grid.objectives:
        out += _objective_points(grid, experiments, stages, objective)
    return out


def _objective_points(
    grid: Grid, experiments: Sequence[str], stages: Sequence[str], objective: str
) -> list[dict[str, Any]]:
    last, previous = stages[-1], stages[-2] if len(stages) > 1 else None
    common = _common_settings(grid, objective)
    adam = {**common, **_adam_settings(grid)}
    out = []

    def add(experiment: str, **settings: Any) -> None:
        out.append({"experiment": experiment, "settings": settings})

    def block_point(experiment: str, cut: str, size: Size, **settings: Any) -> None:
        add(experiment, **{**adam, **settings}, cut=cut, size=dataclasses.asdict(size))

    if "E1" in experiments:
        named = {"last": (last, last)}
        if previous is not None:
            named.update(previous=(previous, previous), both=(previous, last))
        blocks = [named[name] for name in grid.e1_blocks if name in named]
        for (cut, to), size, seed in itertools.product(blocks, grid.e1_sizes, grid.seeds):
            block_point(
                "E1",
                cut,
                size,
                to=to,
                samples_per_class=grid.e1_samples,
                methods=list(grid.e1_methods),
                seed=seed,
            )
    if "E2" in experiments and grid.e2_size is not None:
        for cap, per_class, seed in itertools.product(e2_caps(grid), grid.e2_samples, grid.seeds):
            block_point(
                "E2",
                last,
                grid.e2_size,
                max_rows=cap,
                to=last,
                samples_per_class=per_class,
                methods=list(grid.e2_methods),
                seed=seed,
            )
    if "E3" in experiments and grid.e3_size is not None:
        e3 = {"cut": last, "to": last, "size": dataclasses.asdict(grid.e3_size)}
        e3.update(samples_per_class=grid.e3_samples)
        if grid.e3_tols:
            for seed in grid.seeds:
                add(
                    "E3",
                    **common,
                    adam_lr=grid.adam_lr,
                    adam_batch=grid.adam_batch,
                    adam_steps=grid.e3_adam_steps,
                    **e3,
                    tols=list(grid.e3_tols),
                    methods=list(grid.e3_methods),
                    seed=seed,
                )
        if grid.e3_lam_path:
            for seed in grid.seeds:
                add(
                    "E3",
                    **{**adam, "adam_steps": grid.e3_adam_steps},
                    **e3,
                    lam_path=lam_path(grid),
                    methods=list(grid.e3_path_methods),
                    seed=seed,
                )
    if "E4" in experiments:
        for per_class in grid.e4_samples:
            for seed in grid.seeds:
                add(
                    "E4",
                    **common,
                    adam_steps=grid.adam_steps,
                    adam_lr=grid.adam_lr,
                    cut=last,
                    to="head",
                    gates=grid.e4_gates,
                    lam_frac=grid.e4_lam_frac,
                    samples_per_class=per_class,
                    seed=seed,
                )
    return out
