"""`cvxdist bench distill`: convex block distillation against its baselines (DESIGN §5-6).

Experiments (each point: one seed; the seed changes the gates, the training subset, the row
subsample and the Adam initialisations; tables give mean ± std over seeds):

* **E1** accuracy vs student size (a ladder of gates / reduced dimensions / λ) for the last
  stage, the one before it, and both (the second solved on the outputs of the first);
* **E2** accuracy vs samples per class (the last stage, one size), one series per row cap:
  uncapped, the rows scale with the images; capped, the effect of the cap;
* **E3** what each method reaches in how much time: the convex solver(s) run to a series of
  duality-gap tolerances against Adam's loss curves; and test accuracy against wall time,
  rows included, the convex student a whole λ path, against Adam and logit KD;
* **E4** the two-layer head student on pooled features, with and without polishing.

Methods (same block, same rows and targets from ``prepare_block``, same squared loss, sizes
matched to the convex student's parameter count with gates and reductions included): the
convex student; ``relu-adam`` / ``relu-adam-mb`` (learned ReLU, Adam, full / mini-batch);
``fixed-gate-adam`` (the convex student's gated network trained by Adam); ``logit-kd``
(Hinton logit distillation of learned-ReLU blocks, label-free); ``pruning`` (global magnitude
pruning of the teacher block's conv kernels, no fine-tuning). See :mod:`cvxdist.baselines`.
Every grid has an ``objectives`` axis (what the convex student fits; ``activations`` today).

Modules: :mod:`.grid` (what runs), :mod:`.experiments` and :mod:`.timing` (one point),
:mod:`.records` (the resumable record store), :mod:`.harness` (the loop, report refresh),
:mod:`.summary`, :mod:`.plots` and :mod:`.report`. This module is the benchmark interface of
``cvxdist bench`` (:class:`cvxdist.commands.bench.Benchmark`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from benchmarks.distill import harness
from benchmarks.distill.grid import (
    EXPERIMENTS,
    Grid,
    Size,
    default_teacher,
    full_grid,
    points,
    quick_grid,
    select_experiments,
)
from benchmarks.distill.harness import combined_report, refresh, run_grid
from benchmarks.distill.records import record_key
from benchmarks.distill.report import markdown_report
from benchmarks.distill.summary import summarize

__all__ = [
    "EXPERIMENTS",
    "Grid",
    "Size",
    "combined_report",
    "default_teacher",
    "full_grid",
    "markdown_report",
    "points",
    "quick_grid",
    "record_key",
    "refresh",
    "register",
    "report",
    "run",
    "run_grid",
    "select_experiments",
    "summarize",
]


def register(parser: argparse.ArgumentParser) -> None:
    """``cvxdist bench distill`` options (``--only`` names experiments, ``--repeats`` seeds)."""
    parser.add_argument(
        "--teacher",
        help="teacher of the full grid (default: fashion-resnet20 when it and Fashion-MNIST "
        "are installed, else digits-cnn); --quick always uses digits-cnn",
    )


def run(args: argparse.Namespace) -> int:
    """Run or resume the grid under ``args.out``; 1 when a point failed (rerun to retry)."""
    from cvxdist.errors import UserError

    try:
        experiments = select_experiments(args.only)
    except ValueError as err:
        raise UserError(str(err)) from err
    grid = quick_grid() if args.quick else full_grid(args.teacher or default_teacher())
    if args.repeats is not None:
        grid = dataclasses.replace(grid, seeds=tuple(range(args.repeats)))
    payload = run_grid(args.out, grid, experiments)
    print(markdown_report(payload))
    print(f"wrote {Path(args.out) / 'distill.json'}", file=sys.stderr)
    if payload["failed"]:
        print(f"{len(payload['failed'])} point(s) failed; run again to retry", file=sys.stderr)
        return 1
    return 0


def report(out_dir: Path) -> str:
    """Rewrite ``out_dir/REPORT.md`` from the records of its grid (nothing computed)."""
    return harness.report(Path(out_dir))
