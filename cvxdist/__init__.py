"""cvxdist: convex distillation of deep-network blocks into gated-ReLU students.

Importing the package is cheap: submodules are loaded on first attribute access, and
TensorFlow Datasets / Flax are only imported by the modules that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "problems",
    "operators",
    "prox",
    "gates",
    "solvers",
    "mapping",
    "data",
    "teachers",
    "streaming",
    "training",
    "distill",
    "baselines",
}

# Convenience re-exports: name -> submodule that defines it.
_EXPORTS = {
    "GatedReluProblem": "problems",
    "make_problem": "problems",
    "lam_max": "problems",
    "solve": "solvers",
    "solve_path": "solvers",
    "solve_batch": "solvers",
    "Solution": "solvers",
    "RESULTS": "solvers",
    "to_network": "mapping",
    "predict": "mapping",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"cvxdist.{name}")
    if name in _EXPORTS:
        module = importlib.import_module(f"cvxdist.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'cvxdist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_EXPORTS))
