"""`cvxdist teacher`: train, evaluate and list teachers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("teacher", help="train, evaluate and list teacher networks")
    sub = parser.add_subparsers(dest="teacher_command", metavar="ACTION", required=True)

    train = sub.add_parser(
        "train",
        help="train a teacher (resumes if --out holds an unfinished run)",
        description="Train a teacher network. Re-running the same command into the same "
        "--out continues after the last finished epoch.",
    )
    train.add_argument(
        "--model",
        required=True,
        help="resnet20|resnet32|resnet56|small_cnn|resnet18|resnet34|resnet50 (CIFAR stem) or "
        "resnet18_imagenet|resnet34_imagenet|resnet50_imagenet (7×7 stride-2 conv + max pool)",
    )
    train.add_argument("--dataset", required=True, help="digits|fashion_mnist|mnist|idx|tfds:NAME")
    train.add_argument("--epochs", type=int, required=True)
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate")
    train.add_argument("--weight-decay", type=float, default=None)
    train.add_argument("--no-augment", action="store_true", help="no random crops / flips")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--name", default=None, help="teacher name (default: --out's name)")
    train.add_argument("--data-dir", default=None, help="dataset folder (IDX or TFDS data_dir)")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(func=run_train)

    evaluate = sub.add_parser("eval", help="print a teacher's test accuracy as JSON")
    evaluate.add_argument("teacher", metavar="NAME_OR_DIR")
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--limit", type=int, default=None, help="first N test images only")
    evaluate.add_argument("--batch-size", type=int, default=500)
    evaluate.set_defaults(func=run_eval)

    pack = sub.add_parser(
        "pack",
        help="re-store a teacher (e.g. float16, to ship it) and re-measure its test accuracy",
        description="Write a copy of a teacher with another checkpoint storage; its "
        "teacher.json records the test accuracy of the stored (rounded) weights.",
    )
    pack.add_argument("teacher", metavar="NAME_OR_DIR")
    pack.add_argument("--out", required=True, help="output teacher directory")
    pack.add_argument("--storage", choices=("float32", "float16"), default="float16")
    pack.add_argument("--name", default=None, help="teacher name (default: the source's)")
    pack.add_argument("--data-dir", default=None)
    pack.set_defaults(func=run_pack)

    imp = sub.add_parser(
        "import",
        help="import a torchvision-layout ResNet from PyTorch (.pth or .safetensors)",
        description="Turn a torchvision ResNet state_dict (.pth, read without running "
        "pickled code, or .safetensors) into a teacher directory with teacher.json. Width, "
        "input channels and classes are read off the checkpoint.",
    )
    imp.add_argument("checkpoint", help=".pth / .pt (torch.save zip) or .safetensors file")
    imp.add_argument("--arch", required=True, help="resnet18|resnet34|resnet50")
    imp.add_argument(
        "--stem",
        default=None,
        help="imagenet (7×7 conv + max pool) or cifar (3×3 conv, no max pool); "
        "default: from conv1's kernel size",
    )
    imp.add_argument("--out", required=True, help="output teacher directory")
    imp.add_argument(
        "--image-shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("H", "W", "C"),
        help="input images (default 32 32 C for the CIFAR stem, 224 224 C for ImageNet's)",
    )
    imp.add_argument("--mean", type=float, nargs="+", default=None, help="per channel, in [0, 1]")
    imp.add_argument("--std", type=float, nargs="+", default=None, help="per channel")
    imp.add_argument("--dataset", default="none", help="dataset it was trained on, if loadable")
    imp.add_argument("--name", default=None, help="teacher name (default: --out's name)")
    imp.set_defaults(func=run_import)

    listing = sub.add_parser("list", help="shipped teachers as JSON lines")
    listing.set_defaults(func=run_list)


def run_train(args: argparse.Namespace) -> int:
    from cvxdist.distill.io import check_output_dir
    from cvxdist.training import TrainConfig, train_teacher

    check_output_dir(Path(args.out))
    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        epochs=args.epochs,
        width=args.width,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        augment=not args.no_augment,
        seed=args.seed,
    )
    config.resolved()  # checks the settings before the dataset is read
    _check_model(args.model)
    meta = train_teacher(
        config, args.out, data_dir=args.data_dir, progress=not args.quiet, name=args.name
    )
    summary = {k: meta[k] for k in ("name", "model", "dataset", "test_accuracy", "params")}
    summary["train_time_s"] = meta.get("train_time_s")
    print(json.dumps(summary))
    return 0


def _check_model(model: str) -> None:
    from cvxdist.errors import UserError
    from cvxdist.teachers import MODEL_NAMES

    if model not in MODEL_NAMES:
        raise UserError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")


def run_eval(args: argparse.Namespace) -> int:
    from cvxdist.data import load_dataset
    from cvxdist.errors import UserError
    from cvxdist.teachers import load_teacher

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    teacher = load_teacher(args.teacher)
    test = load_dataset(teacher.dataset, "test", args.data_dir)
    if args.limit is not None:
        import numpy as np

        test = test.take(np.arange(min(args.limit, len(test))))
    tic = time.perf_counter()
    accuracy = teacher.accuracy(test.images, test.labels, args.batch_size)
    print(
        json.dumps(
            {
                "name": teacher.name,
                "model": teacher.config.model,
                "dataset": teacher.dataset,
                "test_accuracy": accuracy,
                "num_test": len(test),
                "time_s": round(time.perf_counter() - tic, 3),
            }
        )
    )
    return 0


def run_pack(args: argparse.Namespace) -> int:
    import dataclasses

    from cvxdist.data import load_dataset
    from cvxdist.distill.io import check_output_dir, staged_output
    from cvxdist.teachers import load_teacher, save_teacher
    from cvxdist.teachers.checkpoint import stored_values
    from cvxdist.teachers.teacher import METADATA_NAME

    out = Path(args.out)
    check_output_dir(out)
    teacher = load_teacher(args.teacher)
    test = load_dataset(teacher.dataset, "test", args.data_dir)
    stored = stored_values(teacher.variables, args.storage)
    accuracy = dataclasses.replace(teacher, variables=stored, _cache={}).accuracy(
        test.images, test.labels
    )
    rewritten = ("arch", "params", "cuts", "checkpoint", "checkpoint_sha256", "checkpoint_storage")
    info = {k: v for k, v in teacher.info.items() if k not in rewritten}
    info.update(
        name=args.name or teacher.name,
        test_accuracy=accuracy,
        num_test=len(test),
        source_test_accuracy=teacher.info.get("test_accuracy"),
        source_checkpoint_sha256=teacher.checkpoint_sha256,
    )
    with staged_output(out) as tmp:
        meta = save_teacher(tmp, teacher.config, stored, info, args.storage)
    size = sum((out / name).stat().st_size for name in (meta["checkpoint"], METADATA_NAME))
    keys = ("name", "test_accuracy", "source_test_accuracy", "checkpoint", "checkpoint_sha256")
    print(json.dumps({**{k: meta[k] for k in keys}, "bytes": size}))
    return 0


def run_import(args: argparse.Namespace) -> int:
    from cvxdist.distill.io import check_output_dir, staged_output
    from cvxdist.teachers.importers import import_torchvision_resnet

    out = Path(args.out)
    check_output_dir(out)
    with staged_output(out) as tmp:
        meta = import_torchvision_resnet(
            args.checkpoint,
            tmp,
            args.arch,
            stem=args.stem,
            image_shape=args.image_shape,
            mean=args.mean,
            std=args.std,
            dataset=args.dataset,
            name=args.name or out.name,
        )
    keys = ("name", "model", "params", "image_shape", "num_classes", "checkpoint_sha256")
    print(json.dumps({k: meta[k] for k in keys} | {"width": meta["arch"]["width"]}))
    return 0


def run_list(args: argparse.Namespace) -> int:
    from cvxdist.teachers.teacher import METADATA_NAME, SHIPPED_DIR, shipped_teachers

    for name in shipped_teachers():
        info = json.loads((SHIPPED_DIR / name / METADATA_NAME).read_text())
        record = {
            "name": name,
            "model": info["model"],
            "dataset": info["dataset"],
            "test_accuracy": info["test_accuracy"],
            "params": info.get("params"),
            "width": info.get("arch", {}).get("width"),
        }
        sys.stdout.write(json.dumps(record) + "\n")
    return 0
