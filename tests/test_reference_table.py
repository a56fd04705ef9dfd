"""Every solver path against an independent reference, in one table.

Each row of :data:`PATHS` is one way to solve a problem (a solver, an option, an entry point);
each case solves a problem of the shared bank (``tests/problem_bank.py``) at ``λ = 0.1 λ_max``
and recomputes the objective of the returned weights in float64 numpy. It must match the
CVXPY optimum within 1e-6 (relative) in float64 and within 1e-3 in float32 and bf16 (whose
certificates are recomputed with full-precision GEMMs), and the objective the solve reports
must be the same number.

Adding a path: append a :class:`SolvePath`. Adding a problem kind (a composed data term):
add it to ``COMPOSED_BANK`` in the bank and name its ``kind`` in the ``kinds`` of the paths
that support it (see :data:`COMPOSED_KINDS`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problem_bank import BANK, BANK_BY_NAME, COMPOSED_BANK, CVXPY_REGS, bank_lam, cvxpy_reference

from cvxdist.cli import main
from cvxdist.solvers import choose_solver, make_solver, solve, solve_batch, solve_path
from cvxdist.solvers.phases import solve_phased

ALL_SPECS = tuple(spec.name for spec in BANK)
RTOL = {"float64": 1e-6, "float32": 1e-3, "bf16": 1e-3}
SOLVE_TOL = {"float64": 1e-9, "float32": 1e-4, "bf16": 1e-4}
PATH_FRACS = (0.5, 0.1, 0.02)  # solve_batch / solve_path lanes, as fractions of λ_max
#: A fine λ grid, as the sequential strong rule wants (2λ - λ_prev > 0 from the second λ on).
STRONG_FRACS = (0.5, 0.45, 0.4)
#: Working-set buckets for the bank's 6-12 gates (``solve`` starts at 64 gates, i.e. all).
SMALL_BUCKET = 2
SCREEN_REGS = ("coupled", "nuclear")  # screening with the others: test_screening (CVXPY too)

#: Kinds of composed data terms (DESIGN §2a) that the paths below already support. When the
#: solver core gains one, add its kind here (or to single rows) and its problems to the bank.
COMPOSED_KINDS: tuple[str, ...] = tuple(sorted({spec.kind for spec in COMPOSED_BANK}))


class Result(NamedTuple):
    """What one solve returned, as host arrays."""

    lam: float
    U: np.ndarray
    V: np.ndarray | None
    b: np.ndarray | None
    objective: float  # as reported
    rel_gap: float  # as reported
    converged: bool


def _result(solution: Any, lam: float, lane: int | None = None) -> Result:
    def pick(x: Any) -> Any:
        if x is None:
            return None
        x = np.asarray(x, np.float64)
        return x if lane is None else x[lane]

    w, s = solution.weights, solution.stats
    converged = np.asarray(solution.converged)
    return Result(
        lam,
        pick(w.U),
        pick(w.V),
        pick(w.b),
        float(pick(s.objective)),
        float(pick(s.rel_gap)),
        bool(converged if lane is None else converged[lane]),
    )


def _problem_options(dtype: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if dtype == "bf16":
        return "float32", {"precision": "bf16", **options}
    return dtype, options


def single(solver: str, make: dict[str, Any] | None = None, **solve_options: Any) -> Callable:
    """A path that builds the problem with ``make`` options and calls :func:`solve` once."""

    def run(spec, reg, lam, dtype, context):
        del context
        real, options = _problem_options(dtype, make or {})
        problem = spec.problem(real, **options)
        solution = solve(
            problem,
            lam,
            reg=reg,
            solver=solver,
            tol=SOLVE_TOL[dtype],
            max_iters=100_000,
            **solve_options,
        )
        return [_result(solution, lam)]

    return run


def batched(solver: str) -> Callable:
    """:func:`solve_batch` over a λ grid: every lane checked against its own CVXPY optimum."""

    def run(spec, reg, lam, dtype, context):
        del lam, context
        lams = [bank_lam(spec.name, reg, frac) for frac in PATH_FRACS]
        problem = spec.problem(dtype)
        batch = solve_batch(
            problem, lams, reg=reg, solver=solver, tol=SOLVE_TOL[dtype], max_iters=100_000
        )
        return [_result(batch, value, lane) for lane, value in enumerate(lams)]

    return run


def path(solver: str, **path_options: Any) -> Callable:
    """:func:`solve_path` (warm starts, largest λ first; R-FISTA's λ after the first start from
    the strong set, ADMM factors its kernel once with ``linear_solver="eigh"``): every λ
    checked."""

    def run(spec, reg, lam, dtype, context):
        del lam, context
        problem = spec.problem(dtype)
        solutions = solve_path(
            problem,
            lam_fracs=list(PATH_FRACS),
            reg=reg,
            solver=solver,
            tol=SOLVE_TOL[dtype],
            max_iters=100_000,
            progress=False,
            **path_options,
        )
        lams = [bank_lam(spec.name, reg, frac) for frac in sorted(PATH_FRACS, reverse=True)]
        return [_result(s, value) for s, value in zip(solutions, lams, strict=True)]

    return run


def phased(**phase_options: Any) -> Callable:
    """R-FISTA through :func:`cvxdist.solvers.phases.solve_phased` with working-set buckets of
    :data:`SMALL_BUCKET` gates, so that the bank's few gates really split into working sets."""

    def run(spec, reg, lam, dtype, context):
        del context
        problem = spec.problem(dtype)
        solver = make_solver("fista", reg, problem)
        solution = solve_phased(
            solver,
            problem,
            jnp.asarray(lam, problem.dtype),
            problem.zeros(),
            SOLVE_TOL[dtype],
            100_000,
            working_set=True,
            min_bucket=SMALL_BUCKET,
            **phase_options,
        )
        return [_result(solution, lam)]

    return run


def strong_path() -> Callable:
    """The strong-rule path of :func:`solve_path` (each λ on working sets seeded by the
    sequential strong set at the previous solution) on :data:`STRONG_FRACS`, with buckets of
    :data:`SMALL_BUCKET` gates: every λ checked."""

    def run(spec, reg, lam, dtype, context):
        del lam, context
        problem = spec.problem(dtype)
        solver = make_solver("fista", reg, problem)
        U, previous, results = problem.zeros(), bank_lam(spec.name, reg, 1.0), []
        for frac in sorted(STRONG_FRACS, reverse=True):
            value = bank_lam(spec.name, reg, frac)
            solution = solve_phased(
                solver,
                problem,
                jnp.asarray(value, problem.dtype),
                U,
                SOLVE_TOL[dtype],
                100_000,
                screen_gates=False,
                working_set=True,
                strong_from=previous,
                min_bucket=SMALL_BUCKET,
            )
            results.append(_result(solution, value))
            U, previous = solution.weights.U, value
        return results

    return run


def cli(solver: str) -> Callable:
    """``cvxdist solve`` on the bank arrays written to an .npz; reads SOL.npz back."""

    def run(spec, reg, lam, dtype, tmp_path):
        X, Y, G = spec.arrays()
        problem_file, out = tmp_path / "problem.npz", tmp_path / "sol.npz"
        np.savez(problem_file, X=X, Y=Y, G=G)
        args = ["solve", str(problem_file), "--lam", repr(lam), "--reg", reg]
        args += ["--solver", solver, "--dtype", dtype, "--tol", repr(SOLVE_TOL[dtype])]
        args += ["--max-iters", "100000", "--out", str(out)]
        args += ["--skip"] * spec.skip + ["--bias"] * spec.bias
        args += [] if spec.chunk_rows is None else ["--chunk-rows", str(spec.chunk_rows)]
        stdout = _captured_stdout(lambda: main(args))
        record = json.loads(stdout.strip().splitlines()[-1])
        assert record["solver"] == (
            choose_solver(spec.problem(dtype)) if solver == "auto" else solver
        )
        with np.load(out) as sol:
            weights = {k: np.asarray(sol[k], np.float64) for k in sol.files}
        return [
            Result(
                lam,
                weights["U"],
                weights.get("V"),
                weights.get("b"),
                record["objective"],
                record["certificate"],
                record["converged"],
            )
        ]

    return run


def _captured_stdout(fn: Callable[[], int]) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert fn() == 0
    return buffer.getvalue()


def sharded(name: str) -> Callable:
    """Read the result of the sharded case ``name`` (all run in one 4-device subprocess)."""

    def run(spec, reg, lam, dtype, results):
        del dtype
        return [Result(lam, *results[(name, spec.name, reg)])]

    return run


@dataclass(frozen=True)
class SolvePath:
    """One row of the table: a path, the problems and regularizers it runs on."""

    name: str
    run: Callable[..., list[Result]]
    specs: Sequence[str] = ALL_SPECS
    regs: Sequence[str] = ("coupled",)
    dtype: str = "float64"
    context: str | None = None  # a fixture the path needs (tmp_path, the sharded results)
    kinds: Sequence[str] = ("activations",)
    #: The row's composed problems (bank names; ``None``: every one of a kind in ``kinds``)
    #: and their regularizers (``None``: :attr:`regs`). Rows beyond ``fista`` and ``auto`` run
    #: a composed problem with one regularizer, the slower ones on one composed problem only.
    composed_specs: Sequence[str] | None = None
    composed_regs: Sequence[str] | None = None

    def regs_for(self, spec: Any) -> Sequence[str]:
        if spec.kind == "activations" or self.composed_regs is None:
            return self.regs
        return self.composed_regs


SHARDED_CASES = {  # name -> (solve options, make_problem options); run with devices=4
    "fista": ({"solver": "fista"}, {}),
    "admm": ({"solver": "admm"}, {}),
    "fista-screen": ({"solver": "fista", "screen": True}, {}),
    "fista-streamed": ({"solver": "fista"}, {"stream": True, "chunk_rows": 16}),
    "admm-streamed": ({"solver": "admm"}, {"stream": True, "chunk_rows": 16}),
}

PATHS = (
    # The solvers on every bank problem and regularizer.
    SolvePath("fista", single("fista"), regs=CVXPY_REGS, kinds=("activations", *COMPOSED_KINDS)),
    # ADMM refuses composed data terms (its kernel is that of plain gated rows).
    SolvePath("admm", single("admm"), regs=CVXPY_REGS),
    SolvePath("auto", single("auto"), kinds=("activations", *COMPOSED_KINDS)),
    # Gap-safe screening (phased solves).
    SolvePath(
        "fista-screen",
        single("fista", screen=True),
        ("tall", "skip_bias"),
        SCREEN_REGS,
        kinds=("activations", *COMPOSED_KINDS),
        composed_specs=("composed_per_group",),
        composed_regs=("coupled",),
    ),
    SolvePath("admm-screen", single("admm", screen=True), ("tall", "skip_bias"), SCREEN_REGS),
    # ADMM's linear solves (cholesky is the default: the "admm" row).
    SolvePath("admm-eigh", single("admm", linear_solver="eigh"), ("skip_bias", "wide")),
    SolvePath("admm-cg", single("admm", linear_solver="cg"), ("skip_bias", "wide")),
    SolvePath(
        "admm-cg-matrix-free",
        single("admm", linear_solver="cg", dense_max_rows=0),
        ("skip_bias", "chunked_recomputed"),
    ),
    # Row chunking: uneven chunks (padding), stored and recomputed masks.
    SolvePath("fista-chunk7", single("fista", {"chunk_rows": 7}), ("tall", "skip_bias")),
    SolvePath(
        "fista-chunk7-recomputed",
        single("fista", {"chunk_rows": 7, "store_masks": False}),
        ("skip_bias",),
    ),
    SolvePath("admm-chunk7", single("admm", {"chunk_rows": 7}), ("skip_bias",)),
    # Rows kept on the host and streamed chunk by chunk.
    SolvePath(
        "fista-streamed", single("fista", {"stream": True, "chunk_rows": 16}), ("skip_bias",)
    ),
    SolvePath("admm-streamed", single("admm", {"stream": True, "chunk_rows": 16}), ("skip_bias",)),
    # Batches and paths: every lane / λ against its own optimum.
    SolvePath("fista-batch", batched("fista"), ("tall", "skip_bias")),
    SolvePath("admm-batch", batched("admm"), ("tall",)),
    SolvePath(
        "fista-path",
        path("fista"),
        ("skip_bias",),
        ("coupled", "nuclear"),
        kinds=("activations", *COMPOSED_KINDS),
        composed_specs=("composed_weighted_sum",),
        composed_regs=("nuclear",),
    ),
    SolvePath("admm-path", path("admm"), ("skip_bias",)),
    # Working sets (the gap on all gates ends the solve): through solve (the bank's few gates
    # fit one 64-gate bucket), and in buckets of 2 gates (the first set holds 2 gates, grown
    # until it holds the support), with screening.
    SolvePath(
        "fista-working-set",
        single("fista", working_set=True),
        ("tall",),
        kinds=("activations", *COMPOSED_KINDS),
    ),
    SolvePath(
        "fista-working-set-narrow",
        phased(screen_gates=True),
        ("single_output",),
        ("coupled", "one_vs_all"),
        kinds=("activations", *COMPOSED_KINDS),
        composed_specs=("composed_pooled_head",),
        composed_regs=("one_vs_all",),
    ),
    # Strong-rule paths: the first working set of each λ is the sequential strong set.
    SolvePath(
        "fista-strong-path",
        strong_path(),
        ("single_output",),
        kinds=("activations", *COMPOSED_KINDS),
    ),
    # Anderson extrapolation (safeguarded by the objective), with and without momentum.
    SolvePath(
        "fista-anderson",
        single("fista", anderson=5),
        ("skip_bias",),
        ("coupled", "nuclear"),
        kinds=("activations", *COMPOSED_KINDS),
        composed_regs=("nuclear",),
    ),
    SolvePath("pgd-anderson", single("fista", anderson=3, momentum=False), ("tall",)),
    # ADMM paths on one eigendecomposition of the kernel, with a fixed and an adaptive ρ; the
    # certificate every third iteration.
    SolvePath("admm-eigh-path", path("admm", linear_solver="eigh"), ("skip_bias",)),
    SolvePath(
        "admm-eigh-path-balance",
        path("admm", linear_solver="eigh", adapt="balance", adapt_period=2),
        ("tall",),
    ),
    SolvePath("admm-certify-every-3", single("admm", certify_every=3), ("skip_bias",)),
    # float32 and bf16 GEMMs (certified in float32).
    SolvePath(
        "fista-f32",
        single("fista"),
        ("tall", "skip_bias"),
        dtype="float32",
        kinds=("activations", *COMPOSED_KINDS),
        composed_specs=("composed_per_group", "composed_pooled_head"),
    ),
    SolvePath("admm-f32", single("admm"), ("skip_bias",), ("coupled", "nuclear"), "float32"),
    SolvePath("auto-f32", single("auto"), ("tall",), dtype="float32"),
    SolvePath("fista-bf16", single("fista"), ("tall", "skip_bias"), dtype="bf16"),
    SolvePath("admm-bf16", single("admm"), ("skip_bias",), ("coupled", "nuclear"), "bf16"),
    # Rows sharded over 4 forced host devices (one subprocess runs them all).
    *(
        SolvePath(
            f"sharded-{name}",
            sharded(name),
            ("skip_bias", "chunked_recomputed"),
            context="sharded_results",
        )
        for name in SHARDED_CASES
    ),
    # The command line, --solver auto included.
    SolvePath("cli-auto", cli("auto"), ("tall", "skip_bias"), context="tmp_path"),
    SolvePath("cli-fista-f32", cli("fista"), ("tall",), dtype="float32", context="tmp_path"),
)


#: Cases that fail on a known defect of the solver core, by case id (strict: once the core is
#: fixed they fail as XPASS until their entry is removed).
KNOWN_FAILURES: dict[str, str] = {}


def _composed(row: SolvePath) -> tuple:
    return tuple(
        spec
        for spec in COMPOSED_BANK
        if spec.kind in row.kinds
        and (row.composed_specs is None or spec.name in row.composed_specs)
    )


def _cases() -> list:
    cases = []
    for row in PATHS:
        for name in row.specs:
            for spec in (BANK_BY_NAME[name], *_composed(row)):
                if spec.kind not in row.kinds:
                    continue
                for reg in row.regs_for(spec):
                    case_id = f"{row.name}-{spec.name}-{reg}"
                    marks = ()
                    if case_id in KNOWN_FAILURES:
                        reason = KNOWN_FAILURES[case_id]
                        marks = pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)
                    cases.append(pytest.param(row, spec, reg, id=case_id, marks=marks))
    return list({c.id: c for c in cases}.values())


@pytest.mark.parametrize(("row", "spec", "reg"), _cases())
def test_path_matches_the_reference(request, row, spec, reg):
    context = request.getfixturevalue(row.context) if row.context else None
    lam = bank_lam(spec.name, reg)
    with jax.enable_x64(row.dtype == "float64"):  # float32 rows run as users run them
        results = row.run(spec, reg, lam, row.dtype, context)
    for result in results:
        assert result.converged, (row.name, result)
        assert result.rel_gap <= SOLVE_TOL[row.dtype] * (1 + 1e-6), result.rel_gap
        reference, _ = cvxpy_reference(spec.name, reg, result.lam)
        ours = spec.objective(reg, result.lam, result.U, result.V, result.b)
        assert abs(ours - reference) <= RTOL[row.dtype] * abs(reference), (ours, reference)
        # The reported objective is this number (1/(2N) convention), up to the precision.
        reported_rtol = 1e-9 if row.dtype == "float64" else 1e-5
        assert abs(result.objective - ours) <= reported_rtol * abs(ours), (result.objective, ours)


def test_the_table_covers_every_path():
    names = {row.name for row in PATHS}
    assert {"fista", "admm", "auto", "cli-auto"} <= names
    for suffix in ("screen", "batch", "path", "streamed", "chunk7", "f32", "bf16"):
        assert {f"fista-{suffix}", f"admm-{suffix}"} <= names, suffix
    assert {"admm-eigh", "admm-cg", "admm-cg-matrix-free"} <= names
    assert {"fista-working-set", "fista-working-set-narrow", "fista-strong-path"} <= names
    assert {"fista-anderson", "admm-eigh-path", "admm-eigh-path-balance"} <= names
    assert {f"sharded-{name}" for name in SHARDED_CASES} <= names
    assert len(_cases()) >= 80
    # Every composed kind on the solvers that take it, never on ADMM (which refuses them).
    assert {"per_group", "weighted_sum", "pooled_head"} <= set(COMPOSED_KINDS)
    for kind in COMPOSED_KINDS:
        rows = {row.name for row in PATHS if any(s.kind == kind for s in _composed(row))}
        assert {"fista", "auto"} <= rows and not any("admm" in r for r in rows), (kind, rows)
    assert set(KNOWN_FAILURES) <= {c.id for c in _cases()}


# ----------------------------------------------------------------------------- sharding

SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from problem_bank import BANK_BY_NAME
    from cvxdist.solvers import solve

    assert len(jax.devices()) == 4, jax.devices()
    out = {}
    for case in json.loads(sys.argv[2]):
        spec = BANK_BY_NAME[case["spec"]]
        problem = spec.problem("float64", devices=4, **case["make"])
        assert len(problem.X.sharding.device_set) == 4
        s = solve(problem, case["lam"], reg=case["reg"], tol=1e-9, max_iters=100000,
                  **case["solve"])
        w = s.weights
        out[case["id"]] = [
            np.asarray(w.U).tolist(),
            None if w.V is None else np.asarray(w.V).tolist(),
            None if w.b is None else np.asarray(w.b).tolist(),
            float(s.stats.objective), float(s.stats.rel_gap), bool(s.converged),
        ]
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sharded_results():
    """Every sharded case of the table, solved in one subprocess with 4 host devices."""
    cases = []
    for row in PATHS:
        if row.context != "sharded_results":
            continue
        options, make = SHARDED_CASES[row.name.removeprefix("sharded-")]
        for spec_name in row.specs:
            for reg in row.regs:
                case_id = f"{row.name.removeprefix('sharded-')}|{spec_name}|{reg}"
                lam = bank_lam(spec_name, reg)
                cases.append(
                    {"id": case_id, "spec": spec_name, "reg": reg, "lam": lam}
                    | {"solve": options, "make": make}
                )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, here, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    raw = json.loads(line.removeprefix("RESULT "))
    results = {}
    for key, (U, V, b, objective, gap, converged) in raw.items():
        name, spec_name, reg = key.split("|")
        arrays = [None if a is None else np.asarray(a, np.float64) for a in (U, V, b)]
        results[(name, spec_name, reg)] = (*arrays, objective, gap, converged)
    return results
