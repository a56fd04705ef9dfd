"""One problem measured on both sides, and the run over the problems (resumable per problem)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.common import load_average, machine_description, write_json
from benchmarks.solvers.instances import (
    LAM_FRAC,
    MAX_ITERS,
    OUR_TOLS,
    REG,
    TARGET_GAP,
    TEACHER_NOISE,
    TEACHER_WIDTH,
    GapEvaluator,
    ProblemSpec,
    float32_problem,
    make_instance,
    select_problems,
)
from benchmarks.solvers.ours import (
    profile_iterations,
    run_admm_and_auto,
    run_cvxdist,
    time_iteration_vs_gemms,
)
from benchmarks.solvers.pyscnn import run_pyscnn, scnn_available, scnn_threads
from benchmarks.solvers.report import markdown_report, summarize
from benchmarks.solvers.variants import run_variants, summarize_variants, variants_summary


def run_problem(
    spec: ProblemSpec,
    *,
    scnn_backend: str,
    time_limit_s: float,
    repeats: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    log(f"[{spec.name}] N={spec.N} d={spec.d} c={spec.c} P={spec.P}  load {load_average()}")
    inst = make_instance(spec)
    evaluator = GapEvaluator(inst)
    lam = spec.lam_frac * evaluator.lam_max
    problem, flips = float32_problem(inst)
    record: dict[str, Any] = {
        "name": spec.name,
        "N": spec.N,
        "d": spec.d,
        "c": spec.c,
        "P": int(inst.G.shape[1]),
        "P_sampled": spec.P,
        "gates_dropped": inst.gates_dropped,
        "seed": spec.seed,
        "lam_frac": spec.lam_frac,
        "lam_max": evaluator.lam_max,
        "lam": lam,
        "float32_mask_flips_fixed": flips,
        "load_average_before": load_average(),
    }
    ours = run_cvxdist(problem, lam, evaluator, repeats or spec.repeats, log)
    log(f"  pyscnn ({scnn_backend}) ...")
    scnn = run_pyscnn(
        inst,
        lam,
        evaluator,
        backend=scnn_backend,
        eval_every=spec.eval_every,
        time_limit_s=time_limit_s,
    )
    scnn.pop("U", None)
    if scnn["reached_target"]:
        log(
            f"  pyscnn: {scnn['time_s']:.3f}s, {scnn['iterations']} iters, "
            f"gap {scnn['rel_gap']:.3g}"
        )
    else:
        log(f"  pyscnn: no iterate reached gap {TARGET_GAP} in {scnn['time_run_s']:.1f}s")
    profile = profile_iterations(problem, lam, ours["tol"], spec.profile_iters or MAX_ITERS)
    gemm = time_iteration_vs_gemms(inst, problem, lam, spec.gemm_repeats)
    log(
        f"  interleaved: iteration {gemm['iteration_s'] * 1e3:.2f} ms, GEMMs "
        f"{gemm['gemm_s'] * 1e3:.2f} ms, ratio {gemm['iteration_over_gemm']:.2f}; solve "
        f"{ours['time_per_iteration_s'] * 1e3:.2f} ms/iteration; backtracks "
        f"{profile['backtracks']} in {profile['iterations']} iterations"
    )
    record.update({"cvxdist": ours, "pyscnn": scnn, "profile": profile, "gemm": gemm})
    record.update(run_admm_and_auto(problem, lam, evaluator, repeats or spec.repeats, log, ours))
    record["variants"] = run_variants(problem, lam, evaluator, repeats or spec.repeats, log)
    if scnn_time := scnn.get("time_s"):
        if record["admm"].get("time_steady_s"):
            record["admm_speedup_steady"] = scnn_time / record["admm"]["time_steady_s"]
        record["auto_speedup_steady"] = scnn_time / record["auto"]["time_steady_s"]
        if record["best_time_steady_s"]:
            record["best_speedup_steady"] = scnn_time / record["best_time_steady_s"]
    record["load_average_after"] = load_average()
    scnn_time = scnn.get("time_s")
    record["speedup_steady"] = scnn_time / ours["time_steady_s"] if scnn_time else None
    record["speedup_with_compile"] = scnn_time / ours["time_with_compile_s"] if scnn_time else None
    if not scnn_time:  # pyscnn never reached the gap: its run time gives lower bounds
        record["speedup_steady_at_least"] = scnn["time_run_s"] / ours["time_steady_s"]
        record["speedup_with_compile_at_least"] = scnn["time_run_s"] / ours["time_with_compile_s"]
    # Target metric: one iteration (no backtrack) / its two GEMMs, timed interleaved.
    record["iteration_over_gemm"] = gemm["iteration_over_gemm"]
    # Context: the solve's average iteration (backtracks included, different time window).
    record["solve_iteration_over_gemm"] = ours["time_per_iteration_s"] / gemm["gemm_s"]
    record["solvers"] = summarize_variants(record)
    return record


def run_benchmark(
    out_dir: Path,
    *,
    quick: bool = False,
    only: Sequence[str] | None = None,
    repeats: int | None = None,
    scnn_backend: str = "numpy",
    time_limit_s: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; writes ``solvers.json`` and ``solvers.md`` under ``out_dir``."""
    ok, why = scnn_available()
    if not ok:
        raise RuntimeError(why)
    if log is None:

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

    specs = select_problems(quick, only)
    if time_limit_s is None:
        time_limit_s = 120.0 if quick else 5400.0
    threads = scnn_threads()
    machine = machine_description(("pyscnn", "torch", "opt_einsum", "linalg_backends"))
    out_dir = Path(out_dir)
    problems = []
    for spec in specs:
        # A finished problem is kept (resume after an interruption) while the spec, the
        # settings and the commit are the same; anything else is measured again.
        key = {"spec": asdict(spec), "commit": machine["git_commit"], "backend": scnn_backend}
        key["modified"] = machine["package_modified_since_commit"]
        saved = out_dir / "records" / f"{spec.name}.json"
        if saved.is_file() and not key["modified"]:
            previous = json.loads(saved.read_text())
            if previous.get("key") == key:
                log(f"[{spec.name}] reusing {saved}")
                problems.append(previous["record"])
                continue
        record = run_problem(
            spec, scnn_backend=scnn_backend, time_limit_s=time_limit_s, repeats=repeats, log=log
        )
        write_json(saved, {"key": key, "record": record})
        problems.append(record)
    payload = {
        "benchmark": "solvers",
        "quick": quick,
        "settings": {
            "target_gap": TARGET_GAP,
            "our_tol": OUR_TOLS[0],
            "lam_frac": LAM_FRAC,
            "reg": REG,
            "dtype": "float32",
            "gap_dtype": "float64",
            "scnn_backend": scnn_backend,
            "scnn_time_limit_s": time_limit_s,
            "data": (
                "X Gaussian with unit-norm columns; Y = relu(X W1) W2 + noise "
                f"({TEACHER_WIDTH} hidden units, noise {TEACHER_NOISE} of the std, each column "
                "scaled to unit std); G Gaussian (d, P), seeded; all values float32-representable"
            ),
            "specs": [asdict(s) for s in specs],
        },
        "machine": machine,
        "threads": threads,
        "problems": problems,
        "summary": {**summarize(problems), "variants": variants_summary(problems)},
        "load_average_at_end": load_average(),
    }
    write_json(out_dir / "solvers.json", payload)
    (out_dir / "solvers.md").write_text(markdown_report(payload), encoding="utf-8")
    return payload
