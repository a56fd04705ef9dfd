r"""Rows sharded across devices: data parallelism by XLA collectives.

Layout. A 1-D :class:`~jax.sharding.Mesh` with one axis, ``"rows"``, over the devices. The
chunked row arrays of a :class:`~cvxdist.problems.GatedReluProblem` are sharded along their
row axis ``n`` (``X (K, n, d)``, ``Y (K, n, c)``, ``masks (K, n, P)``, ``valid (K, n)``, all
``PartitionSpec(None, "rows", ...)``); ``G``, ``U`` and every ``(P, d, c)`` quantity are
replicated. ``n`` is rounded up to a multiple of the device count and the extra rows are zero
with ``valid = 0``, so they contribute nothing.

Nothing else changes: the solvers are written for one device and jitted once. Given sharded
inputs, XLA's SPMD partitioner (GSPMD) keeps every ``(n, ·)`` chunk computation local to the
device that holds the rows and turns the row contractions into all-reduces: the adjoint
``X_kᵀ (M_k ⊙ R_k)`` (a ``(d, P·c)`` all-reduce per chunk), the skip/bias moments, and the
scalar sums of the duality gap. ``X`` is never gathered. The solution is the single-device
one up to the summation order of those reductions.

The mesh axis type is ``Auto`` (GSPMD propagation), not ``Explicit``: the operators contract
over the sharded axis and let the partitioner place the all-reduce.

Multi-host: :mod:`cvxdist.multihost` (``jax.distributed``; tested with two processes on one
machine). Every process joins with :func:`cvxdist.multihost.initialize`; ``jax.devices()``
then lists the devices of all processes and :func:`row_mesh` builds the global mesh over them.
:func:`cvxdist.problems.make_problem` expects the full arrays on every process;
:func:`cvxdist.multihost.make_distributed_problem` takes each process's own rows and builds
the same layout with :func:`jax.make_array_from_process_local_data`. The solve code is the
same on every process, and the all-reduces then cross processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax import Array
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

#: Name of the mesh axis the rows are sharded over.
ROW_AXIS = "rows"


def row_mesh(devices: int | Sequence[jax.Device] | Mesh | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` with the axis :data:`ROW_AXIS`.

    Args:
        devices: ``None`` for every visible device, a count (the first ``k`` devices), a list
            of devices, or a 1-D mesh (returned as is).

    Raises:
        ValueError: an impossible count or a mesh that is not 1-D over ``"rows"``.
    """
    if isinstance(devices, Mesh):
        if devices.axis_names != (ROW_AXIS,):
            raise ValueError(f"need a 1-D mesh with axis {ROW_AXIS!r}, got {devices.axis_names}")
        return devices
    available = jax.devices()
    if devices is None:
        chosen = list(available)
    elif isinstance(devices, int | np.integer):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices must be between 1 and the {len(available)} visible device(s), "
                f"got {devices}"
            )
        chosen = list(available[: int(devices)])
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices is an empty list")
    return Mesh(np.array(chosen), (ROW_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def row_sharding(
    mesh: Mesh, ndim: int, rows_axis: int | None, memory_kind: str | None = None
) -> NamedSharding:
    """Sharding of an ``ndim`` array split along ``rows_axis`` (``None``: replicated)."""
    spec = [None] * ndim
    if rows_axis is not None:
        spec[rows_axis] = ROW_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec), memory_kind=memory_kind)


def placer(mesh: Mesh | None) -> Callable[..., Array]:
    """``place(host_array, rows_axis=None, memory_kind=None)``: put a host array on ``mesh``.

    Without a mesh, arrays go to the default device (uncommitted, as ``jnp.asarray`` does)
    unless a memory kind is asked for.
    """

    def place(
        array: np.ndarray, rows_axis: int | None = None, memory_kind: str | None = None
    ) -> Array:
        if mesh is None:
            if memory_kind is None:
                return jax.numpy.asarray(array)
            target = SingleDeviceSharding(jax.devices()[0], memory_kind=memory_kind)
        else:
            target = row_sharding(mesh, array.ndim, rows_axis, memory_kind)
        return jax.device_put(array, target)

    return place


def devices_of(problem: object) -> list[jax.Device]:
    """The devices the rows of ``problem`` live on (one entry when not sharded)."""
    return sorted(problem.X.sharding.device_set, key=lambda device: device.id)
