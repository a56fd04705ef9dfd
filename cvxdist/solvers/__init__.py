"""Solvers of the gated-ReLU problem, all run by one bounded loop (:mod:`.common`).

- ``fista``: R-FISTA (:mod:`.fista`), for every problem kind;
- ``admm``: ADMM with a kernel U-step (:mod:`.admm`), for plain gated rows;
- ``auto``: picks one by problem shape (:func:`choose_solver`).
"""

from cvxdist.solvers import costs
from cvxdist.solvers.admm import Admm
from cvxdist.solvers.api import (
    SOLVERS,
    choose_solver,
    lam_grid,
    make_solver,
    path_solver,
    register_solver,
    resolve_lam,
    solve,
    solve_batch,
    solve_path,
    stack_problems,
)
from cvxdist.solvers.common import (
    RESULTS,
    IterativeSolver,
    Solution,
    SolveStats,
    Weights,
    iterate,
    trace_count,
)
from cvxdist.solvers.fista import Fista, FistaState

register_solver("admm", Admm)

__all__ = [
    "RESULTS",
    "SOLVERS",
    "Fista",
    "FistaState",
    "IterativeSolver",
    "Solution",
    "SolveStats",
    "Weights",
    "choose_solver",
    "costs",
    "iterate",
    "lam_grid",
    "make_solver",
    "path_solver",
    "register_solver",
    "resolve_lam",
    "solve",
    "solve_batch",
    "solve_path",
    "stack_problems",
    "trace_count",
]
