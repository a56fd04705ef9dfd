"""Saving and loading distilled students, and the output-folder discipline of the commands.

A student folder holds ``student.json`` (teacher reference, cut, the Flax module settings of
each stage) and ``student.msgpack`` (the variables, flax.serialization: no pickle). Commands
write into a temporary sibling folder and rename it at the end, so an error or an interrupt
leaves nothing half-written.
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

from cvxdist.distill.pipeline import BlockStudent
from cvxdist.distill.student import GatedStudent
from cvxdist.errors import UserError

STUDENT_JSON = "student.json"
STUDENT_WEIGHTS = "student.msgpack"


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


def load_students(directory: Path) -> tuple[list[BlockStudent], dict[str, Any]]:
    """Students and metadata saved by :func:`save_students`; clear errors when corrupt."""
    from cvxdist.baselines import ReluStudent

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
