"""What a distillation run is asked to do (`DistillConfig`) and the units it splits the
block ``cut..to`` into (`stages_of`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from cvxdist.distill.evaluation import evaluate_spliced, spliced_predict  # noqa: F401
from cvxdist.distill.objectives import (
    OBJECTIVES,
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
