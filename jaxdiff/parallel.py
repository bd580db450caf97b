"""Data parallelism over ``jax.sharding``: a one-axis mesh named ``'data'``, the batch split
along it and the state replicated; XLA inserts the gradient all-reduce. Across processes
(``jax.distributed.initialize``) each process passes its own share of the global batch.

Nothing here does I/O; :mod:`jaxdiff.train` builds the step on top of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DATA_AXIS", "check_batch", "data_size", "make_mesh", "replicate", "shard_batch"]

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh named ``'data'`` over ``devices`` (default: every device of every host)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_size(mesh: Mesh | None) -> int:
    if mesh is None:
        return 1
    if DATA_AXIS not in mesh.shape:
        raise ValueError(f"the mesh needs an axis named {DATA_AXIS!r}, got axes {mesh.axis_names}")
    return mesh.shape[DATA_AXIS]


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` on every device of ``mesh`` (replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def check_batch(batch: Any, num_devices: int, grad_accum_steps: int) -> int:
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    if not sizes or None in sizes or len(sizes) != 1:
        raise ValueError(
            f"every leaf of the batch needs the same leading (batch) axis, got sizes {sizes}"
        )
    (size,) = sizes
    if size % num_devices:
        raise ValueError(
            f"global batch size {size} is not divisible by the device count {num_devices} "
            f"(the size of the mesh's {DATA_AXIS!r} axis); use a multiple of {num_devices}"
        )
    if size % (num_devices * grad_accum_steps):
        raise ValueError(
            f"global batch size {size} does not split into grad_accum_steps={grad_accum_steps} "
            f"micro-batches of a multiple of the device count {num_devices}; use a multiple "
            f"of {num_devices * grad_accum_steps}"
        )
    return size


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch on ``mesh``, split along its leading axis over the ``'data'`` axis.

    Each process passes its own share of the global batch (e.g. from
    :func:`jaxdiff.data.batches` with ``process_index``/``process_count``); the global batch is
    the concatenation over processes in process order, built with
    ``jax.make_array_from_process_local_data``. On one host the share is the whole batch.
    """
    num_devices = data_size(mesh)
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    local = jax.tree.map(np.asarray, batch)
    local_size = check_batch(local, 1, 1)
    global_size = local_size * jax.process_count()
    if global_size % num_devices:
        raise ValueError(
            f"global batch size {global_size} is not divisible by the device count "
            f"{num_devices} (the size of the mesh's {DATA_AXIS!r} axis); use a multiple of "
            f"{num_devices}"
        )
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, (global_size,) + x.shape[1:]),
        local,
    )
