"""PNG plots of each experiment in a payload (matplotlib, no display needed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.distill.grid import E4_METHODS, LABELS, METHODS


def methods_in(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The methods of ``rows`` in the harness's order."""
    present = list(dict.fromkeys(r["method"] for r in rows))
    order = [*METHODS, *E4_METHODS]
    return sorted(present, key=lambda m: order.index(m) if m in order else len(order))


def sample_label(key: Any) -> str:
    value = json.loads(key) if isinstance(key, str) else key
    return "all" if value is None else str(value)


def cap_label(cap: int | None) -> str:
    return "every location" if cap is None else f"≤ {cap} rows"


def series(rows: Sequence[dict[str, Any]], field: str) -> list[tuple[Any, str, str]]:
    """``(value of field, method, label)`` per line; the label names the field's value only
    when ``rows`` hold more than one (``objective`` or ``max_rows``)."""
    values = list(dict.fromkeys(json.dumps(r.get(field)) for r in rows))
    out = []
    for value in values:
        part = [r for r in rows if json.dumps(r.get(field)) == value]
        for method in methods_in(part):
            label = LABELS.get(method, method)
            if len(values) > 1:
                v = json.loads(value)
                label += f" ({cap_label(v) if field == 'max_rows' else v})"
            out.append((json.loads(value), method, label))
    return out


def make_plots(payload: dict[str, Any], out_dir: Path) -> list[str]:
    """The plots of every experiment present, written to ``out_dir``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, made = payload["summary"], []
    teacher_acc = summary["teacher_accuracy"]

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if summary["E1"]:
        blocks = list(dict.fromkeys((r["cut"], r["to"]) for r in summary["E1"]))
        fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
        for ax, (cut, to) in zip(axes[0], blocks):
            rows = [r for r in summary["E1"] if (r["cut"], r["to"]) == (cut, to)]
            for objective, method, label in series(rows, "objective"):
                pts = sorted(
                    (r for r in rows if (r["objective"], r["method"]) == (objective, method)),
                    key=lambda r: r["block_params"]["mean"],
                )
                _errorbar(ax, [r["block_params"]["mean"] for r in pts], pts, label)
            ax.axhline(teacher_acc, color="gray", ls="--", label="teacher")
            ax.axvline(rows[0]["teacher_block_params"]["mean"], color="gray", ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("block parameters (gates included)")
            ax.set_ylabel("test accuracy")
            ax.set_title(cut if cut == to else f"{cut}..{to}")
        axes[0][0].legend(fontsize=7)
        save(fig, "e1_accuracy_vs_size.png")
    if summary["E2"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = _sample_axis(summary["E2"])
        caps = list(dict.fromkeys(json.dumps(r["max_rows"]) for r in summary["E2"]))
        for cap, method, label in series(summary["E2"], "max_rows"):
            pts = [r for r in summary["E2"] if (r["max_rows"], r["method"]) == (cap, method)]
            pts.sort(key=lambda r: xs[json.dumps(r["samples_per_class"])])
            x = [xs[json.dumps(r["samples_per_class"])] for r in pts]
            style = "-" if json.dumps(cap) == caps[0] else ":"
            _errorbar(ax, x, pts, label, ls=style)
        ax.axhline(teacher_acc, color="gray", ls="--", label="teacher")
        ax.set_xscale("log")
        ticks = sorted(xs.values())
        ax.set_xticks(ticks)
        ax.set_xticklabels([sample_label(k) for k in sorted(xs, key=xs.get)])
        ax.set_xlabel("training images per class (labels unused)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
        save(fig, "e2_accuracy_vs_samples.png")
    tolerance = [
        r for r in payload["records"] if r["experiment"] == "E3" and "lam_path" not in r["settings"]
    ]
    if tolerance:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        _curves(ax_loss, tolerance, "loss", first_only=False)
        _curves(ax_acc, tolerance, "accuracy", first_only=True)
        for ax in (ax_loss, ax_acc):
            ax.set_xscale("log")
            ax.set_xlabel("wall time, compilation excluded (s)")
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("distillation loss 1/(2N)||ŷ-y||² (training rows)")
        ax_acc.set_ylabel("test accuracy")
        ax_acc.axhline(teacher_acc, color="gray", ls="--")
        ax_loss.legend(fontsize=7)
        save(fig, "e3_loss_vs_time.png")
    paths = [r for r in payload["records"] if "lam_path" in r["settings"]]
    if paths:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        _curves(ax, paths, "accuracy", first_only=True, labels=LABELS)
        ax.axhline(teacher_acc, color="gray", ls="--", label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel("wall time from the images, rows included, compilation excluded (s)")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
        save(fig, "e3_accuracy_vs_time.png")
    if summary["E4"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        samples = list(dict.fromkeys(json.dumps(r["samples_per_class"]) for r in summary["E4"]))
        methods = methods_in(summary["E4"])
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            rows = {
                json.dumps(r["samples_per_class"]): r
                for r in summary["E4"]
                if r["method"] == method
            }
            xs = [i + j * width for i, s in enumerate(samples) if s in rows]
            ax.bar(
                xs,
                [rows[s]["accuracy"]["mean"] for s in samples if s in rows],
                width,
                yerr=[rows[s]["accuracy"]["std"] for s in samples if s in rows],
                capsize=3,
                label=LABELS.get(method, method),
            )
        ax.axhline(teacher_acc, color="gray", ls="--", label="teacher")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(samples))])
        ax.set_xticklabels([f"{sample_label(s)} / class" for s in samples])
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        save(fig, "e4_head_student.png")
    return made


def _errorbar(
    ax: Any, x: Sequence[float], pts: Sequence[dict[str, Any]], label: str, **kw: Any
) -> None:
    ax.errorbar(
        x,
        [r["accuracy"]["mean"] for r in pts],
        yerr=[r["accuracy"]["std"] for r in pts],
        marker="o",
        capsize=3,
        label=label,
        **kw,
    )


def _curves(
    ax: Any,
    records: Sequence[dict[str, Any]],
    key: str,
    first_only: bool,
    labels: dict[str, str] | None = None,
) -> None:
    """Every method's ``key`` against time, one line per record (seed), one color per method.

    ``first_only`` plots only the curve points that have ``key`` (accuracy is measured at a
    few snapshots); convex curves get markers on every point.
    """
    colors: dict[str, str] = {}
    for record in records:
        for result in record["results"]:
            if "curve" not in result:
                continue
            method = result["method"]
            color = colors.setdefault(method, f"C{len(colors)}")
            curve = [p for p in result["curve"] if p["time_s"] > 0 and key in p]
            label = (labels or {}).get(method, method) if record is records[0] else None
            style = "o-" if first_only or method.startswith("convex") else "-"
            ax.plot(
                [p["time_s"] for p in curve],
                [p[key] for p in curve],
                style,
                color=color,
                alpha=0.8,
                label=label,
                ms=3,
            )


def _sample_axis(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    known = sorted({r["samples_per_class"] for r in rows if r["samples_per_class"] is not None})
    top = known[-1] if known else 1
    return {
        json.dumps(k): float(k) if k is not None else float(top * 10)
        for k in {r["samples_per_class"] for r in rows}
    }
