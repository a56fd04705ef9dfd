"""One prepared accelerator check: the MNIST-shaped convex solve and a distillation run.

Part 1 solves scnn's MNIST shape (N=60000 rows, d=784, c=10 outputs, P=5000 gates; planted
targets, unit-norm columns, ``coupled`` at λ = 0.05 λ_max) to a relative duality gap of 1e-3
with each solver configuration of :data:`VARIANTS` (R-FISTA; R-FISTA on working sets, with
gap-safe screening, with Anderson extrapolation; a strong-rule λ path ending at that λ; ADMM,
and an ADMM path on one eigendecomposition of its kernel) and GEMM precision (``highest``:
true float32; ``bf16``: bfloat16 operands, float32 accumulation, re-certified in float32).
The first case is the configuration expected to be fastest (working sets with bf16 phases):
the target is that solve in under 60 s on one H100/H200 (``target_met`` in the JSON). Part 2
distills the last stage, then the last two stages, of the shipped Fashion-MNIST ResNet-20 on
all its training images (``cvxdist distill``) and records the spliced accuracy.

Every case runs in its own process under a deadline taken from one overall budget (default
450 s, so the whole script ends inside 8 minutes), and its JSON is written as soon as it ends:
a case that runs out of time or memory is recorded as such and the others still run. The
first call of each solve compiles; the time of a second, steady-state call is reported too.

Run on an accelerator machine from the repository root (no install of cvxdist needed, only
its dependencies with a CUDA jaxlib; Fashion-MNIST is read from ``--data-dir`` or the Debian
package's folder, and the distillation part is recorded as skipped without it)::

    PYTHONPATH=. python -m benchmarks.gpu_check --out benchmarks/results/gpu \
        --data-dir data/fashion-mnist

where ``data/fashion-mnist`` is an untracked copy of ``/usr/share/datasets/fashion-mnist``
taken along to that machine.

``--size tiny`` runs the same code on a small problem and the digits teacher (CI, CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, machine_description, write_json

#: Problem shapes: ``full`` is scnn's MNIST shape.
SIZES: dict[str, dict[str, int]] = {
    "full": {"N": 60_000, "d": 784, "c": 10, "P": 5_000},
    "tiny": {"N": 600, "d": 20, "c": 3, "P": 200},
}
#: (variant of :data:`VARIANTS`, GEMM precision), best expected first, the riskiest last.
CASES: tuple[tuple[str, str], ...] = (
    ("fista-ws", "bf16"),
    ("fista-ws", "highest"),
    ("fista", "highest"),
    ("fista-ws-screen", "bf16"),
    ("fista-anderson", "highest"),
    ("fista", "bf16"),
    ("path-ws", "bf16"),
    ("admm", "highest"),
    ("admm-eigh-path", "highest"),
)
#: Solver configurations: ``solve`` options, or a ``path`` of λ fractions ending at LAM_FRAC.
VARIANTS: dict[str, dict[str, Any]] = {
    "fista": {"solver": "fista"},
    "fista-ws": {"solver": "fista", "working_set": True},
    "fista-ws-screen": {"solver": "fista", "working_set": True, "screen": True},
    "fista-anderson": {"solver": "fista", "anderson": 5},
    "admm": {"solver": "admm", "certify_every": 3},
    "path-ws": {"solver": "fista", "path": (0.2, 0.1, 0.05)},
    "admm-eigh-path": {
        "solver": "admm",
        "linear_solver": "eigh",
        "certify_every": 3,
        "path": (0.2, 0.1, 0.05),
    },
}
LAM_FRAC = 0.05
TARGET_GAP = 1e-3
#: Wall time the MNIST-shaped solve must stay under (steady state, the first case).
TARGET_S = 60.0
#: Distillation runs: (name, teacher, dataset, extra ``cvxdist distill`` arguments).
DISTILL: dict[str, tuple[tuple[str, str, str, tuple[str, ...]], ...]] = {
    "full": (
        ("last-stage", "fashion-resnet20", "fashion_mnist", ("--cut", "stage3", "--gates", "256")),
        (
            "last-two-stages",
            "fashion-resnet20",
            "fashion_mnist",
            ("--cut", "stage2", "--to", "stage3", "--gates", "256"),
        ),
    ),
    "tiny": (
        (
            "last-stage",
            "digits-cnn",
            "digits",
            ("--cut", "stage3", "--gates", "16", "--samples-per-class", "10"),
        ),
    ),
}


def planted_arrays(N: int, d: int, c: int, P: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The solver benchmark's planted data (a 64-unit ReLU teacher) as float32 arrays."""
    from benchmarks.solvers.instances import planted_data

    return tuple(a.astype(np.float32) for a in planted_data(N, d, c, P, seed, width=64))


def _make_solver(options: dict[str, Any], reg: Any, rows: int) -> Any:
    """The solver object of a variant (its options besides ``working_set`` and ``screen``)."""
    from cvxdist.solvers import Admm, Fista

    if options["solver"] == "admm":
        extra = {k: options[k] for k in ("linear_solver", "certify_every") if k in options}
        if extra.get("linear_solver") == "eigh":  # the dense kernel, whatever N
            extra["dense_max_rows"] = max(rows, 8000)
        return Admm(reg, **extra)
    return Fista(reg, anderson=options.get("anderson", 0))


def run_solve_case(size: str, variant: str, precision: str) -> dict[str, Any]:
    """Solve the problem of ``size`` with one variant and precision; certify in float32.

    A path variant solves its λ fractions warm-started (strong rule and working sets for
    R-FISTA, one kernel factorization for ADMM) and reports the last λ's certificate; its
    times are the whole path's.
    """
    import jax

    from cvxdist.problems import certify, lam_max, make_problem
    from cvxdist.prox import get_regularizer
    from cvxdist.solvers import solve, solve_path

    options = VARIANTS[variant]
    shape = SIZES[size]
    X, Y, G = planted_arrays(**shape)
    tic = time.perf_counter()
    problem = make_problem(X, Y, G, precision=precision)
    reg = get_regularizer("coupled")
    lam = LAM_FRAC * float(lam_max(problem, reg))
    setup_s = time.perf_counter() - tic
    max_iters = 3000
    solver = _make_solver(options, reg, shape["N"])
    flags = {key: options[key] for key in ("working_set", "screen") if key in options}

    def run() -> tuple[Any, int, float]:
        start = time.perf_counter()
        if "path" in options:
            path = solve_path(
                problem,
                lam_fracs=options["path"],
                reg=reg,
                solver=solver,
                tol=TARGET_GAP,
                max_iters=max_iters,
                progress=False,
            )
            solution = path[-1]
            iterations = sum(int(s.stats.iterations) for s in path)
        else:
            solution = solve(
                problem, lam, reg=reg, solver=solver, tol=TARGET_GAP, max_iters=max_iters, **flags
            )
            iterations = int(solution.stats.iterations)
        jax.block_until_ready(solution.U)
        return solution, iterations, time.perf_counter() - start

    _, _, first_s = run()
    steady, iterations, steady_s = run()
    gap = float(
        certify(problem, reg, jax.numpy.asarray(lam, problem.dtype), steady.U).evaluation.rel_gap
    )
    return {
        "variant": variant,
        "options": dict(options),
        "solver": options["solver"],
        "precision": precision,
        "shape": shape,
        "lam_frac": LAM_FRAC,
        "setup_s": setup_s,
        "first_call_s": first_s,
        "steady_s": steady_s,
        "iterations": iterations,
        "iteration_equivalents": float(steady.stats.iteration_equivalents),
        "working_set": int(steady.stats.working_set),
        "screened": int(steady.stats.screened),
        "converged": bool(steady.converged),
        "message": steady.message,
        "reported_gap": float(steady.stats.rel_gap),
        "float32_gap": gap,
        "active_gates": int(steady.stats.active_gates),
        "masks_stored": problem.masks is not None,
        "chunk_rows": problem.chunk_rows,
    }


def _run_subprocess(argv: list[str], timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    tic = time.perf_counter()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.perf_counter() - tic, "limit_s": timeout_s}
    record: dict[str, Any] = {"wall_s": time.perf_counter() - tic}
    if done.returncode != 0:
        record.update(status="failed", returncode=done.returncode, stderr=done.stderr[-2000:])
    else:
        record["status"] = "ok"
        record["stdout_tail"] = done.stdout[-1000:]
    return record


def _fashion_dir(data_dir: Path | None) -> Path | None:
    from cvxdist.data import FASHION_MNIST_DIR

    for folder in (data_dir, FASHION_MNIST_DIR):
        if folder is not None and any(Path(folder).glob("train-images-idx3-ubyte*")):
            return Path(folder)
    return None


def run(
    out_dir: Path,
    *,
    size: str = "full",
    budget_s: float = 450.0,
    data_dir: Path | None = None,
    cases: Sequence[tuple[str, str]] = CASES,
) -> dict[str, Any]:
    """Every case in its own process under one overall deadline; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + budget_s
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    payload: dict[str, Any] = {
        "benchmark": "gpu_check",
        "size": size,
        "budget_s": budget_s,
        "target_gap": TARGET_GAP,
        "machine": machine_description(),
        "solves": [],
        "distill": [],
    }
    summary_path = out_dir / "gpu_check.json"
    for variant, precision in cases:
        left = deadline - time.perf_counter()
        record: dict[str, Any] = {"variant": variant, "precision": precision}
        if left < 20:
            record["status"] = "not run (budget spent)"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                case_json = Path(tmp) / "case.json"
                argv = [sys.executable, "-m", "benchmarks.gpu_check", "--size", size]
                argv += ["--case", f"{variant}:{precision}", "--case-out", str(case_json)]
                record.update(_run_subprocess(argv, min(left, budget_s / 2), env))
                if case_json.is_file():
                    record.update(json.loads(case_json.read_text()))
        payload["solves"].append(record)
        print(json.dumps(record), flush=True)
        payload["target"] = _target(payload["solves"])
        write_json(summary_path, payload)

    fashion = _fashion_dir(data_dir)
    for name, teacher, dataset, extra in DISTILL[size]:
        left = deadline - time.perf_counter()
        record = {"name": name, "teacher": teacher, "dataset": dataset, "args": list(extra)}
        run_dir = out_dir / f"distill-{name}"
        if dataset == "fashion_mnist" and fashion is None:
            record["status"] = "skipped: Fashion-MNIST not found (give --data-dir)"
        elif left < 30:
            record["status"] = "not run (budget spent)"
        else:
            argv = [sys.executable, "-m", "cvxdist.cli", "distill", "--teacher", teacher]
            argv += ["--dataset", dataset, *extra, "--quiet", "--no-cache", "--out", str(run_dir)]
            if dataset == "fashion_mnist":
                argv += ["--data-dir", str(fashion)]
            record.update(_run_subprocess(argv, left, env))
            result_path = run_dir / "result.json"
            if result_path.is_file():
                result = json.loads(result_path.read_text())
                keys = ("accuracy", "teacher_accuracy", "agreement", "block_params")
                keys += ("teacher_block_params", "compression", "train_images", "time_s")
                record["result"] = {key: result.get(key) for key in keys}
                record["stages"] = [
                    {k: v for k, v in stage.items() if not isinstance(v, (list, dict))}
                    for stage in result.get("stages", [])
                ]
        payload["distill"].append(record)
        print(json.dumps(record)[:2000], flush=True)
        write_json(summary_path, payload)
    payload["wall_s"] = budget_s - (deadline - time.perf_counter())
    write_json(summary_path, payload)
    return payload


def _target(solves: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest certified solve (a single λ, not a path) against :data:`TARGET_S`."""
    done = [
        r
        for r in solves
        if r.get("status") == "ok"
        and "path" not in VARIANTS[r["variant"]]
        and r.get("float32_gap", 1.0) <= TARGET_GAP * 1.01
    ]
    if not done:
        return {"target_s": TARGET_S, "target_met": False, "best": None}
    best = min(done, key=lambda r: r["steady_s"])
    return {
        "target_s": TARGET_S,
        "target_met": best["steady_s"] < TARGET_S,
        "best": f"{best['variant']}:{best['precision']}",
        "best_steady_s": best["steady_s"],
        "best_first_call_s": best["first_call_s"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--budget-s", type=float, default=450.0, help="overall deadline")
    parser.add_argument("--data-dir", type=Path, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # VARIANT:PRECISION, in a child
    parser.add_argument("--case-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        variant, precision = args.case.split(":")
        record = run_solve_case(args.size, variant, precision)
        args.case_out.write_text(json.dumps(record))
        return 0
    if args.out is None:
        parser.error("--out is required")
    run(args.out, size=args.size, budget_s=args.budget_s, data_dir=args.data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
