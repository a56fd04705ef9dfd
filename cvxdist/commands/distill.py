"""`cvxdist distill`: replace teacher stages by convex students, label-free."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, help="dataset (default: the teacher's own)")
    parser.add_argument("--data-dir", default=None, help="folder of the dataset files")


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cut",
        default=None,
        help="first stage (stage3) or block (stage3.block2) to replace (default: last stage)",
    )
    parser.add_argument(
        "--to", default=None, help="last stage or block to replace (default: --cut)"
    )
    parser.add_argument(
        "--objective",
        choices=("activations", "logits", "mixed", "gauss-newton"),
        default=None,
        help="what the student is fitted to: the block's activations, the teacher's logits "
        "through a linear suffix (exact after the last stage), both (mixed), or the "
        "Gauss-Newton model of the logits for any suffix (default: logits after the last "
        "stage, mixed = activations + Gauss-Newton before it; measured best)",
    )
    parser.add_argument(
        "--logit-weight",
        type=float,
        default=1.0,
        help="mixed: weight of the downstream term (each term normalised at U = 0)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="images of the downstream term (default: all training images for logits, "
        "4000 for gauss-newton, whose Jacobians take k·L·c' values per image)",
    )
    parser.add_argument("--gates", type=int, default=128, help="gates sampled per stage")
    parser.add_argument("--lam-frac", type=float, default=None, help="λ as a fraction of λ_max")
    parser.add_argument(
        "--lam-path",
        type=float,
        nargs="+",
        default=None,
        help="λ fractions to try; the smallest student within --agreement-tol of the best "
        "held-out teacher agreement is kept (label-free selection)",
    )
    parser.add_argument("--agreement-tol", type=float, default=0.01)
    parser.add_argument(
        "--max-params",
        type=int,
        default=None,
        help="with --lam-path: a size budget (gates and reductions included) for all the "
        "replaced stages together; each stage selects within an equal share of what is left",
    )
    parser.add_argument("--reg", choices=("coupled", "nuclear"), default="nuclear")
    parser.add_argument("--solver", choices=("fista", "admm", "auto"), default="auto")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative duality gap")
    parser.add_argument("--max-iters", type=int, default=3000)
    parser.add_argument("--samples-per-class", type=int, default=None, help="default: all")
    parser.add_argument(
        "--max-rows",
        type=int,
        default=40_000,
        help="rows' worth of whole images for the reduction, the gates and the activation and "
        "Gauss-Newton terms",
    )
    parser.add_argument("--input-variance", type=float, default=0.999)
    parser.add_argument("--output-variance", type=float, default=0.995)
    parser.add_argument(
        "--max-input-dim", type=int, default=128, help="cap on the reduced input dimension"
    )
    parser.add_argument(
        "--max-output-dim", type=int, default=64, help="cap on the reduced output dimension"
    )
    parser.add_argument(
        "--kernel-size", type=int, default=3, help="k of the student's k×k patch rows (odd)"
    )
    parser.add_argument(
        "--channel-dim",
        type=int,
        default=None,
        help="reduce the block input's channels to this many (1×1 PCA) before the k×k patches",
    )
    parser.add_argument("--no-skip", action="store_true", help="no linear skip in the student")
    parser.add_argument(
        "--per-block",
        action="store_true",
        help="one student per residual block (solved in order) instead of one per stage",
    )
    parser.add_argument(
        "--identity",
        action="store_true",
        help="students of blocks that keep their shape add their input back (fit y - z)",
    )
    parser.add_argument(
        "--head-student",
        action="store_true",
        help="replace --cut..head by one student on pooled features predicting the logits",
    )
    parser.add_argument(
        "--polish", action="store_true", help="refit the kept gates with group_elastic"
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="least-squares refit of the output layer on the fixed hidden layer (same size)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="do not keep finished stages in OUT/cache (by default a rerun resumes from them)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="replace teacher stages by convex gated-ReLU students (label-free)",
        description="Distill stages --cut..--to of a teacher into convex students and "
        "evaluate the spliced network (labels are read only for the evaluation).",
    )
    parser.add_argument("--teacher", required=True, help="shipped teacher name or folder")
    add_data_arguments(parser)
    add_distill_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cvxdist.distill.runner import run_distill

    return run_distill(args)
