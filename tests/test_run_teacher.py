"""A run directory finds its teacher again: the teacher's folder (or shipped name) and its
checkpoint SHA-256 are recorded, `evaluate` uses them, `--teacher` points elsewhere, and a
different checkpoint is refused. Nothing is trained: the teacher is a saved untrained one."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from cvxdist.cli import main
from cvxdist.distill.io import SHIPPED_PREFIX, resolve_run_teacher, teacher_record
from cvxdist.teachers import ArchConfig, load_teacher, save_teacher, untrained_teacher
from cvxdist.teachers.teacher import SHIPPED_DIR


def _teacher_folder(folder, seed: int = 0):
    """An untrained digits-shaped small CNN saved as a teacher folder named "mine"."""
    config = ArchConfig("small_cnn", num_classes=10, in_channels=1, width=0.25)
    teacher = untrained_teacher(config, (8, 8, 1), seed=seed, name="mine")
    save_teacher(folder, config, teacher.variables, {**teacher.info, "dataset": "digits"})
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(teacher folder, run directory) of one distillation from a teacher outside the
    shipped set."""
    tmp = tmp_path_factory.mktemp("run-teacher")
    folder = _teacher_folder(tmp / "teacher")
    out = tmp / "run"
    argv = ["distill", "--teacher", str(folder), "--cut", "stage3", "--gates", "8",
            "--samples-per-class", "5", "--max-rows", "400", "--no-cache", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return folder, out


def _evaluate(capsys, run_dir, *extra) -> tuple[int, dict | None, str]:
    code = main(["evaluate", str(run_dir), *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def _copy_run(run_dir, to, teacher_path: str):
    """A copy of ``run_dir`` whose recorded teacher folder is ``teacher_path``."""
    shutil.copytree(run_dir, to)
    info = json.loads((to / "student.json").read_text())
    (to / "student.json").write_text(json.dumps({**info, "teacher_path": teacher_path}))
    return to


def test_a_run_records_its_teacher_folder_and_evaluate_finds_it(run, capsys):
    folder, out = run
    info = json.loads((out / "student.json").read_text())
    checkpoint = hashlib.sha256((folder / "teacher.msgpack").read_bytes()).hexdigest()
    assert info["teacher"] == "mine"
    assert info["teacher_path"] == str(folder.resolve())
    assert info["teacher_sha256"] == checkpoint
    code, printed, err = _evaluate(capsys, out)  # no --teacher, nothing moved
    assert code == 0, err
    distilled = json.loads((out / "result.json").read_text())
    assert printed["teacher"] == "mine"
    for key in ("accuracy", "teacher_accuracy", "agreement"):  # the same teacher, same test set
        assert printed[key] == pytest.approx(distilled[key], abs=1e-9)


def test_evaluate_refuses_a_different_checkpoint(run, tmp_path, capsys):
    folder, out = run
    other = _teacher_folder(tmp_path / "other", seed=1)
    code, _, err = _evaluate(capsys, out, "--teacher", str(other))
    assert code == 2 and err.count("\n") == 1
    assert "SHA-256" in err and str(out) in err
    # The recorded folder retrained in place is refused too.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    run_copy = _copy_run(out, tmp_path / "run-copy", str(copy))
    assert _evaluate(capsys, run_copy)[0] == 0
    _teacher_folder(copy, seed=1)
    code, _, err = _evaluate(capsys, run_copy)
    assert code == 2 and "SHA-256" in err


def test_teacher_override_finds_a_moved_teacher(run, tmp_path, capsys):
    folder, out = run
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    run_copy = _copy_run(out, tmp_path / "run-copy", str(tmp_path / "gone"))
    code, _, err = _evaluate(capsys, run_copy)
    assert code == 2 and "is gone" in err and "--teacher" in err
    code, printed, err = _evaluate(capsys, run_copy, "--teacher", str(moved))
    assert code == 0, err
    distilled = json.loads((out / "result.json").read_text())
    assert printed["accuracy"] == pytest.approx(distilled["accuracy"], abs=1e-9)
    recorded = json.loads((out / "student.json").read_text())["teacher_sha256"]
    assert resolve_run_teacher(run_copy, str(moved)).checkpoint_sha256 == recorded


def test_shipped_teachers_are_recorded_by_name():
    teacher = load_teacher("digits-cnn")
    for source in ("digits-cnn", SHIPPED_DIR / "digits-cnn"):
        record = teacher_record(source, teacher)
        assert record["teacher_path"] == SHIPPED_PREFIX + "digits-cnn"
        assert record["teacher_sha256"] == teacher.info["checkpoint_sha256"]
