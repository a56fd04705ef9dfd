"""pyscnn's side: its R-FISTA on the same problem, stopped by an oracle at the first iterate
whose float64 duality gap reaches the target (gap evaluations excluded from its time)."""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import numpy as np

from benchmarks.common import blas_threads, usable_cores
from benchmarks.solvers.instances import (
    MAX_ITERS,
    SCNN_DEFAULT_TOL,
    TARGET_GAP,
    GapEvaluator,
    Instance,
)


class _Stop(Exception):
    """Raised from pyscnn's callback to end its loop."""


def scnn_available() -> tuple[bool, str]:
    try:
        import scnn  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return False, f"pyscnn is not importable ({err}); install it with `make setup-bench`"
    return True, ""


def run_pyscnn(
    inst: Instance,
    lam: float,
    evaluator: GapEvaluator,
    *,
    target: float = TARGET_GAP,
    dtype: str = "float32",
    backend: str = "numpy",
    eval_every: int = 1,
    max_iters: int = MAX_ITERS,
    time_limit_s: float = math.inf,
    seed: int = 778,
) -> dict[str, Any]:
    """pyscnn's R-FISTA on the same problem, stopped at the first iterate with gap ≤ target.

    pyscnn runs with ``tol = 0`` (its own rule never stops it). A callback copies each iterate
    and, every ``eval_every`` iterations, evaluates the float64 gap; once it is ≤ ``target`` the
    iterates since the previous evaluation are checked in order to find the first one. The
    callback's time is excluded from the timings, as is the recording of pyscnn's own criterion
    (the squared norm of the min-norm subgradient) each iteration.

    Returns timings and iterations at the target, the weights there (``U``, our layout),
    pyscnn's criterion there (the tolerance it would have needed), and where its default
    tolerance would have stopped it.
    """
    import lab
    from scnn.metrics import Metrics
    from scnn.models import ConvexGatedReLU
    from scnn.private.interface import (
        build_internal_model,
        build_metrics_tuple,
        build_optimizer,
        get_logger,
        process_data,
        set_device,
    )
    from scnn.regularizers import NeuronGL1
    from scnn.solvers import RFISTA

    c = inst.Y.shape[1]
    lam_scnn = lam / c
    set_device("cpu", dtype, seed)
    if backend == "torch":
        lab.set_backend("torch")
        lab.set_device("cpu")
        lab.set_dtype(dtype)
    elif backend != "numpy":
        raise ValueError(f"unknown pyscnn backend {backend!r}")

    start_setup = time.perf_counter()
    (X_t, y_t), _, _ = process_data(inst.X, inst.Y, None, None, unitize_data=False)
    model = ConvexGatedReLU(inst.G, c=c)
    regularizer = NeuronGL1(lam_scnn)
    internal = build_internal_model(model, regularizer, X_t)
    setup_s = time.perf_counter() - start_setup
    D = lab.to_np(internal.D)
    if D.shape != inst.masks.shape or not np.array_equal(D > 0, inst.masks):
        raise RuntimeError("pyscnn computed different activation patterns than the benchmark")
    if not np.allclose(lab.to_np(internal.U), inst.G, rtol=0, atol=1e-6):
        raise RuntimeError("pyscnn reordered or dropped gates")

    metrics = Metrics(objective=False, grad_norm=False, time=False)  # no extra metric work
    procedure = build_optimizer(RFISTA(model, max_iters=max_iters, tol=0.0), regularizer, metrics)
    logger = get_logger("scnn", False, False, None)
    logger.setLevel("ERROR")

    def ours(W: np.ndarray) -> np.ndarray:  # (c, P, d) -> (P, d, c)
        return np.transpose(W, (1, 2, 0))

    def gap_of(W: np.ndarray) -> float:
        return evaluator(ours(W), lam)["rel_gap"]

    iterate = {"k": 0}
    overhead = {"s": 0.0}
    times: dict[int, float] = {0: 0.0}
    gaps: dict[int, float] = {}
    criterion: dict[int, float] = {}
    ring: deque[tuple[int, np.ndarray]] = deque(maxlen=max(1, eval_every))
    zero = np.zeros((c, *inst.G.shape[::-1]))
    found: dict[str, int | None] = {"target": None, "default_tol": None}

    def snapshot(m: Any) -> np.ndarray:
        return np.array(lab.to_np(m.weights), copy=True)

    def callback(m: Any, X: Any, y: Any) -> Any:
        entered = time.perf_counter()
        k = iterate["k"] = iterate["k"] + 1
        times[k] = entered - start - overhead["s"]
        ring.append((k, snapshot(m)))
        if k % eval_every == 0:
            gaps[k] = gap_of(ring[-1][1])
            if gaps[k] <= target:
                for kk, W in ring:
                    if kk not in gaps:
                        gaps[kk] = gap_of(W)
                    if gaps[kk] <= target:
                        found["target"] = kk
                        break
                raise _Stop
        if times[k] > time_limit_s:
            raise _Stop
        overhead["s"] += time.perf_counter() - entered
        return m

    original = procedure.term_criterion

    def criterion_hook(m: Any, X: Any, y: Any, objective: Any = None, grad: Any = None) -> bool:
        done = original(m, X, y, objective, grad)
        entered = time.perf_counter()
        k = iterate["k"]
        criterion[k] = float(lab.sum(grad**2)) if grad is not None else math.nan
        if found["default_tol"] is None and criterion[k] <= SCNN_DEFAULT_TOL:
            found["default_tol"] = k
            if k not in gaps:
                gaps[k] = gap_of(ring[-1][1] if ring else zero)
        overhead["s"] += time.perf_counter() - entered
        return done

    procedure.term_criterion = criterion_hook
    start = time.perf_counter()
    try:
        procedure(
            logger,
            internal,
            lambda m: m,
            (X_t, y_t),
            (X_t, y_t),
            build_metrics_tuple(metrics),
            callback=callback,
        )
    except _Stop:
        pass
    k_star = found["target"]
    result: dict[str, Any] = {
        "backend": backend,
        "dtype": dtype,
        "lam_scnn": lam_scnn,
        "setup_s": setup_s,
        "reached_target": k_star is not None,
        "iterations_run": iterate["k"],
        "time_run_s": times[iterate["k"]],
        "gap_trace": [[k, times[k], gaps[k]] for k in sorted(gaps)],
    }
    if k_star is not None:
        W_star = next(W for kk, W in ring if kk == k_star)
        evaluation = evaluator(ours(W_star), lam)
        W_t = lab.tensor(W_star, dtype=lab.get_dtype())
        scnn_objective = float(internal.objective(X_t, y_t, w=W_t))
        scnn_criterion = float(lab.sum(internal.grad(X_t, y_t, w=W_t) ** 2))
        result.update(
            {
                "iterations": k_star,
                "time_s": times[k_star],
                "time_per_iteration_s": times[k_star] / k_star,
                "rel_gap": evaluation["rel_gap"],
                "objective": evaluation["objective"],
                "objective_scnn_convention": scnn_objective,
                # F_ours = c F_scnn: a check of the λ/scaling conversion on every run.
                "scaling_check_rel_err": abs(c * scnn_objective - evaluation["objective"])
                / evaluation["objective"],
                "criterion_at_target": scnn_criterion,
                "active_groups": int(np.count_nonzero(np.linalg.norm(W_star, axis=-1))),
                "U": ours(W_star),  # (P, d, c); dropped from the JSON
            }
        )
    k_default = found["default_tol"]
    result["default_tol_stop"] = {
        "tol": SCNN_DEFAULT_TOL,
        "iteration": k_default,
        "time_s": times.get(k_default) if k_default is not None else None,
        "rel_gap": gaps.get(k_default) if k_default is not None else None,
    }
    return result


def scnn_threads() -> dict[str, Any]:
    """Make torch and OpenBLAS use all usable cores (as XLA does) and report the counts."""
    import torch

    cores = usable_cores()
    torch.set_num_threads(cores)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(cores)
    except ImportError:
        pass
    return {
        "xla_cpu_threads": cores,
        "torch_num_threads": torch.get_num_threads(),
        "blas": blas_threads(),
    }
