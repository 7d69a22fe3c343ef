"""Devices, the data-parallel mesh, shardings and multi-host setup.

One mesh axis, ``data``, spans every device of every process. Parameters and optimizer
state are replicated; each batch is split along its leading axis. Each process loads its
own slice of the global batch and `global_batch` assembles the global array.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "check_batch_size",
    "global_batch",
    "initialize_distributed",
    "make_mesh",
]

DATA_AXIS = "data"


def initialize_distributed(
    *, coordinator_address: str | None, num_processes: int | None, process_id: int | None,
    auto: bool = False, heartbeat_timeout_seconds: int = 100,
    initialization_timeout_seconds: int = 300,
) -> None:
    """Calls `jax.distributed.initialize` when asked; a no-op otherwise.

    With an explicit coordinator address (and process count and id) it connects those
    processes (e.g. several on one host over localhost). With ``auto`` and no address,
    JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI).

    A process that stops answering for ``heartbeat_timeout_seconds`` is declared dead and
    the others stop with an error instead of waiting for it forever; processes that do
    not all arrive within ``initialization_timeout_seconds`` fail the start.
    """
    timeouts = dict(
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout_seconds,
    )
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                "--coordinator_address needs --num_processes and --process_id as well."
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            **timeouts,
        )
    elif auto:
        jax.distributed.initialize(**timeouts)
    else:
        return
    logging.info(
        "Process %d of %d; %d local devices, %d in all.",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis ``data``."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, *, device_count: int, process_count: int) -> int:
    """Checks the global batch against the devices; returns the per-process batch."""
    if global_batch_size <= 0 or global_batch_size % device_count:
        lower = device_count * max(1, global_batch_size // device_count)
        raise ValueError(
            f"train.batch_size (the global batch) = {global_batch_size} must be a positive "
            f"multiple of the device count {device_count} ({process_count} process(es)); e.g. "
            f"{lower} or {lower + device_count}."
        )
    return global_batch_size // process_count


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assembles this process's slice of the batch into global arrays split over ``data``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
