"""The FSDP sharding rule: where each array of the train state lives on a (data, fsdp) mesh.

Fully sharded data parallelism (ZeRO-3; Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models"): each parameter, its EMA and its
optimizer moments are split along the ``fsdp`` mesh axis and replicated along ``data``; the
batch is split over both axes. `jax.jit` with these shardings as ``in_shardings`` and
``out_shardings`` makes XLA insert the all-gathers of the parameters before their use and
the reduce-scatters of the gradients, so one pure ``train_step`` serves every mesh shape.

The rule is a function of an array's shape only, so the Adam moments (shaped like their
parameters) land where their parameters are:

- arrays with fewer than ``min_size`` elements (biases, norms, scalars such as the step)
  are replicated: sharding them saves little memory and costs a collective each;
- otherwise the largest dimension divisible by the ``fsdp`` size (the last of equals) is
  split along ``fsdp``; an array with no such dimension is replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.training.mesh import FSDP_AXIS

__all__ = ["DEFAULT_MIN_SHARD_SIZE", "fsdp_partition_spec", "per_device_bytes", "state_shardings"]

#: Arrays smaller than this many elements stay replicated (a 128 x 128 kernel is sharded).
DEFAULT_MIN_SHARD_SIZE = 2**14


def fsdp_partition_spec(shape: tuple[int, ...], fsdp_size: int, *,
                        min_size: int = DEFAULT_MIN_SHARD_SIZE) -> PartitionSpec:
    """The rule of the module docstring for one array shape: ``PartitionSpec()``
    (replicated) or one entry ``'fsdp'`` at the chosen dimension."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * dim + [FSDP_AXIS]))


def state_shardings(tree: Any, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> Any:
    """A `NamedSharding` per leaf of ``tree`` (arrays or `jax.ShapeDtypeStruct`s) by
    `fsdp_partition_spec`, on ``mesh`` (which must have an ``fsdp`` axis)."""
    fsdp_size = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_partition_spec(np.shape(x), fsdp_size,
                                                          min_size=min_size)),
        tree,
    )


def per_device_bytes(tree: Any, shardings: Any | None = None) -> int:
    """Bytes that one device holds of ``tree``: the sum over leaves of the shard shape's
    size times the item size. ``shardings`` defaults to the leaves' own ``.sharding``
    (arrays, or `jax.ShapeDtypeStruct`s that carry one); an unsharded leaf counts whole."""
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings) if shardings is not None else [
        getattr(x, "sharding", None) for x in leaves]
    total = 0
    for leaf, sharding in zip(leaves, specs, strict=True):
        shape = tuple(np.shape(leaf))
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
