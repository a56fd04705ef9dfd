"""From records to tables: mean ± std over seeds per experiment, and the checks of the targets.

Rows of every table carry the objective (``activations`` for records that predate the axis).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.distill.grid import DEFAULT_OBJECTIVE, EVALUATED

METRICS = (*EVALUATED, "time_s")
E3_ADAM = ("relu-adam", "relu-adam-mb", "fixed-gate-adam")


def setting(record: dict[str, Any], name: str) -> Any:
    """A setting of a record's point (the objective defaults to ``activations``)."""
    default = DEFAULT_OBJECTIVE if name == "objective" else None
    return record["settings"].get(name, default)


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def aggregate(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """``{"seeds": n, key: {"mean", "std"}}`` over the results of one group."""
    out: dict[str, Any] = {"seeds": len(results)}
    for key in keys:
        mean, std = mean_std([r.get(key) for r in results])
        out[key] = {"mean": mean, "std": std}
    return out


def _table(
    records: Sequence[dict[str, Any]], experiment: str, fields: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per (objective, ``fields``..., method) with the metrics over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        if record["experiment"] != experiment:
            continue
        values = tuple(json.dumps(setting(record, f), sort_keys=True) for f in fields)
        key = (json.dumps(setting(record, "objective")), *values)
        for result in record["results"]:
            groups.setdefault((*key, result["method"]), []).append(result)
    rows = []
    for key, results in groups.items():
        row = {"objective": json.loads(key[0])}
        row.update({f: json.loads(v) for f, v in zip(fields, key[1:-1])})
        rows.append({**row, "method": key[-1], **aggregate(results, METRICS)})
    return rows


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std tables per experiment and the checks against the targets."""
    records = payload["records"]
    teacher_acc = payload["teacher"]["test_accuracy"]
    summary: dict[str, Any] = {"teacher_accuracy": teacher_acc}
    e1 = _table(records, "E1", ("cut", "to", "size"))
    summary["E1"] = [{**r, "size": r["size"]["name"]} for r in e1]
    summary["E2"] = _table(records, "E2", ("max_rows", "samples_per_class"))
    summary["E4"] = _table(records, "E4", ("samples_per_class",))
    e3 = [r for r in records if r["experiment"] == "E3"]
    summary["E3"] = {
        "per_seed": _summarize_tolerances([r for r in e3 if "lam_path" not in r["settings"]]),
        "accuracy_time": _summarize_paths([r for r in e3 if "lam_path" in r["settings"]]),
    }
    summary["targets"] = _targets(summary, teacher_acc, payload)
    return summary


def _summarize_tolerances(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed: Adam's final loss and time, and when each convex solver first reached it."""
    per_seed = []
    for record in records:
        by_method = {r["method"]: r for r in record["results"] if "curve" in r}
        adam = by_method.get("relu-adam")
        entry: dict[str, Any] = {"seed": record["settings"]["seed"]}
        if adam is not None:
            entry.update(adam_loss=adam["loss"], adam_time_s=adam["train_time_s"])
            entry["adam_accuracy"] = adam["accuracy"]
        for method, result in by_method.items():
            if not method.startswith("convex"):
                continue
            entry[method] = {
                "final_loss": result["loss"],
                "final_time_s": result["curve"][-1]["time_s"],
                "final_accuracy": result["accuracy"],
            }
            for name in E3_ADAM:
                other = by_method.get(name)
                if other is None:
                    continue
                reach = [p for p in result["curve"] if p["loss"] <= other["loss"]]
                time_to = reach[0]["time_s"] if reach else None
                entry[method][f"time_to_{name}_loss_s"] = time_to
                entry[method][f"ratio_to_{name}"] = (
                    None if time_to is None else time_to / max(other["train_time_s"], 1e-12)
                )
        convex_losses = [r["loss"] for m, r in by_method.items() if m.startswith("convex")]
        target = min(convex_losses) if convex_losses else None
        runs = {}
        for name in E3_ADAM:
            other = by_method.get(name)
            if other is None:
                continue
            reach = [p for p in other["curve"] if target is not None and p["loss"] <= target]
            runs[name] = {
                "final_loss": other["loss"],
                "train_time_s": other["train_time_s"],
                "accuracy": other["accuracy"],
                "time_to_convex_loss_s": reach[0]["time_s"] if reach else None,
            }
        entry["adam_runs"] = runs
        per_seed.append(entry)
    return per_seed


def _summarize_paths(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy against wall time: each method over seeds, and the convex path against KD."""
    per_seed, by_method = [], {}
    for record in records:
        results = {r["method"]: r for r in record["results"]}
        entry: dict[str, Any] = {
            "seed": record["settings"]["seed"],
            "objective": setting(record, "objective"),
        }
        for method, result in results.items():
            by_method.setdefault((entry["objective"], method), []).append(result)
        convex, kd = results.get("convex"), results.get("logit-kd")
        if convex is not None and kd is not None:
            reach = [p for p in convex["curve"] if p["accuracy"] >= kd["accuracy"]]
            entry.update(
                convex_accuracy=convex["accuracy"],
                convex_time_s=convex["time_s"],
                kd_accuracy=kd["accuracy"],
                kd_time_s=kd["time_s"],
                convex_over_kd_time=convex["time_s"] / max(kd["time_s"], 1e-12),
                convex_minus_kd_points=100 * (convex["accuracy"] - kd["accuracy"]),
                path_time_to_kd_accuracy_s=reach[0]["time_s"] if reach else None,
            )
        per_seed.append(entry)
    keys = ("accuracy", "time_s", "compile_s", "rows_s", "block_params")
    methods = [
        {"objective": objective, "method": method, **aggregate(results, keys)}
        for (objective, method), results in by_method.items()
    ]
    path = records[0]["settings"]["lam_path"] if records else []
    return {"lam_path": path, "per_seed": per_seed, "methods": methods}


def find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def main_objective(payload: dict[str, Any]) -> str:
    objectives = payload.get("grid", {}).get("objectives") or [DEFAULT_OBJECTIVE]
    return objectives[0]


def main_cap(payload: dict[str, Any], e2: Sequence[dict[str, Any]]) -> int | None:
    """E2's main row cap: the grid's first (the first recorded when the grid is unknown)."""
    grid = payload.get("grid")
    if grid is not None:
        return (grid.get("e2_max_rows") or [grid["max_rows"]])[0]
    return e2[0]["max_rows"] if e2 else None


def _targets(summary: dict[str, Any], teacher_acc: float, payload: dict[str, Any]) -> dict:
    """The targets, on the grid's first objective and E2's main row cap."""
    targets: dict[str, Any] = {}
    objective = main_objective(payload)
    e2 = [r for r in summary["E2"] if r["objective"] == objective]
    cap = main_cap(payload, e2)
    convex = find(e2, samples_per_class=10, method="convex", max_rows=cap)
    relu = find(e2, samples_per_class=10, method="relu-adam", max_rows=cap)
    if convex and relu:
        gap = convex["accuracy"]["mean"] - relu["accuracy"]["mean"]
        std = math.hypot(convex["accuracy"]["std"], relu["accuracy"]["std"])
        targets["E2_10_per_class"] = {
            "convex_minus_relu_adam_points": 100 * gap,
            "std_points": 100 * std,
            "target_points": 3.0,
            "met": gap >= 0.03,
        }
    ratios = []
    for entry in summary["E3"]["per_seed"]:
        for method, value in entry.items():
            if method.startswith("convex") and isinstance(value, dict):
                ratios.append(value.get("ratio_to_relu-adam"))
    if ratios:
        reached = [r for r in ratios if r is not None]
        targets["E3_time_ratio"] = {
            "ratios": ratios,
            "reached_in_all_seeds": len(reached) == len(ratios),
            "mean_ratio": statistics.fmean(reached) if reached else None,
            "target": 0.1,
            "met": len(reached) == len(ratios) and max(reached) <= 0.1,
        }
    seeds = [
        e
        for e in summary["E3"]["accuracy_time"]["per_seed"]
        if e["objective"] == objective and "kd_accuracy" in e
    ]
    if seeds:
        targets["E3_kd_time"] = {
            "ratios": [e["convex_over_kd_time"] for e in seeds],
            "points": [e["convex_minus_kd_points"] for e in seeds],
            "target": 0.1,
            "met": all(
                e["convex_over_kd_time"] <= 0.1 and e["convex_minus_kd_points"] >= 0 for e in seeds
            ),
        }
    stages = payload["teacher"]["stages"]
    if len(stages) > 1:
        both = [
            r
            for r in summary["E1"]
            if r["method"] == "convex"
            and r["objective"] == objective
            and (r["cut"], r["to"]) == (stages[-2], stages[-1])
        ]
        rows = [
            {
                "size": r["size"],
                "compression": r["compression"]["mean"],
                "accuracy": r["accuracy"]["mean"],
                "accuracy_std": r["accuracy"]["std"],
                "drop_points": 100 * (teacher_acc - r["accuracy"]["mean"]),
            }
            for r in sorted(both, key=lambda r: r["block_params"]["mean"])
        ]
        ten = [r for r in rows if r["compression"] >= 9.5]
        if rows:  # only when E1 ran on the last two stages
            targets["E1_last_two_stages_10x"] = {
                "rows": rows,
                "best_at_10x": max(ten, key=lambda r: r["accuracy"]) if ten else None,
                "note": "the paper: about 10x smaller last two stages without a significant drop",
            }
    return targets
