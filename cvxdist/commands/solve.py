"""`cvxdist solve PROBLEM.npz`: solve one gated-ReLU problem stored as arrays X, Y, G."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

REGULARIZERS = ("coupled", "one_vs_all", "nuclear", "group_elastic")
SOLVERS = ("fista", "admm", "auto")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "solve",
        help="solve a gated-ReLU problem (X, Y, G in an .npz) to a certified optimum",
        description=(
            "Solve min_U 1/(2N)||sum_i 1[X g_i >= 0] * (X U_i) - Y||^2 + lam R(U) for the "
            "arrays X (N,d), Y (N,c), G (d,P) of PROBLEM.npz; write U (P,d,c) to --out and "
            "print one JSON object of results on stdout."
        ),
    )
    parser.add_argument("problem", type=Path, help="an .npz file with arrays X, Y, G")
    lam = parser.add_mutually_exclusive_group(required=True)
    lam.add_argument("--lam", type=float, help="regularization strength (>= 0)")
    lam.add_argument("--lam-frac", type=float, help="lam as a fraction of lam_max (>= 0)")
    parser.add_argument("--reg", choices=REGULARIZERS, default="coupled")
    parser.add_argument("--solver", choices=SOLVERS, default="fista")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative duality gap to reach")
    parser.add_argument("--max-iters", type=int, default=10_000)
    parser.add_argument("--skip", action="store_true", help="add an unregularized linear skip")
    parser.add_argument("--bias", action="store_true", help="add an unregularized bias")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="keep X in host memory and copy one chunk of rows at a time to the device",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=0,
        help="shard rows over the first K visible devices (default 0: all of them)",
    )
    parser.add_argument(
        "--precision",
        choices=("default", "highest", "bf16"),
        default="default",
        help="GEMM precision; bf16 = bfloat16 operands with float32 accumulation (the gap "
        "is always certified with full-precision GEMMs)",
    )
    parser.add_argument(
        "--screen",
        action="store_true",
        help="remove gates proven zero by gap-safe screening during the solve",
    )
    parser.add_argument(
        "--working-set",
        action="store_true",
        help="solve in phases on working sets of gates ranked by their KKT violation, grown "
        "until the duality gap on all gates reaches --tol",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--no-polish",
        dest="polish",
        action="store_false",
        help="with a float32 --tol below 1.5e-5 (what float32 can certify), stop at that floor "
        "instead of finishing the solve in float64",
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write SOL.npz")
    cluster = parser.add_argument_group(
        "multi-process (jax.distributed)",
        "run the same command in every process; rows are sharded over the devices of all "
        "processes, each process holding its own (its block of PROBLEM.npz's rows, or its own "
        "file when the path contains {process}); process 0 writes --out and prints the JSON",
    )
    cluster.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0 (it listens there), or 'auto' under SLURM / Open MPI / TPU",
    )
    cluster.add_argument("--num-processes", type=int, help="number of processes")
    cluster.add_argument("--process-id", type=int, help="this process's id, 0..N-1")
    parser.set_defaults(func=run)


def load_problem_arrays(path: Path) -> dict:
    """X, Y, G from an .npz, with one-line errors for everything that can be wrong."""
    import numpy as np

    from cvxdist.errors import UserError

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not an .npz archive (corrupt or another format)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("X", "Y", "G") if key not in data.files]
            if missing:
                raise UserError(
                    f"{path}: missing array(s) {', '.join(missing)}; need X (N,d), Y (N,c), G (d,P)"
                )
            return {key: data[key] for key in ("X", "Y", "G")}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise UserError(f"{path}: not a readable .npz file ({err})") from None


def _write_atomic(path: Path, arrays: dict) -> None:
    import numpy as np

    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=".cvxdist-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    from cvxdist.commands import check_output_file
    from cvxdist.errors import UserError

    for name in ("lam", "lam_frac", "tol"):
        value = getattr(args, name)
        if value is not None and (value != value or value < 0 or value == float("inf")):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.tol <= 0:
        raise UserError(f"--tol must be positive, got {args.tol}")
    if args.max_iters < 1:
        raise UserError(f"--max-iters must be at least 1, got {args.max_iters}")
    if args.chunk_rows is not None and args.chunk_rows < 1:
        raise UserError(f"--chunk-rows must be at least 1, got {args.chunk_rows}")
    if args.devices < 0:
        raise UserError(f"--devices must be 0 (all) or a positive count, got {args.devices}")
    import jax

    if args.coordinator is not None:
        _join_cluster(args)
    elif args.num_processes is not None or args.process_id is not None:
        raise UserError("--num-processes and --process-id need --coordinator")
    if jax.process_index() == 0:
        check_output_file(args.out, "SOL.npz")
    arrays = load_problem_arrays(
        Path(str(args.problem).replace("{process}", str(jax.process_index())))
    )
    if jax.process_count() > 1 and "{process}" not in str(args.problem):
        from cvxdist.multihost import process_rows

        rows = process_rows(len(arrays["X"]))
        arrays = {"X": arrays["X"][rows], "Y": arrays["Y"][rows], "G": arrays["G"]}

    # Scoped, not global: `main()` also runs inside other programs and tests.
    with jax.enable_x64(args.dtype == "float64"):
        return _solve_and_write(args, arrays)


def _join_cluster(args: argparse.Namespace) -> None:
    """``jax.distributed`` from the command line (:mod:`cvxdist.multihost`)."""
    from cvxdist.errors import UserError
    from cvxdist.multihost import initialize, native_stdout_to_stderr

    if args.devices or args.stream:
        raise UserError(
            "--coordinator shards rows over every device of every process; it cannot be "
            "combined with --devices or --stream"
        )
    explicit = args.coordinator != "auto"
    if explicit and (args.num_processes is None or args.process_id is None):
        raise UserError("--coordinator HOST:PORT needs --num-processes and --process-id")
    if explicit and not 0 <= args.process_id < args.num_processes:
        raise UserError(
            f"--process-id must be in 0..{args.num_processes - 1}, got {args.process_id}"
        )
    native_stdout_to_stderr()  # stdout stays one JSON record
    initialize(args.coordinator, args.num_processes, args.process_id)


def _solve_and_write(args: argparse.Namespace, arrays: dict) -> int:
    import jax
    import numpy as np

    from cvxdist.errors import UserError
    from cvxdist.problems import make_problem
    from cvxdist.sharding import devices_of
    from cvxdist.solvers import choose_solver, solve

    visible = len(jax.devices())
    if args.devices > visible:
        raise UserError(f"--devices {args.devices}: only {visible} device(s) visible")
    num_devices = args.devices or visible
    options = dict(
        skip=args.skip,
        bias=args.bias,
        chunk_rows=args.chunk_rows,
        dtype=args.dtype,
        precision=args.precision,
    )
    try:
        if jax.process_count() > 1:
            from cvxdist.multihost import make_distributed_problem

            problem = make_distributed_problem(arrays["X"], arrays["Y"], arrays["G"], **options)
        else:
            problem = make_problem(
                arrays["X"],
                arrays["Y"],
                arrays["G"],
                stream=args.stream,
                devices=num_devices if num_devices > 1 else None,
                **options,
            )
    except ValueError as err:
        raise UserError(f"{args.problem}: {err}") from None
    solver = choose_solver(problem) if args.solver == "auto" else args.solver
    try:
        solution = solve(
            problem,
            args.lam,
            lam_frac=args.lam_frac,
            reg=args.reg,
            solver=solver,
            tol=args.tol,
            max_iters=args.max_iters,
            screen=args.screen,
            working_set=args.working_set,
            polish=args.polish,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    from cvxdist.problems import lam_max
    from cvxdist.prox import get_regularizer

    stats = solution.stats
    record = {
        "objective": float(stats.objective),
        "iterations": int(stats.iterations),
        "converged": bool(solution.converged),
        "certificate": float(stats.rel_gap),
        "certificate_kind": "relative duality gap",
        "certificate_dtype": str(stats.rel_gap.dtype),
        "time_s": float(stats.time_s),
        "lam": float(stats.lam),
        "lam_max": float(lam_max(problem, get_regularizer(args.reg))),
        "dual_objective": float(stats.dual_objective),
        "subgrad_norm_sq": float(stats.subgrad_norm_sq),
        "active_gates": int(stats.active_gates),
        "screened": int(stats.screened),
        "working_set": int(stats.working_set),
        "iteration_equivalents": float(stats.iteration_equivalents),
        "message": solution.message,
        "reg": args.reg,
        "solver": solver,
        "tol": args.tol,
        "shape": {
            "N": problem.num_rows,
            "d": problem.num_features,
            "c": problem.num_outputs,
            "P": problem.num_gates,
        },
        "dtype": args.dtype,
        "precision": args.precision,
        "stream": args.stream,
        "chunk_rows": problem.chunk_rows,
        "devices": [str(device) for device in devices_of(problem)],
        "processes": jax.process_count(),
    }
    if jax.process_index() != 0:  # every process holds the same solution; one writes it
        return 0
    out = {"U": np.asarray(solution.weights.U)}
    if solution.weights.V is not None:
        out["V"] = np.asarray(solution.weights.V)
    if solution.weights.b is not None:
        out["b"] = np.asarray(solution.weights.b)
    _write_atomic(args.out, out)
    json.dump(record, sys.stdout)
    sys.stdout.write("\n")
    if not solution.converged:
        print(f"cvxdist solve: warning: {solution.message}", file=sys.stderr)
    return 0
