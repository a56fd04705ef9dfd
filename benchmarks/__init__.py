"""Benchmarks of cvxdist (run from a source checkout with ``cvxdist bench NAME``).

- ``solvers``: R-FISTA against pyscnn's R-FISTA on the same convex problem, timed to the same
  relative duality gap (:mod:`benchmarks.solvers`).
"""
