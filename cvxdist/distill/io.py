"""Saving and loading distilled students, and the output-folder discipline of the commands.

A student folder holds ``student.json`` (the teacher: its name, ``teacher_path`` —
``"shipped:NAME"`` or an absolute folder — and its checkpoint's ``teacher_sha256``; the cut;
the Flax module settings of each stage) and ``student.msgpack`` (the variables,
flax.serialization: no pickle). `resolve_run_teacher` finds the teacher of a run again.
Commands write into a temporary sibling folder and rename it at the end, so an error or an
interrupt leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import serialization

from cvxdist.distill.student import BlockStudent, GatedStudent, ReluStudent
from cvxdist.errors import UserError
from cvxdist.teachers import Teacher, load_teacher, teacher_dir
from cvxdist.teachers.teacher import SHIPPED_DIR

STUDENT_JSON = "student.json"
STUDENT_WEIGHTS = "student.msgpack"
SHIPPED_PREFIX = "shipped:"


class TeacherMismatchError(UserError):
    """The teacher found for a run is not the checkpoint the run was distilled from."""


def check_output_dir(out: Path) -> None:
    """Fail early (before any work) when ``out`` cannot be created or written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    parent = out.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not a writable directory")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} is not writable")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary folder that replaces ``out``'s files only if the body succeeds.

    Files already in ``out`` that the body does not write are kept (e.g. a cache).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        out.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _module_settings(module: Any) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name"}
    settings = {name: getattr(module, name) for name in sorted(fields)}
    settings["neuron_gate"] = list(settings.get("neuron_gate", ()))
    return {"class": type(module).__name__, **settings}


def save_students(
    directory: Path, students: Sequence[BlockStudent], meta: dict[str, Any]
) -> dict[str, Any]:
    """Write the students of one distillation into ``directory``."""
    directory = Path(directory)
    payload = {str(i): s.variables for i, s in enumerate(students)}
    weights = serialization.msgpack_serialize(_np(payload))
    (directory / STUDENT_WEIGHTS).write_bytes(weights)
    info = {
        **meta,
        # student.json is written last and names the weights it goes with: a folder whose
        # files come from two different runs (an interrupted copy) is refused, not trusted.
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "stages": [
            {"stage": s.stage, "module": _module_settings(s.module), "report": s.report}
            for s in students
        ],
    }
    (directory / STUDENT_JSON).write_text(json.dumps(info, indent=2, default=_json_default))
    return info


def _np(tree: Any) -> Any:
    import jax

    return jax.tree.map(np.asarray, tree)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def teacher_record(source: str | os.PathLike, teacher: Teacher) -> dict[str, str]:
    """What a run records of the teacher loaded from ``source`` (a shipped name or a folder):
    ``teacher`` (its name), ``teacher_path`` (``"shipped:NAME"`` for a shipped teacher, else
    the folder's absolute path) and ``teacher_sha256`` (its checkpoint's SHA-256)."""
    folder = teacher_dir(source).resolve()
    shipped = folder.parent == SHIPPED_DIR.resolve()
    return {
        "teacher": teacher.name,
        "teacher_path": SHIPPED_PREFIX + folder.name if shipped else str(folder),
        "teacher_sha256": teacher.checkpoint_sha256,
    }


def resolve_run_teacher(run_dir: str | os.PathLike, override: str | None = None) -> Teacher:
    """The teacher a run directory was distilled from: ``override`` (a shipped name or a
    teacher folder) when given, else the recorded ``teacher_path`` (runs older than it: the
    recorded name). Its checkpoint must have the recorded SHA-256 (`TeacherMismatchError`).
    """
    run_dir = Path(run_dir)
    info = _read_json(run_dir / STUDENT_JSON, run_dir)
    recorded = info.get("teacher_path") or info.get("teacher")
    if not isinstance(recorded, str) or not recorded:
        raise UserError(f"{run_dir / STUDENT_JSON} names no teacher; pass --teacher PATH_OR_NAME")
    if override is not None:
        source = override
    elif recorded.startswith(SHIPPED_PREFIX):
        source = recorded.removeprefix(SHIPPED_PREFIX)
    else:
        source = recorded
        if Path(recorded).is_absolute() and not Path(recorded).is_dir():
            raise UserError(
                f"{run_dir} was distilled from the teacher in {recorded}, which is gone; "
                "pass --teacher PATH_OR_NAME"
            )
    teacher = load_teacher(source)
    expected = info.get("teacher_sha256")
    if expected and teacher.checkpoint_sha256 != expected:
        raise TeacherMismatchError(
            f"teacher {source} (checkpoint SHA-256 {teacher.checkpoint_sha256[:12]}…) is not "
            f"the one {run_dir} was distilled from ({expected[:12]}…); pass --teacher with "
            "that teacher"
        )
    return teacher


def _read_json(path: Path, directory: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{directory} is not a student folder (needs {path.name})")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{directory}: corrupt {path.name} ({err})") from None
    if not isinstance(info, dict):
        raise UserError(f"{directory}: corrupt {path.name} (not a JSON object)")
    return info


def load_students(directory: Path) -> tuple[list[BlockStudent], dict[str, Any]]:
    """Students and metadata saved by :func:`save_students`; clear errors when corrupt."""

    directory = Path(directory)
    json_path, weights_path = directory / STUDENT_JSON, directory / STUDENT_WEIGHTS
    if not json_path.is_file() or not weights_path.is_file():
        raise UserError(
            f"{directory} is not a student folder (needs {STUDENT_JSON}, {STUDENT_WEIGHTS})"
        )
    try:
        info = json.loads(json_path.read_text())
        raw = weights_path.read_bytes()
        expected = info.get("weights_sha256")
        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
            raise ValueError(f"{STUDENT_WEIGHTS} does not match {STUDENT_JSON} (truncated?)")
        payload = serialization.msgpack_restore(raw)
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as err:
        raise UserError(f"{directory}: corrupt student files ({err})") from None
    classes = {"GatedStudent": GatedStudent, "ReluStudent": ReluStudent}
    students = []
    for i, stage in enumerate(info.get("stages", [])):
        settings = dict(stage["module"])
        cls = classes[settings.pop("class")]
        if "neuron_gate" in settings:
            settings["neuron_gate"] = tuple(settings["neuron_gate"])
        module = cls(**settings)
        if str(i) not in payload:
            raise UserError(f"{weights_path}: weights of stage {i} are missing")
        students.append(BlockStudent(stage["stage"], module, payload[str(i)], stage["report"]))
    return students, info
