"""The device mesh ``("rounds", "data")``: instances of a population on the first axis, batches on
the second, everything else replicated (docs/design.md §6b).

One device and one host give the mesh ``(1, 1)``; ``rounds=1`` (the default) puts every device on
``data``, which is the single-instance mesh of a plain round.

The same code runs on one CPU, on eight devices and across hosts (after
``jax.distributed.initialize()``): arrays are built with ``make_array_from_callback`` from the
full host copy that every process holds, so no process ever needs another's data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"
ROUNDS_AXIS = "rounds"
# XLA:CPU options of the programs that run once per round (the inits): fusion emitters off and
# LLVM at -O2 (XLA's default is -O3) compile a truncated-normal init 3-5x faster, to the same bits
# (tests/test_train.py). Round programs keep XLA's defaults: there both options change the last
# bits of a CNN's weights, and -O0 trains 3-6x slower (benchmarks/compile_flags.py; README
# "Training speed").
RUN_ONCE_CPU = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 2}


def run_once_options(mesh: Mesh) -> dict | None:
    """The XLA options of a program that runs once per round on ``mesh``: ``RUN_ONCE_CPU`` on a
    CPU mesh, else None (XLA's defaults)."""
    return dict(RUN_ONCE_CPU) if mesh.devices.flat[0].platform == "cpu" else None


def rounds_axis_size(population: int, num_devices: int) -> int:
    """How many devices the population axis spans: ``gcd(K, devices)``, so both axes divide."""
    return math.gcd(population, num_devices)


def make_mesh(devices: Sequence[jax.Device] | None = None, *, population: int = 1) -> Mesh:
    """The mesh ``("rounds", "data")`` over ``devices`` (default: every device of every process).

    Args:
      devices: the devices; default all of them, across hosts.
      population: the number of instances trained together (``config.parallel.rounds``); the
        rounds axis takes ``gcd(population, len(devices))`` devices, the data axis the rest.
    """
    devices = jax.devices() if devices is None else list(devices)
    rounds = rounds_axis_size(population, len(devices))
    grid = np.asarray(devices).reshape(rounds, len(devices) // rounds)
    return Mesh(grid, (ROUNDS_AXIS, AXIS))


def data_size(mesh: Mesh) -> int:
    """The number of devices a batch is split over."""
    return mesh.shape[AXIS]


def population_sharded(mesh: Mesh) -> NamedSharding:
    """Arrays with a leading instance axis: one slice of instances per row of the mesh."""
    return NamedSharding(mesh, PartitionSpec(ROUNDS_AXIS))


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


def memory_bytes(device: jax.Device) -> int:
    """Memory one device may use: its allocator limit, or the host's RAM for CPU devices."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
