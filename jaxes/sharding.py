"""The device mesh: one axis, ``data``. Batches are sharded on it, parameters replicated.

The same code runs on one CPU, on eight devices and across hosts (after
``jax.distributed.initialize()``): arrays are built with ``make_array_from_callback`` from the
full host copy that every process holds, so no process ever needs another's data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def put(array, sharding: NamedSharding) -> jax.Array:
    """Places a host array (identical on every process) as a global array with ``sharding``."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_tree(tree, sharding: NamedSharding):
    return jax.tree.map(lambda x: put(x, sharding), tree)


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    """Raises unless ``batch_size`` splits evenly over the mesh."""
    if batch_size % mesh.size:
        raise ValueError(
            f"{name}={batch_size} must be a multiple of the {mesh.size} devices of the mesh; "
            f"use e.g. {name}={max(1, batch_size // mesh.size) * mesh.size}."
        )


def memory_bytes(device: jax.Device) -> int:
    """Memory one device may use: its allocator limit, or the host's RAM for CPU devices."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
