"""Benchmarks of cvxdist (run from a source checkout with ``cvxdist bench NAME``).

- ``solvers``: R-FISTA against pyscnn's R-FISTA on the same convex problem, timed to the same
  relative duality gap (:mod:`benchmarks.solvers`).
- ``distill``: convex distillation against Adam, logit KD and pruning, experiments E1-E4
  (:mod:`benchmarks.distill`).

Each is a package whose ``__init__`` follows the interface ``cvxdist bench`` checks
(:class:`cvxdist.commands.bench.Benchmark`: ``register(parser)``, ``run(args) -> int``,
``report(out_dir)``). ``gpu_check`` and ``streaming`` are scripts (``python -m``).
"""
