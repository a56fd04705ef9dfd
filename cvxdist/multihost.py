r"""Rows held by several processes: one solve over ``jax.distributed``.

Every process runs the same program (multi-controller JAX). Each joins the cluster with
:func:`initialize`, passes *its own* rows to :func:`make_distributed_problem`, and calls the
ordinary :func:`cvxdist.solvers.solve`; the solve is the single-device one, partitioned by XLA
(:mod:`cvxdist.sharding`), and its row reductions become all-reduces across processes. No
process ever holds another's rows; ``G``, ``U`` and the statistics are replicated, so every
process gets the same solution.

Layout. The mesh is :func:`cvxdist.sharding.row_mesh` over the devices of all processes
(``jax.devices()``, ordered by process). A process with ``L`` local devices holds, for each of
the ``K`` row chunks, ``L`` consecutive device shards of ``m`` rows; its local rows fill
those ``K · L · m`` slots in order and the rest are padding (``valid = 0``). Which process
holds which row does not matter: the problem is a sum over rows. ``K`` and ``m`` come from
the largest local row count (gathered from all processes), so processes may hold different
numbers of rows, but each must hold at least one and all must have the same number of local
devices and the same ``G`` (checked).

CPU clusters: the collectives between processes are gloo's, over TCP
(``jax_cpu_collectives_implementation = "gloo"``, set by :func:`initialize`). Devices per
process: ``JAX_NUM_CPU_DEVICES`` (the ``jax_num_cpu_devices`` option).

Launch, one process per host (or several per host, each with its own devices)::

    cvxdist solve PROBLEM.npz --lam-frac 0.1 --out SOL.npz \
        --coordinator HOST0:PORT --num-processes N --process-id I

with ``I = 0..N-1`` and ``HOST0`` the host of process 0, reachable from all; or
``--coordinator auto`` under SLURM, Open MPI or on TPU pods, where JAX reads the rest from the
environment. Each process reads ``PROBLEM.npz`` and keeps its block of rows
(:func:`process_rows`), or, when the path contains ``{process}``, reads its own file
(``rows-{process}.npz`` → ``rows-0.npz``, ``rows-1.npz``, …). Process 0 writes ``--out`` and
prints the JSON record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.experimental import multihost_utils

from cvxdist import sharding
from cvxdist.problems import (
    DEFAULT_MASK_BYTES,
    GatedReluProblem,
    _compute_masks,
    default_chunk_rows,
    problem_dtype,
    unregularized_gram_pinv,
    validate_arrays,
)


def initialize(
    coordinator: str,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> None:
    """Join the ``jax.distributed`` cluster; call it before any other JAX computation.

    Args:
        coordinator: ``HOST:PORT`` of process 0 (it listens there), or ``"auto"`` to let JAX
            detect the cluster (SLURM, Open MPI, TPU pods; then the counts come from there).
        num_processes, process_id: required with an explicit coordinator.
        timeout_s: how long to wait for all processes to join.

    Raises:
        ValueError: an explicit coordinator without the process count and id, or a bad id.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return
    if num_processes is None or process_id is None:
        raise ValueError("an explicit coordinator needs the number of processes and this id")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        # The arguments are explicit: no cluster environment may override them.
        cluster_detection_method="deactivate",
        initialization_timeout=timeout_s,
    )


def native_stdout_to_stderr() -> None:
    """Send what native code writes to file descriptor 1 to stderr, for the rest of the process,
    and keep Python's ``sys.stdout`` on the real stdout.

    gloo prints its connection log (``[Gloo] Rank 0 is connected to ...``) to fd 1; a command
    whose stdout is one JSON record calls this before joining a cluster.
    """
    sys.stdout.flush()
    real_stdout = os.fdopen(os.dup(1), "w", encoding=sys.stdout.encoding or "utf-8")
    os.dup2(2, 1)
    sys.stdout = real_stdout


def process_rows(
    num_rows: int, process_id: int | None = None, num_processes: int | None = None
) -> slice:
    """The block of rows a process keeps when ``num_rows`` rows are split evenly in order."""
    index = jax.process_index() if process_id is None else process_id
    count = jax.process_count() if num_processes is None else num_processes
    return slice(num_rows * index // count, num_rows * (index + 1) // count)


def _fingerprint(array: np.ndarray) -> np.ndarray:
    """Eight bytes of the SHA-256 of an array's dtype, shape and values, as an int64."""
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).digest()
    return np.frombuffer(digest[:8], np.int64)


def make_distributed_problem(
    X_local: object,
    Y_local: object,
    G: object,
    *,
    skip: bool = False,
    bias: bool = False,
    chunk_rows: int | None = None,
    store_masks: bool | None = None,
    dtype: jnp.dtype | str | None = None,
    precision: str = "default",
) -> GatedReluProblem:
    """The problem over the rows of every process; each process passes its own.

    Collective: every process must call it, with the same ``G`` and options.

    Args:
        X_local: this process's rows ``(N_p, d)``, ``N_p ≥ 1``.
        Y_local: their targets ``(N_p, c)`` or ``(N_p,)``.
        G: gates ``(d, P)``, the same on every process.
        chunk_rows: rows per chunk over all devices (default: as
            :func:`cvxdist.problems.make_problem` for the total ``N``).
        skip, bias, store_masks, dtype, precision: as in :func:`cvxdist.problems.make_problem`.

    Raises:
        ValueError: bad local arrays, different ``G`` or local device counts across
            processes, bad options.
    """
    X_local, Y_local, G = validate_arrays(X_local, Y_local, G)
    dtype = problem_dtype(X_local, dtype)
    mesh = sharding.row_mesh()
    local_devices = len(mesh.local_devices)
    G = np.asarray(G, dtype)
    N_p, c, P = len(X_local), Y_local.shape[1], G.shape[1]
    facts = np.concatenate([[N_p, local_devices, c], _fingerprint(G)]).astype(np.int64)
    gathered = np.asarray(multihost_utils.process_allgather(facts)).reshape(-1, len(facts))
    for column, what in ((1, "local device counts"), (2, "numbers of outputs (columns of Y)")):
        if np.any(gathered[:, column] != gathered[0, column]):
            raise ValueError(f"processes have different {what}: {gathered[:, column].tolist()}")
    if np.any(gathered[:, 3] != gathered[0, 3]):
        raise ValueError("G differs between processes; every process must pass the same gates")
    counts = gathered[:, 0]
    N = int(counts.sum())
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(N, P, c)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows}")
    per_device = math.ceil(min(int(chunk_rows), N) / mesh.size)
    local_width = local_devices * per_device
    K = math.ceil(int(counts.max()) / local_width)
    if store_masks is None:
        store_masks = N * P <= DEFAULT_MASK_BYTES

    def global_rows(local: np.ndarray) -> Array:
        """Local rows ``(N_p, ...)``, zero-padded into this process's ``(K, L·m, ...)`` slots."""
        padded = np.zeros((K * local_width, *local.shape[1:]), dtype)
        padded[: len(local)] = local
        shape = (K, mesh.size * per_device, *local.shape[1:])
        target = sharding.row_sharding(mesh, len(shape), rows_axis=1)
        return jax.make_array_from_process_local_data(
            target, padded.reshape(K, local_width, *local.shape[1:]), shape
        )

    X, Y = global_rows(X_local), global_rows(Y_local)
    valid = None
    if K * mesh.size * per_device > N:
        valid = global_rows(np.ones(N_p, dtype))
    G_global = jax.make_array_from_process_local_data(sharding.row_sharding(mesh, 2, None), G)
    problem = GatedReluProblem(
        X,
        Y,
        G_global,
        _compute_masks(X, G_global) if store_masks else None,
        valid,
        None,
        N,
        bool(skip),
        bool(bias),
        precision=precision,
    )
    gram_pinv = unregularized_gram_pinv(problem)
    if gram_pinv is None:
        return problem
    return dataclasses.replace(problem, gram_pinv=gram_pinv.astype(dtype))
