"""Bad input to every command, in one table: status 2, one line naming the problem, and
nothing written.

Each case runs ``cvxdist ARGS`` in a fresh workspace holding valid inputs to spoil (a problem
file, a finished distillation run, a copy of the digits teacher, a plain file, a read-only
folder). The command must exit with status 2, print nothing on stdout and exactly one line on
stderr that contains the case's message, and leave the workspace exactly as it was: no output
folder, no temporary file, no changed input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_snapshot
from test_data import _write_idx_folder

from cvxdist.teachers.teacher import CHECKPOINT_NAME, SHIPPED_DIR

TINY_RUN = ["--teacher", "digits-cnn", "--cut", "stage3", "--gates", "4", "--reg", "coupled"]
TINY_RUN += ["--samples-per-class", "5", "--max-rows", "200", "--quiet"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished ``cvxdist distill`` run on the digits teacher (to spoil copies of)."""
    from cvxdist.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["distill", *TINY_RUN, "--no-cache", "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- inputs


def _problem(workspace: Path, **arrays: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    data = {
        "X": rng.standard_normal((30, 4)),
        "Y": rng.standard_normal((30, 2)),
        "G": rng.standard_normal((4, 5)),
    }
    data.update(arrays)
    np.savez(workspace / "problem.npz", **{k: v for k, v in data.items() if v is not None})


def _spoil(name: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def setup(workspace: Path) -> None:
        _problem(workspace)
        with np.load(workspace / "problem.npz") as data:
            arrays = {k: data[k] for k in data.files}
        arrays[name] = change(arrays[name])
        _problem(workspace, **arrays)

    return setup


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_problem(workspace: Path) -> None:
    _problem(workspace)
    _truncate(workspace / "problem.npz")


def _corrupt_teacher(workspace: Path) -> None:
    shutil.copytree(SHIPPED_DIR / "digits-cnn", workspace / "teacher")
    _truncate(workspace / "teacher" / CHECKPOINT_NAME)


def _run_copy(change: Callable[[Path], None] | None = None) -> Callable[[Path, Path], None]:
    def setup(workspace: Path, finished: Path) -> None:
        shutil.copytree(finished, workspace / "run")
        if change is not None:
            change(workspace / "run")

    setup.needs_run = True  # type: ignore[attr-defined]
    return setup


def _edit_json(name: str, **fields: object) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        info = json.loads((run / name).read_text())
        info.update(fields)
        (run / name).write_text(json.dumps(info))

    return change


def _other_training_run(workspace: Path) -> None:
    """A folder holding another teacher's unfinished training run."""
    (workspace / "out").mkdir()
    other = {"model": "resnet20", "dataset": "digits", "epochs": 9}
    (workspace / "out" / "teacher.json").write_text(json.dumps({"training": other}))
    (workspace / "out" / "train_state.msgpack").write_bytes(b"\x80")


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Bad:
    """``args`` may name ``{ws}`` (the workspace), ``{out}`` (an output path that must not
    appear), ``{file}`` (a plain file) and ``{ro}`` (a read-only folder)."""

    id: str
    args: tuple[str, ...]
    message: str
    setup: Callable | None = None
    file_size_limit: int | None = None  # bytes: a full disk (writes fail with EFBIG)


def bad(id: str, args: str, message: str, setup=None, **options) -> Bad:
    return Bad(id, tuple(args.split()), message, setup, **options)


def _put(index: int, value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a.flat[index] = value
        return a

    return change


def _not_npz(workspace: Path) -> None:
    (workspace / "problem.npz").write_text("X,Y,G\n1,2,3\n")


def _without_g(workspace: Path) -> None:
    _problem(workspace, G=None)


def _idx_folder(workspace: Path) -> None:
    _write_idx_folder(workspace, n_train=12, n_test=4)  # 5×6 images, not digits' 8×8


def _corrupt_json(run: Path) -> None:
    (run / "student.json").write_text("{not json")


def _truncated_weights(run: Path) -> None:
    _truncate(run / "student.msgpack")


def _without_weights(run: Path) -> None:
    (run / "student.msgpack").unlink()  # as a run killed before its students were saved


class _PickledCode:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _torch_zip(workspace: Path, payload: object) -> None:
    """A ``torch.save``-style zip archive whose ``data.pkl`` pickles ``payload``."""
    with zipfile.ZipFile(workspace / "model.pth", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))  # as torch.save


def _pickled_code(workspace: Path) -> None:
    _torch_zip(workspace, {"conv1.weight": _PickledCode()})


def _empty_state_dict(workspace: Path) -> None:
    _torch_zip(workspace, {})


def _garbage_safetensors(workspace: Path) -> None:
    (workspace / "model.safetensors").write_bytes(b"\xff" * 64)


def _resnet18_pth(workspace: Path) -> None:
    """A real (random-weight, width 1/8) torchvision ResNet-18 checkpoint."""
    torch = pytest.importorskip("torch")
    from test_import import random_resnet

    net = random_resnet("resnet18", width=0.125, in_channels=1, stem="cifar")
    torch.save(net.state_dict(), workspace / "model.pth")


SOLVE = "solve {ws}/problem.npz --out {out}"
DISTILL = "distill " + " ".join(TINY_RUN) + " --out {out}"
TRAIN = "teacher train --model small_cnn --dataset digits --width 0.25 --out {out}"
EPOCH = TRAIN + " --epochs 1"
DEMO = "demo --quick --quiet --out {out}"
AT_LEAST_1 = "must be at least 1"
POSITIVE = "epochs, batch size and width must be positive"
NOT_A_FOLDER = "exists and is not a directory"
READ_ONLY = "is not a writable directory"
EXPORT = "export {ws}/run --out {out}"
IMPORT = "teacher import {ws}/model.pth --arch resnet18 --out {out}"
PACK = "teacher pack digits-cnn --out {out}"

CASES = (
    # ---- solve
    bad("solve-missing-file", "solve {ws}/nope.npz --lam 0.1 --out {out}", "no such file"),
    bad("solve-not-npz", SOLVE + " --lam 0.1", "not an .npz archive", _not_npz),
    bad("solve-truncated", SOLVE + " --lam 0.1", "problem.npz", _truncated_problem),
    bad("solve-missing-array", SOLVE + " --lam 0.1", "missing array(s) G", _without_g),
    bad("solve-nan", SOLVE + " --lam 0.1", "X contains 1 NaN", _spoil("X", _put(3, np.nan))),
    bad("solve-inf", SOLVE + " --lam 0.1", "Y contains 1 NaN or Inf", _spoil("Y", _put(0, np.inf))),
    bad(
        "solve-string-dtype",
        SOLVE + " --lam 1",
        "X must be a real",
        _spoil("X", lambda a: a.astype(str)),
    ),
    bad(
        "solve-complex-dtype", SOLVE + " --lam 1", "G must be a real", _spoil("G", lambda a: a + 1j)
    ),
    bad(
        "solve-row-mismatch",
        SOLVE + " --lam 1",
        "X has 30 rows but Y has 10",
        _spoil("Y", lambda a: a[:10]),
    ),
    bad(
        "solve-negative-lam", SOLVE + " --lam -0.5", "--lam must be a finite number >= 0", _problem
    ),
    bad("solve-nan-lam-frac", SOLVE + " --lam-frac nan", "--lam-frac must be a finite", _problem),
    bad("solve-inf-lam", SOLVE + " --lam inf", "--lam must be a finite number", _problem),
    bad("solve-zero-tol", SOLVE + " --lam 1 --tol 0", "--tol must be positive", _problem),
    bad(
        "solve-zero-max-iters",
        SOLVE + " --lam 1 --max-iters 0",
        "--max-iters " + AT_LEAST_1,
        _problem,
    ),
    bad(
        "solve-zero-chunk",
        SOLVE + " --lam 1 --chunk-rows 0",
        "--chunk-rows " + AT_LEAST_1,
        _problem,
    ),
    bad("solve-negative-devices", SOLVE + " --lam 1 --devices -1", "--devices must be 0", _problem),
    bad("solve-unknown-reg", SOLVE + " --lam 1 --reg l0", "invalid choice: 'l0'", _problem),
    bad(
        "solve-unknown-dtype",
        SOLVE + " --lam 1 --dtype float16",
        "invalid choice: 'float16'",
        _problem,
    ),
    bad("solve-no-lam", SOLVE, "one of the arguments --lam --lam-frac is required", _problem),
    bad(
        "solve-out-is-a-folder",
        "solve {ws}/problem.npz --lam 1 --out {ws}",
        "is a directory",
        _problem,
    ),
    bad(
        "solve-out-under-a-file",
        "solve {ws}/problem.npz --lam 1 --out {file}/s.npz",
        "does not exist",
        _problem,
    ),
    bad(
        "solve-read-only",
        "solve {ws}/problem.npz --lam 1 --out {ro}/s.npz",
        "not writable",
        _problem,
    ),
    bad("solve-disk-full", SOLVE + " --lam 0.1", "cannot write", _problem, file_size_limit=256),
    # ---- distill
    bad("distill-unknown-teacher", "distill --teacher nosuch --out {out}", "no teacher 'nosuch'"),
    bad(
        "distill-corrupt-teacher",
        "distill --teacher {ws}/teacher --out {out}",
        "corrupt or truncated",
        _corrupt_teacher,
    ),
    bad("distill-unknown-cut", DISTILL + " --cut stage9", "unknown cut 'stage9'"),
    bad("distill-unknown-block", DISTILL + " --cut stage3.block7", "unknown cut 'stage3.block7'"),
    bad("distill-reversed-range", DISTILL + " --cut stage3 --to stage1", "stage1"),
    bad("distill-zero-gates", DISTILL + " --gates 0", "--gates " + AT_LEAST_1),
    bad("distill-negative-gates", DISTILL + " --gates -3", "--gates " + AT_LEAST_1),
    bad(
        "distill-zero-samples",
        DISTILL + " --samples-per-class 0",
        "--samples-per-class " + AT_LEAST_1,
    ),
    bad("distill-zero-rows", DISTILL + " --max-rows 0", "max_rows must be positive"),
    bad("distill-zero-iters", DISTILL + " --max-iters 0", "max_iters " + AT_LEAST_1),
    bad("distill-nan-tol", DISTILL + " --tol nan", "tol (a relative duality gap)"),
    bad("distill-negative-lam", DISTILL + " --lam-frac -1", "--lam-frac must be"),
    bad("distill-nan-on-path", DISTILL + " --lam-path 0.1 nan", "--lam-path must be a finite"),
    bad(
        "distill-variance-above-1",
        DISTILL + " --input-variance 2",
        "input_variance must be in (0, 1]",
    ),
    bad("distill-even-kernel", DISTILL + " --kernel-size 2", "kernel size must be a positive odd"),
    bad("distill-zero-budget", DISTILL + " --max-params 0", "--max-params " + AT_LEAST_1),
    bad("distill-zero-channels", DISTILL + " --channel-dim 0", "--channel-dim " + AT_LEAST_1),
    bad("distill-negative-agreement", DISTILL + " --agreement-tol -1", "agreement_tol must be in"),
    bad("distill-negative-seed", DISTILL + " --seed -1", "seed must be >= 0"),
    bad("distill-unknown-reg", DISTILL + " --reg lasso", "invalid choice: 'lasso'"),
    bad("distill-no-dataset-files", DISTILL + " --dataset mnist --data-dir {ws}", "mnist"),
    bad(
        "distill-wrong-image-shape",
        DISTILL + " --dataset idx --data-dir {ws}",
        "takes images of shape (8, 8, 1)",
        _idx_folder,
    ),
    bad("distill-out-is-a-file", DISTILL.replace("{out}", "{file}"), NOT_A_FOLDER),
    bad("distill-read-only", DISTILL.replace("{out}", "{ro}/run"), READ_ONLY),
    bad("distill-disk-full", DISTILL + " --no-cache", "cannot write", file_size_limit=4096),
    # ---- evaluate
    bad("evaluate-not-a-run", "evaluate {ws}", "is not a student folder"),
    bad("evaluate-a-file", "evaluate {file}", "is not a student folder"),
    bad(
        "evaluate-corrupt-json",
        "evaluate {ws}/run",
        "corrupt student files",
        _run_copy(_corrupt_json),
    ),
    bad(
        "evaluate-truncated-weights",
        "evaluate {ws}/run",
        "does not match student.json",
        _run_copy(_truncated_weights),
    ),
    bad(
        "evaluate-other-teacher",
        "evaluate {ws}/run --teacher fashion-resnet20",
        "is not the one",
        _run_copy(),
    ),
    bad(
        "evaluate-changed-checkpoint",
        "evaluate {ws}/run",
        "is not the one",
        _run_copy(_edit_json("student.json", teacher_sha256="0" * 64)),
    ),
    bad(
        "evaluate-teacher-gone",
        "evaluate {ws}/run",
        "which is gone",
        _run_copy(_edit_json("student.json", teacher_path="/nonexistent/teacher")),
    ),
    bad("evaluate-zero-limit", "evaluate {ws}/run --limit 0", "--limit " + AT_LEAST_1, _run_copy()),
    bad(
        "evaluate-negative-limit",
        "evaluate {ws}/run --limit -5",
        "--limit " + AT_LEAST_1,
        _run_copy(),
    ),
    bad(
        "evaluate-unknown-dataset",
        "evaluate {ws}/run --dataset nosuch",
        "unknown dataset 'nosuch'",
        _run_copy(),
    ),
    # ---- teacher eval / list
    bad("teacher-eval-zero-limit", "teacher eval digits-cnn --limit 0", "--limit " + AT_LEAST_1),
    bad(
        "teacher-eval-negative-limit", "teacher eval digits-cnn --limit -5", "--limit " + AT_LEAST_1
    ),
    bad(
        "teacher-eval-zero-batch",
        "teacher eval digits-cnn --batch-size 0",
        "--batch-size " + AT_LEAST_1,
    ),
    bad("teacher-eval-unknown", "teacher eval nosuch", "no teacher 'nosuch'"),
    bad(
        "teacher-eval-corrupt",
        "teacher eval {ws}/teacher",
        "corrupt or truncated",
        _corrupt_teacher,
    ),
    bad(
        "teacher-list-extra-argument", "teacher list --limit 3", "unrecognized arguments: --limit 3"
    ),
    bad("teacher-unknown-action", "teacher forget", "invalid choice: 'forget'"),
    # ---- teacher train
    bad("train-zero-epochs", TRAIN + " --epochs 0", POSITIVE),
    bad("train-negative-epochs", TRAIN + " --epochs -1", POSITIVE),
    bad("train-non-integer-epochs", TRAIN + " --epochs x", "invalid int value: 'x'"),
    bad("train-nan-width", EPOCH + " --width nan", POSITIVE),
    bad("train-zero-batch", EPOCH + " --batch-size 0", POSITIVE),
    bad("train-negative-lr", EPOCH + " --lr -1", "learning rate must be a finite positive"),
    bad("train-negative-seed", EPOCH + " --seed -2", "seed must be >= 0"),
    bad("train-unknown-model", EPOCH.replace("small_cnn", "vgg"), "unknown model 'vgg'"),
    bad("train-unknown-dataset", EPOCH.replace("digits", "nosuch"), "unknown dataset 'nosuch'"),
    bad(
        "train-no-dataset-files",
        EPOCH.replace("digits", "fashion_mnist") + " --data-dir {ws}",
        "dataset-fashion-mnist",
    ),
    bad("train-out-is-a-file", EPOCH.replace("{out}", "{file}"), NOT_A_FOLDER),
    bad("train-read-only", EPOCH.replace("{out}", "{ro}/teacher"), READ_ONLY),
    bad(
        "train-another-run",
        EPOCH.replace("{out}", "{ws}/out"),
        "different configuration",
        _other_training_run,
    ),
    # ---- demo
    bad("demo-zero-samples", DEMO + " --samples-per-class 0", "--samples-per-class " + AT_LEAST_1),
    bad(
        "demo-negative-samples",
        DEMO + " --samples-per-class -3",
        "--samples-per-class " + AT_LEAST_1,
    ),
    bad("demo-unknown-teacher", DEMO + " --teacher nosuch", "no teacher 'nosuch'"),
    bad(
        "demo-corrupt-teacher",
        DEMO + " --teacher {ws}/teacher",
        "corrupt or truncated",
        _corrupt_teacher,
    ),
    bad("demo-out-is-a-file", DEMO.replace("{out}", "{file}"), NOT_A_FOLDER),
    bad("demo-read-only", DEMO.replace("{out}", "{ro}/demo"), READ_ONLY),
    # ---- data
    bad("data-fetch-unknown", "data fetch nosuch", "cannot fetch 'nosuch'"),
    bad("data-unknown-action", "data forget", "invalid choice: 'forget'"),
    # ---- bench
    bad("bench-unknown", "bench nosuch --out {out}", "invalid choice: 'nosuch'"),
    bad("bench-zero-repeats", "bench distill --repeats 0 --out {out}", "--repeats " + AT_LEAST_1),
    bad(
        "bench-unknown-experiment",
        "bench distill --only E9 --out {out}",
        "unknown experiment(s) E9",
    ),
    bad("bench-unknown-problem", "bench solvers --only n1 --out {out}", "unknown problem(s)"),
    bad(
        "bench-zero-time-limit",
        "bench solvers --time-limit 0 --out {out}",
        "--time-limit must be positive",
    ),
    bad("bench-out-is-a-file", "bench distill --out {file}", NOT_A_FOLDER),
    bad("bench-read-only", "bench distill --out {ro}/bench", READ_ONLY),
    # ---- export
    bad(
        "export-unknown-format", EXPORT + " --format tflite", "unknown format 'tflite'", _run_copy()
    ),
    bad("export-missing-run", "export {ws}/nope --out {out}", "does not exist"),
    bad("export-not-a-run", "export {ws} --out {out}", "is not a student folder"),
    bad(
        "export-unfinished-run",
        EXPORT,
        "an unfinished or corrupt run",
        _run_copy(_without_weights),
    ),
    bad("export-corrupt-json", EXPORT, "corrupt student files", _run_copy(_corrupt_json)),
    bad(
        "export-truncated-weights",
        EXPORT,
        "does not match student.json",
        _run_copy(_truncated_weights),
    ),
    bad(
        "export-other-teacher",
        EXPORT + " --teacher fashion-resnet20",
        "is not the one",
        _run_copy(),
    ),
    bad(
        "export-changed-checkpoint",
        EXPORT,
        "is not the one",
        _run_copy(_edit_json("student.json", teacher_sha256="0" * 64)),
    ),
    bad(
        "export-zero-check-images",
        EXPORT + " --check-images 0",
        "--check-images " + AT_LEAST_1,
        _run_copy(),
    ),
    bad("export-nan-atol", EXPORT + " --atol nan", "--atol must be a finite number", _run_copy()),
    bad(
        "export-out-is-a-folder",
        "export {ws}/run --out {ws}",
        "is a directory",
        _run_copy(),
    ),
    bad(
        "export-out-under-a-file",
        "export {ws}/run --out {file}/model.onnx",
        "does not exist",
        _run_copy(),
    ),
    bad("export-read-only", "export {ws}/run --out {ro}/model.onnx", "not writable", _run_copy()),
    bad("export-disk-full", EXPORT, "cannot write", _run_copy(), file_size_limit=4096),
    # ---- teacher import
    bad("import-missing-file", IMPORT, "does not exist"),
    bad("import-not-a-zip", IMPORT.replace("{ws}/model.pth", "{file}"), "not a zip-format"),
    bad("import-pickled-code", IMPORT, "refusing to unpickle __builtin__.print", _pickled_code),
    bad("import-no-state-dict", IMPORT, "missing key 'conv1.weight'", _empty_state_dict),
    bad(
        "import-unknown-arch",
        IMPORT.replace("resnet18", "vgg11"),
        "unknown arch 'vgg11'",
        _empty_state_dict,
    ),
    bad(
        "import-corrupt-safetensors",
        IMPORT.replace("model.pth", "model.safetensors"),
        "not a readable safetensors file",
        _garbage_safetensors,
    ),
    bad(
        "import-wrong-shapes",
        IMPORT.replace("resnet18", "resnet34"),
        "missing key 'layer1.2.conv1.weight'",
        _resnet18_pth,
    ),
    bad("import-out-is-a-file", IMPORT.replace("{out}", "{file}"), NOT_A_FOLDER, _resnet18_pth),
    bad("import-read-only", IMPORT.replace("{out}", "{ro}/teacher"), READ_ONLY, _resnet18_pth),
    bad("import-disk-full", IMPORT, "cannot write", _resnet18_pth, file_size_limit=4096),
    # ---- teacher pack
    bad("pack-unknown-teacher", "teacher pack nosuch --out {out}", "no teacher 'nosuch'"),
    bad(
        "pack-corrupt-teacher",
        "teacher pack {ws}/teacher --out {out}",
        "corrupt or truncated",
        _corrupt_teacher,
    ),
    bad("pack-unknown-storage", PACK + " --storage int8", "invalid choice: 'int8'"),
    bad("pack-out-is-a-file", PACK.replace("{out}", "{file}"), NOT_A_FOLDER),
    bad("pack-read-only", PACK.replace("{out}", "{ro}/teacher"), READ_ONLY),
    bad("pack-disk-full", PACK, "cannot write", file_size_limit=4096),
)


def _subcommands(parser) -> dict:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_the_table_covers_every_command():
    # A new command (or teacher action) fails here until its bad-input cases join the table.
    from cvxdist.cli import build_parser

    commands = _subcommands(build_parser())
    expected = {name for name in commands if name != "teacher"}
    expected |= {f"teacher {action}" for action in _subcommands(commands["teacher"])}
    covered = {
        " ".join(case.args[:2]) if case.args[0] == "teacher" else case.args[0] for case in CASES
    }
    assert expected <= covered, f"no bad-input cases for {sorted(expected - covered)}"
    assert len(CASES) >= 30


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes fail with EFBIG (as on a full disk), in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody can write to (root included: immutable where chmod is not enough)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # root ignores the mode bits
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
        immutable = done.returncode == 0
    assert not os.access(folder, os.W_OK), "cannot make a read-only folder here"
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case, cli, tmp_path, read_only, request
):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (tmp_path / "file").write_text("not a folder\n")
    if case.setup is not None:
        if getattr(case.setup, "needs_run", False):
            case.setup(workspace, request.getfixturevalue("finished_run"))
        else:
            case.setup(workspace)
    names = {"ws": workspace, "out": tmp_path / "out", "file": tmp_path / "file", "ro": read_only}
    args = [arg.format(**names) for arg in case.args]
    before = tree_snapshot(tmp_path)
    limit = (
        file_size_limit(case.file_size_limit) if case.file_size_limit else contextlib.nullcontext()
    )
    with limit:
        result = cli(*args)
    lines = result.err.strip().splitlines()
    assert result.code == 2, (result.code, result.err[-2000:])
    assert len(lines) == 1 and case.message in lines[0], result.err
    assert lines[0].startswith("cvxdist") and "Traceback" not in result.err
    assert result.out == ""
    assert tree_snapshot(tmp_path) == before  # no output, no temporary file, inputs intact
    assert not (tmp_path / "out").exists()
