"""Flax teachers with named cut points (see `cvxdist.teachers.models` for architectures and
`cvxdist.teachers.teacher` for loading, prefix / block / suffix functions and splicing)."""

from cvxdist.teachers.checkpoint import CheckpointError
from cvxdist.teachers.models import (
    MODEL_NAMES,
    ArchConfig,
    CutNetwork,
    build_model,
    cut_names,
    cut_spans,
    segment_names,
)
from cvxdist.teachers.teacher import (
    CutFunctions,
    Teacher,
    UnknownCutError,
    batched_apply,
    count_params,
    init_variables,
    load_teacher,
    save_teacher,
    shipped_teachers,
    teacher_dir,
    untrained_teacher,
)

__all__ = [
    "MODEL_NAMES",
    "ArchConfig",
    "CheckpointError",
    "CutFunctions",
    "CutNetwork",
    "Teacher",
    "UnknownCutError",
    "batched_apply",
    "build_model",
    "count_params",
    "cut_names",
    "cut_spans",
    "init_variables",
    "load_teacher",
    "save_teacher",
    "segment_names",
    "shipped_teachers",
    "teacher_dir",
    "untrained_teacher",
]
