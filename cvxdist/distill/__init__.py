"""Convex block distillation: students, the end-to-end pipeline and its evaluation."""

from cvxdist.distill.pipeline import (
    BlockStudent,
    DistillConfig,
    SplicedEvaluator,
    distill,
    evaluate_spliced,
    spliced_predict,
    stages_of,
)
from cvxdist.distill.student import GatedStudent, Reduction, student_from_network

__all__ = [
    "BlockStudent",
    "DistillConfig",
    "GatedStudent",
    "Reduction",
    "SplicedEvaluator",
    "distill",
    "evaluate_spliced",
    "spliced_predict",
    "stages_of",
    "student_from_network",
]
