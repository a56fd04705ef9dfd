"""Convex block distillation: students, the end-to-end pipeline and its evaluation."""

from cvxdist.distill.evaluation import SplicedEvaluator, evaluate_spliced, spliced_predict
from cvxdist.distill.objectives import OBJECTIVES
from cvxdist.distill.pipeline import DistillConfig, distill, stages_of
from cvxdist.distill.student import BlockStudent, GatedStudent, Reduction, student_from_network

__all__ = [
    "OBJECTIVES",
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
