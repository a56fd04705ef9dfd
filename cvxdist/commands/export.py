"""`cvxdist export RUN_DIR --format onnx --out FILE`: the compressed network of a run folder
(teacher prefix, students, suffix) as one ONNX model, checked with onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cvxdist.commands import add_run_teacher_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write the compressed network of a distill run as ONNX (checked with onnxruntime)",
        description="Export the spliced network of a folder written by `cvxdist distill` "
        "(or `cvxdist demo`): the teacher before the cut, the students, the teacher after. "
        "onnxruntime must reproduce the JAX logits (--atol) and top-1 on the check images, "
        "else nothing is written.",
    )
    parser.add_argument("run_dir", type=Path, help="folder written by `cvxdist distill`")
    parser.add_argument("--format", default="onnx", help="output format: onnx")
    parser.add_argument(
        "--out", type=Path, required=True, help="output file (its folder must exist)"
    )
    add_run_teacher_argument(parser)
    parser.add_argument(
        "--check-images",
        type=int,
        default=256,
        help="test images of the teacher's dataset to check (seeded random images when the "
        "dataset is not installed)",
    )
    parser.add_argument("--data-dir", default=None, help="folder of the dataset files")
    parser.add_argument("--atol", type=float, default=1e-4, help="allowed |Δlogit|")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from cvxdist.commands import check_output_file
    from cvxdist.errors import UserError
    from cvxdist.export import FORMATS, export_onnx, load_run

    if args.format not in FORMATS:
        raise UserError(f"unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.check_images < 1:
        raise UserError(f"--check-images must be at least 1, got {args.check_images}")
    if not (math.isfinite(args.atol) and args.atol >= 0):
        raise UserError(f"--atol must be a finite number >= 0, got {args.atol}")
    check_output_file(args.out, "model.onnx")
    teacher, students, cut, to = load_run(args.run_dir, args.teacher)
    images, source = _check_images(teacher, args.check_images, args.data_dir)
    record = export_onnx(teacher, students, cut, to, args.out, check_images=images, atol=args.atol)
    print(json.dumps({**record, "format": args.format, "checked_on": source}))
    return 0


def _check_images(teacher: Any, count: int, data_dir: str | None) -> tuple[Any, str]:
    """The first ``count`` test images of the teacher's dataset, else seeded random ones."""
    import numpy as np

    from cvxdist.data import load_dataset
    from cvxdist.errors import UserError

    try:
        test = load_dataset(teacher.dataset, "test", data_dir)
        if tuple(test.images.shape[1:]) == tuple(teacher.image_shape):
            return test.images[:count], f"{teacher.dataset} test split"
    except (UserError, ValueError, OSError):
        pass
    images = np.random.default_rng(0).uniform(size=(count, *teacher.image_shape))
    return images.astype(np.float32), "seeded uniform images"
