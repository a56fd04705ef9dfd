"""The markdown report of a payload: the tables, the targets, the plots and the machine."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from benchmarks.common import fmt, markdown_table
from benchmarks.distill.grid import LABELS
from benchmarks.distill.plots import cap_label, methods_in, sample_label
from benchmarks.distill.summary import find, main_cap

E1_HEADER = ["size", "method", "params", "compression", "accuracy %", "agreement %"]
E1_HEADER += ["block rel. MSE"]


def pm(stat: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of an aggregated statistic."""
    mean, std = stat["mean"], stat["std"]
    if not math.isfinite(mean):
        return "—"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _by_objective(rows: Sequence[dict[str, Any]]) -> list[tuple[list[str], list[dict[str, Any]]]]:
    """``(heading lines, rows)`` per objective; no heading when there is only one."""
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    if len(objectives) == 1:
        return [([], list(rows))]
    return [
        ([f"*Objective `{o}`*", ""], [r for r in rows if r["objective"] == o]) for o in objectives
    ]


def markdown_report(payload: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The tables of every experiment present, the target checks and the machine."""
    summary, teacher, grid = payload["summary"], payload["teacher"], payload["grid"]
    seeds = len(grid["seeds"])
    rows_text = (
        "every output location of every image"
        if grid["max_rows"] is None
        else f"at most {grid['max_rows']} rows per stage"
    )
    lines = [
        "# Convex distillation against its baselines",
        "",
        f"Teacher `{teacher['name']}` ({teacher['dataset']}, {teacher['params']} parameters), "
        f"test accuracy {100 * teacher['test_accuracy']:.2f} % on {teacher['test_images']} test "
        f"images. Every number is mean ± std over {seeds} seeds (the seed changes the gates, the "
        "training subset, the row subsample and the Adam initialisations). No labels are read "
        "except to report accuracy; no student is fine-tuned.",
        "",
        f"Settings: `{grid['reg']}` regularizer, solved to a relative duality gap ≤ {grid['tol']}; "
        f"{rows_text}; Adam lr {grid['adam_lr']}, "
        f"{grid['adam_steps']} steps (mini-batch {grid['adam_batch']} rows); logit KD "
        f"T = {grid['kd_temperature']}, {grid['kd_steps']} steps of {grid['kd_batch']} images, "
        f"lr {grid['kd_lr']}. Baselines are matched to the convex student's parameter count "
        "(gates and PCA projections included); pruning reports the non-zeros it kept "
        "(BatchNorm scale/bias are never pruned).",
        "",
    ]
    stage_params = ", ".join(f"{k}: {v}" for k, v in teacher["block_params"].items())
    lines += [f"Teacher block parameters: {stage_params}.", ""]
    lines += _e1(summary["E1"])
    lines += _e2(summary["E2"], main_cap(payload, summary["E2"]))
    lines += _e3_tolerances(summary["E3"]["per_seed"], grid)
    lines += _e3_paths(summary["E3"].get("accuracy_time", {}))
    lines += _e4(summary["E4"])
    lines += _targets(summary.get("targets", {}))
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines + _machine(payload))


def _e1(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["## E1: accuracy vs student size", ""]
    for heading, part in _by_objective(rows):
        lines += heading
        for cut, to in dict.fromkeys((r["cut"], r["to"]) for r in part):
            name = cut if cut == to else f"{cut}..{to}"
            block = [r for r in part if (r["cut"], r["to"]) == (cut, to)]
            teacher_params = block[0]["teacher_block_params"]["mean"]
            lines += [f"**{name}** replaced (teacher block: {teacher_params:.0f} parameters)", ""]
            table = []
            for size in dict.fromkeys(r["size"] for r in block):
                for method in methods_in([r for r in block if r["size"] == size]):
                    r = find(block, size=size, method=method)
                    table.append(
                        [
                            size,
                            LABELS.get(method, method),
                            f"{r['block_params']['mean']:.0f}",
                            f"{r['compression']['mean']:.1f}×",
                            pm(r["accuracy"], 100, 2),
                            pm(r["agreement"], 100, 2),
                            pm(r["block_rel_mse"], 1, 3),
                        ]
                    )
            lines += [markdown_table(E1_HEADER, table), ""]
    return lines


def _e2(rows: Sequence[dict[str, Any]], main: int | None) -> list[str]:
    if not rows:
        return []
    lines = ["## E2: accuracy vs samples per class (last stage)", ""]
    for heading, part in _by_objective(rows):
        lines += heading
        caps = list(dict.fromkeys(json.dumps(r["max_rows"]) for r in part))
        for cap in caps:
            series = [r for r in part if json.dumps(r["max_rows"]) == cap]
            if len(caps) > 1:
                lines += [f"**Rows: {_rows_words(json.loads(cap))}**", ""]
            lines += _e2_table(series)
        if len(caps) > 1:
            lines += _e2_caps(part, [json.loads(c) for c in caps], main)
    return lines


def _rows_words(cap: int | None) -> str:
    if cap is None:
        return "every output location of every image (they scale with the images)"
    return f"at most {cap} per stage"


def _e2_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    samples = list(dict.fromkeys(json.dumps(r["samples_per_class"]) for r in rows))
    table = []
    for method in methods_in(rows):
        cells = [LABELS.get(method, method)]
        for s in samples:
            r = find(rows, samples_per_class=json.loads(s), method=method)
            cells.append(pm(r["accuracy"], 100, 2) if r else "—")
        table.append(cells)
    sizes = ["convex student params"]
    for s in samples:
        r = find(rows, samples_per_class=json.loads(s), method="convex")
        sizes.append(f"{r['block_params']['mean']:.0f}" if r else "—")
    table.append(sizes)
    teacher_params = rows[0]["teacher_block_params"]["mean"]
    header = ["method", *[f"{sample_label(s)} / class" for s in samples]]
    return [
        "Test accuracy (%), mean ± std over seeds; every baseline is matched to the convex "
        f"student's size in its column (teacher block: {teacher_params:.0f} parameters).",
        "",
        markdown_table(header, table),
        "",
    ]


def _e2_caps(rows: Sequence[dict[str, Any]], caps: list[int | None], main: int | None) -> list[str]:
    """The convex student by samples per class under each row cap, and what the cap costs."""
    samples = list(dict.fromkeys(json.dumps(r["samples_per_class"]) for r in rows))
    table = []
    for s in samples:
        cells = [f"{sample_label(s)} / class"]
        accs = {}
        for cap in caps:
            r = find(rows, samples_per_class=json.loads(s), method="convex", max_rows=cap)
            accs[cap] = r["accuracy"]["mean"] if r else None
            cells.append(pm(r["accuracy"], 100, 2) if r else "—")
        others = [a for c, a in accs.items() if c != main and a is not None]
        gain = [100 * (accs[main] - a) for a in others] if accs.get(main) is not None else []
        cells.append(", ".join(f"{g:+.2f}" for g in gain) or "—")
        table.append(cells)
    header = ["images", *[f"convex, {cap_label(c)}" for c in caps], "main − others (points)"]
    return [
        f"Effect of the row cap on the convex student (main series: {cap_label(main)}).",
        "",
        markdown_table(header, table),
        "",
    ]


def _e3_tolerances(per_seed: Sequence[dict[str, Any]], grid: dict[str, Any]) -> list[str]:
    if not per_seed:
        return []
    lines = ["## E3: distillation loss and accuracy vs wall time (last stage)", ""]
    table = []
    for entry in per_seed:
        for method, value in entry.items():
            if not (method.startswith("convex") and isinstance(value, dict)):
                continue
            table.append(
                [
                    entry["seed"],
                    method,
                    fmt(value["final_loss"], 4),
                    fmt(value["final_time_s"], 3),
                    fmt(entry.get("adam_loss"), 4),
                    fmt(entry.get("adam_time_s"), 3),
                    fmt(value.get("time_to_relu-adam_loss_s"), 3),
                    fmt(value.get("ratio_to_relu-adam"), 3),
                    fmt(value.get("ratio_to_relu-adam-mb"), 3),
                    fmt(value.get("ratio_to_fixed-gate-adam"), 3),
                ]
            )
    header = [
        "seed",
        "solver",
        "convex loss (tightest tol)",
        "convex time (s)",
        "Adam final loss",
        "Adam time (s)",
        "convex time to Adam's loss (s)",
        "ratio (ReLU Adam)",
        "ratio (mini-batch Adam)",
        "ratio (fixed-gate Adam)",
    ]
    lines += [
        "Loss is 1/(2N)||ŷ − y||² on the training rows (reduced space), the loss every method "
        "fits. Convex: independent solves to gap tolerances "
        f"{', '.join(str(t) for t in grid['e3_tols'])}; Adam: full batch, "
        f"{grid['e3_adam_steps']} steps. Compilation excluded on both sides. "
        "'ratio' = convex time to reach Adam's final loss / Adam's training time (— = never).",
        "",
        markdown_table(header, table),
        "",
    ]
    table = []
    for entry in per_seed:
        for name, run in entry.get("adam_runs", {}).items():
            table.append(
                [
                    entry["seed"],
                    LABELS.get(name, name),
                    fmt(run["final_loss"], 4),
                    fmt(run["train_time_s"], 3),
                    f"{100 * run['accuracy']:.2f}",
                    fmt(run["time_to_convex_loss_s"], 3),
                ]
            )
    header = ["seed", "Adam run", "final loss", "time (s)", "accuracy %"]
    header += ["time to the convex loss (s)"]
    return [
        *lines,
        "The other direction: when each Adam run first reached the convex student's loss "
        "(best solver, tightest tolerance).",
        "",
        markdown_table(header, table),
        "",
    ]


def _e3_paths(accuracy_time: dict[str, Any]) -> list[str]:
    methods = accuracy_time.get("methods", [])
    if not methods:
        return []
    lines = ["## E3: test accuracy vs wall time, rows included (last stage)", ""]
    path = " → ".join(f"{f:g}" for f in accuracy_time.get("lam_path", []))
    lines += [
        "Every method starts from the same images and its clock from the row extraction (timed "
        f"whole). Convex: the warm-started λ path {path} (fractions of λ_max), its time that "
        "of the whole path, its accuracy and size those of the last student, which every "
        "baseline is matched to. Adam and logit KD: their final snapshot. The compilation of "
        "the solver and of the training steps is excluded from the times and shown apart.",
        "",
    ]
    for heading, part in _by_objective(methods):
        table = [
            [
                LABELS.get(r["method"], r["method"]),
                f"{r['block_params']['mean']:.0f}",
                pm(r["accuracy"], 100, 2),
                pm(r["time_s"], 1, 2),
                pm(r["rows_s"], 1, 2),
                pm(r["compile_s"], 1, 2),
            ]
            for r in sorted(part, key=lambda r: methods_in(part).index(r["method"]))
        ]
        header = ["method", "params", "accuracy %", "time (s)", "of which rows (s)", "compile (s)"]
        lines += [*heading, markdown_table(header, table), ""]
    per_seed = [e for e in accuracy_time.get("per_seed", []) if "kd_accuracy" in e]
    if per_seed:
        table = [
            [
                e["seed"],
                f"{100 * e['convex_accuracy']:.2f}",
                fmt(e["convex_time_s"], 3),
                f"{100 * e['kd_accuracy']:.2f}",
                fmt(e["kd_time_s"], 3),
                fmt(e["convex_over_kd_time"], 3),
                fmt(e["path_time_to_kd_accuracy_s"], 3),
            ]
            for e in per_seed
        ]
        header = ["seed", "convex acc. %", "convex time (s)", "KD acc. %", "KD time (s)"]
        header += ["convex / KD time", "path time to KD's accuracy (s)"]
        lines += [
            "Convex λ path against logit KD, per seed (the last column: the first λ on the path "
            "whose student reaches KD's final accuracy, read with the test labels; — = none).",
            "",
            markdown_table(header, table),
            "",
        ]
    return lines


def _e4(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["## E4: head student (pooled features -> logits)", ""]
    header = ["samples / class", "method", "params", "accuracy %", "agreement %"]
    for heading, part in _by_objective(rows):
        table = [
            [
                sample_label(r["samples_per_class"]),
                LABELS.get(r["method"], r["method"]),
                f"{r['block_params']['mean']:.0f}",
                pm(r["accuracy"], 100, 2),
                pm(r["agreement"], 100, 2),
            ]
            for r in part
        ]
        lines += [*heading, markdown_table(header, table), ""]
    return lines


def _targets(targets: dict[str, Any]) -> list[str]:
    if not targets:
        return []
    lines = ["## Targets", ""]
    e2 = targets.get("E2_10_per_class")
    if e2:
        lines.append(
            f"- E2, 10 images per class: convex − ReLU/Adam = "
            f"{e2['convex_minus_relu_adam_points']:+.2f} ± {e2['std_points']:.2f} points "
            f"(target ≥ +3): **{'met' if e2['met'] else 'not met'}**."
        )
    e3 = targets.get("E3_time_ratio")
    if e3:
        ratios = ", ".join("never" if r is None else f"{r:.3f}" for r in e3["ratios"])
        lines.append(
            f"- E3, convex time to Adam's final loss / Adam's time: {ratios} "
            f"(target ≤ 0.1 in every seed): **{'met' if e3['met'] else 'not met'}**."
        )
    kd = targets.get("E3_kd_time")
    if kd:
        pairs = ", ".join(f"{r:.3f} ({p:+.2f})" for r, p in zip(kd["ratios"], kd["points"]))
        lines.append(
            "- E3, convex λ path time / logit KD's time (accuracy difference, points): "
            f"{pairs} (target: KD's accuracy in ≤ 0.1 of its time, every seed): "
            f"**{'met' if kd['met'] else 'not met'}**."
        )
    e1 = targets.get("E1_last_two_stages_10x")
    if e1:
        best = e1["best_at_10x"]
        if best:
            lines.append(
                f"- E1, last two stages about 10× smaller: size {best['size']} "
                f"({best['compression']:.1f}×) loses {best['drop_points']:.2f} ± "
                f"{100 * best['accuracy_std']:.2f} points of accuracy."
            )
        else:
            top = max(e1["rows"], key=lambda r: r["compression"]) if e1["rows"] else None
            lines.append(
                "- E1, last two stages: no size on the ladder reached 10× compression"
                + (
                    f" (largest: {top['compression']:.1f}×, drop {top['drop_points']:.2f} points)."
                    if top
                    else "."
                )
            )
    return [*lines, ""]


def _machine(payload: dict[str, Any]) -> list[str]:
    machine = payload["machine"]
    missing = payload.get("missing")
    return [
        "## Machine",
        "",
        f"{machine['cpu_model']}, {machine['usable_cores']} usable cores "
        f"({machine['logical_cores']} logical), {machine['memory_gib']} GiB, "
        f"{machine['os']}; JAX {machine['versions'].get('jax')} on {machine['jax_backend']}; "
        f"XLA_FLAGS `{machine.get('xla_flags') or '(none)'}`; commit {machine['git_commit']}"
        f"{' (package modified)' if machine.get('package_modified_since_commit') else ''}. "
        f"Load average at start {machine['load_average_at_start']}, at end "
        f"{payload.get('load_average_at_end')}: the machine was shared, so wall times are "
        f"pessimistic. Harness wall time {payload['wall_time_s']:.0f} s "
        f"({payload['computed']} points computed, {payload['reused']} reused, "
        f"{len(payload.get('failed', []))} failed"
        + (f", {missing} not yet computed: this report is partial" if missing else "")
        + ").",
        "",
    ]
