"""Run a grid point by point (resumable), and rewrite reports from what is recorded.

``OUT/records/<key>.json`` holds each finished point (:mod:`.records`); ``OUT/distill.json``
gathers the grid, the teacher, the machine, the records and the summary, and is rewritten
after every point, so a report can be made while the grid runs; ``OUT/REPORT.md`` and
``OUT/*.png`` are the tables and plots.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import load_average, machine_description, write_json
from benchmarks.distill.experiments import Context, run_block_point, run_e4_point, stderr_log
from benchmarks.distill.grid import EXPERIMENTS, Grid, points
from benchmarks.distill.plots import make_plots
from benchmarks.distill.records import RecordStore, record_key
from benchmarks.distill.report import markdown_report
from benchmarks.distill.summary import summarize
from benchmarks.distill.timing import run_e3_point

RUNNERS = {"E1": run_block_point, "E2": run_block_point, "E3": run_e3_point, "E4": run_e4_point}
PAYLOAD = "distill.json"


def run_grid(
    out_dir: Path,
    grid: Grid,
    experiments: Sequence[str] = EXPERIMENTS,
    *,
    log: Callable[[str], None] = stderr_log,
    keep_going: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the grid; writes records, ``distill.json``, ``REPORT.md`` and plots.

    Returns the payload, whose ``computed`` / ``reused`` count the points run now and the
    points read from records. With ``keep_going`` a point that raises is logged, listed in
    ``failed`` and left for the next run (no record is written); otherwise the error
    propagates.
    """
    out_dir = Path(out_dir)
    store = RecordStore(out_dir)
    started = time.perf_counter()
    machine = machine_description(("flax", "optax"))
    ctx = Context(grid, log)
    todo = points(grid, experiments, ctx.stages)
    teacher = ctx.teacher
    payload: dict[str, Any] = {
        "benchmark": "distill",
        "experiments": list(experiments),
        "grid": dataclasses.asdict(grid),
        "teacher": {
            "name": teacher.name,
            "dataset": teacher.dataset,
            "checkpoint_sha256": teacher.checkpoint_sha256,
            "test_accuracy": ctx.teacher_accuracy,
            "test_images": len(ctx.test),
            "params": teacher.info.get("params"),
            "stages": ctx.stages,
            "block_params": {s: teacher.block_params(s) for s in ctx.stages},
        },
        "machine": machine,
        "computed": 0,
        "reused": 0,
        "missing": 0,
        "failed": [],
        "records": [],
    }
    for index, point in enumerate(todo, 1):
        key = record_key(point["experiment"], teacher.checkpoint_sha256, point["settings"])
        record = store.get(key)
        if record is None:
            s = point["settings"]
            size = s["size"]["name"] if isinstance(s.get("size"), dict) else ""
            log(
                f"[{index}/{len(todo)}] {point['experiment']} {s['cut']}..{s['to']} {size} "
                f"samples/class={s['samples_per_class']} rows≤{s['max_rows']} seed={s['seed']}"
            )
            start = time.perf_counter()
            try:
                results = RUNNERS[point["experiment"]](ctx, point["settings"])
            except Exception as err:  # a failed point is retried on the next run
                if not keep_going:
                    raise
                log(f"    FAILED: {type(err).__name__}: {err}")
                payload["failed"].append(
                    {"key": key, **point, "error": f"{type(err).__name__}: {err}"}
                )
                continue
            record = store.put(
                key,
                {
                    **point,
                    "teacher_checkpoint_sha256": teacher.checkpoint_sha256,
                    "teacher_accuracy": ctx.teacher_accuracy,
                    "test_images": len(ctx.test),
                    "results": results,
                    "time_s": time.perf_counter() - start,
                    "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "load_average": load_average(),
                },
            )
            payload["computed"] += 1
        else:
            payload["reused"] += 1
        payload["records"].append(record)
        _save(out_dir, payload, started)  # a report can be made while the grid runs
    payload = _save(out_dir, payload, started)
    plots = make_plots(payload, out_dir)
    (out_dir / "REPORT.md").write_text(markdown_report(payload, plots), encoding="utf-8")
    return payload


def _save(out_dir: Path, payload: dict[str, Any], started: float) -> dict[str, Any]:
    payload.update(load_average_at_end=load_average(), wall_time_s=time.perf_counter() - started)
    payload["summary"] = summarize(payload)
    write_json(out_dir / PAYLOAD, payload)
    return payload


def read_payload(out_dir: Path) -> dict[str, Any]:
    """``out_dir/distill.json``.

    Raises:
        UserError: there is none (no grid was ever started there) or it is unreadable.
    """
    from cvxdist.errors import UserError

    path = Path(out_dir) / PAYLOAD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no distillation results in {out_dir} (no {PAYLOAD})") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def refresh(
    out_dir: Path,
    grid: Grid | None = None,
    experiments: Sequence[str] | None = None,
    *,
    write: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """The payload of ``out_dir`` with the points of ``grid`` (default: the one recorded in
    ``distill.json``) read from the record store, the others counted as ``missing``; the
    teacher, the machine and the run's counts stay those recorded. Computes nothing and loads
    no teacher. Draws the plots; with ``write`` also rewrites ``distill.json`` and
    ``REPORT.md``. Returns the payload and the plots' names.

    Raises:
        UserError: no payload in ``out_dir``, or ``grid`` is for another teacher.
    """
    from cvxdist.errors import UserError

    out_dir = Path(out_dir)
    payload = read_payload(out_dir)
    grid = grid or Grid.from_dict(payload["grid"])
    experiments = list(experiments or payload.get("experiments", EXPERIMENTS))
    teacher = payload["teacher"]
    if grid.teacher != teacher["name"]:
        raise UserError(f"{out_dir} holds results of {teacher['name']!r}, not {grid.teacher!r}")
    store = RecordStore(out_dir)
    if store.folder.is_dir():
        records, missing = [], 0
        for point in points(grid, experiments, teacher["stages"]):
            record = store.get(
                record_key(point["experiment"], teacher["checkpoint_sha256"], point["settings"])
            )
            if record is None:
                missing += 1
            else:
                records.append(record)
        payload.update(records=records, missing=missing)
    payload.update(grid=dataclasses.asdict(grid), experiments=experiments)
    payload["summary"] = summarize(payload)
    plots = make_plots(payload, out_dir)
    if write:
        write_json(out_dir / PAYLOAD, payload)
        (out_dir / "REPORT.md").write_text(markdown_report(payload, plots), encoding="utf-8")
    return payload, plots


def report(out_dir: Path) -> str:
    """Rewrite ``out_dir``'s report from its records (see :func:`refresh`); returns it."""
    payload, plots = refresh(out_dir)
    return markdown_report(payload, plots)


def combined_report(dirs: Sequence[Path], target: Path, preamble: str = "") -> str:
    """One markdown document with the report of each run in ``dirs`` (headings demoted)."""
    parts = ["# Convex distillation against its baselines", ""]
    if preamble:
        parts += [preamble.strip(), ""]
    for directory in dirs:
        payload, plots = refresh(Path(directory), write=False)
        prefix = os.path.relpath(directory, target.parent)
        text = markdown_report(payload, [os.path.join(prefix, p) for p in plots])
        body = text.split("\n", 1)[1]  # drop the document title
        teacher = payload["teacher"]
        parts.append(f"## Teacher `{teacher['name']}` ({teacher['dataset']})")
        parts += ["#" + line if line.startswith("#") else line for line in body.splitlines()]
    return "\n".join(parts) + "\n"
