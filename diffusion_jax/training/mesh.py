"""Devices, the (data, fsdp) mesh, shardings and multi-host setup.

A 2-D mesh of every device of every process, axes ``data`` and ``fsdp``: parameters and
optimizer state are split along ``fsdp`` by the rule of `diffusion_jax.training.sharding`
and replicated along ``data``; each batch is split along its leading axis over both axes
(``fsdp = 1``: pure data parallelism, every device holds the whole state). Each process
loads its own slice of the global batch and `global_batch` assembles the global array.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "FSDP_AXIS",
    "check_batch_size",
    "global_batch",
    "initialize_distributed",
    "make_mesh",
    "mesh_from_config",
]

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


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


def make_mesh(*, data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """The (``data``, ``fsdp``) mesh over ``devices`` (default: every device of every
    process, in `jax.devices` order, so consecutive devices, those of one process first,
    share an ``fsdp`` group). ``data = -1``: all devices not in ``fsdp``.

    Raises:
      ValueError: sizes that are not positive or whose product is not the device count.
    """
    devices = jax.devices() if devices is None else list(devices)
    count = len(devices)
    if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp <= 0:
        raise ValueError(f"mesh.fsdp must be a positive int; got {fsdp!r}.")
    if isinstance(data, bool) or not isinstance(data, int) or (data <= 0 and data != -1):
        raise ValueError(f"mesh.data must be a positive int or -1 (the rest); got {data!r}.")
    if data == -1:
        if count % fsdp:
            raise ValueError(f"mesh.fsdp = {fsdp} does not divide the device count {count}; "
                             f"valid sizes: {[k for k in range(1, count + 1) if count % k == 0]}.")
        data = count // fsdp
    if data * fsdp != count:
        raise ValueError(f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp} is not the "
                         f"device count {count}; set mesh.data = -1 to use every device.")
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def mesh_from_config(config) -> Mesh:
    """`make_mesh` with ``config.mesh.data`` and ``config.mesh.fsdp`` (defaults -1 and 1
    for configs without a ``mesh`` section)."""
    section = config.get("mesh") or {}
    return make_mesh(data=section.get("data", -1), fsdp=section.get("fsdp", 1))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every batch axis of ``mesh`` (``data``, ``fsdp``)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes))


def check_batch_size(global_batch_size: int, *, device_count: int, process_count: int,
                     mesh: Mesh | None = None) -> int:
    """Checks the global batch against the devices (the batch is split over every axis of
    ``mesh``); returns the per-process batch."""
    if global_batch_size <= 0 or global_batch_size % device_count:
        lower = device_count * max(1, global_batch_size // device_count)
        axes = "" if mesh is None else (
            f"mesh data x fsdp = {mesh.shape[DATA_AXIS]} x {mesh.shape[FSDP_AXIS]}, ")
        raise ValueError(
            f"train.batch_size (the global batch) = {global_batch_size} must be a positive "
            f"multiple of the device count {device_count} ({axes}{process_count} process(es)); e.g. "
            f"{lower} or {lower + device_count}."
        )
    return global_batch_size // process_count


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assembles this process's slice of the batch into global arrays split over ``data``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
