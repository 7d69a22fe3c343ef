"""Feature extraction in fixed batches split over devices, and the input checks before it.

A feature network is any ``apply_fn(variables, images) -> {name: (B, ...) array}`` on
images in [0, 1] (`InceptionV3().apply`, or the digits network's). `FeatureExtractor`
compiles it once for one global batch whose leading axis is split over a mesh of this
process's devices, pads the last, partial batch with copies of its last image and drops
their rows, so any number of images gives exactly the rows of a whole-array call. Results
come back to the host as NumPy arrays, batch by batch, for streaming statistics
(`fid.RunningStatistics`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["to_unit_range", "samples_to_unit_range", "local_data_mesh", "FeatureExtractor"]

_RANGE_SLACK = 1e-3


def to_unit_range(images, *, channels: int | None = None) -> np.ndarray:
    """Checks (B, H, W, C) images and returns them as float32 in [0, 1].

    uint8 images are divided by 255; float images must already lie in [0, 1] (within
    1e-3). ``channels``: the channel count the network takes (3 for Inception).

    Raises:
      ValueError: not 4-D, another channel count, or floats outside [0, 1] (the message
        gives the range found; model samples in [-1, 1] go through `samples_to_unit_range`).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C); got shape {images.shape}.")
    if channels is not None and images.shape[-1] != channels:
        hint = " (grey images: repeat them, np.repeat(x, 3, axis=-1))" if channels == 3 else ""
        raise ValueError(f"images must have {channels} channels (NHWC); got {images.shape[-1]} "
                         f"in shape {images.shape}{hint}.")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 in [0, 255] or floats in [0, 1]; got dtype "
                         f"{images.dtype}.")
    lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"float images must lie in [0, 1]; got values in [{lo:.4g}, {hi:.4g}]"
                         ". Model samples in [-1, 1]: use samples_to_unit_range.")
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def samples_to_unit_range(samples) -> np.ndarray:
    """Model samples in [-1, 1] -> the uint8 levels an image file would hold, / 255.

    ``round((x + 1) * 127.5)`` clipped to [0, 255], as ``--mode=sample`` saves them: FID is
    computed on what a PNG of the sample holds, as pytorch-fid reads it.
    """
    samples = np.asarray(samples, np.float32)
    levels = np.clip(np.round((samples + 1.0) * 127.5), 0, 255)
    return (levels / 255.0).astype(np.float32)


def local_data_mesh(axis: str = "data") -> Mesh:
    """A 1-D mesh over this process's devices."""
    return Mesh(np.asarray(jax.local_devices()), (axis,))


class FeatureExtractor:
    """Calls ``apply_fn(variables, images)`` on fixed global batches split over ``mesh``'s
    first axis (the variables replicated, passed as arguments: not baked into the program).

    ``batch_size`` is rounded up to a multiple of the device count. Calling the extractor
    on (N, H, W, C) images (any N) returns ``{name: (N, ...) NumPy}``; `iter_batches`
    yields the same per batch.
    """

    def __init__(self, apply_fn: Callable[[Any, jax.Array], dict], variables: Any,
                 batch_size: int, mesh: Mesh | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        self.mesh = mesh if mesh is not None else local_data_mesh()
        devices = self.mesh.devices.size
        self.batch_size = -(-batch_size // devices) * devices
        split = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names[0]))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._variables = jax.device_put(variables, replicated)
        self._jitted = jax.jit(apply_fn, in_shardings=(replicated, split), out_shardings=split)
        self._fn = functools.partial(self._jitted, self._variables)

    def trace(self, images: np.ndarray) -> jax.stages.Traced:
        """The program of one batch of ``images`` (a whole batch), traced: its jaxpr, and
        by ``.lower().compile()`` the compiled program the calls run (for cost and memory
        analyses; a benchmark reads them)."""
        return self._jitted.trace(self._variables, images)

    def _one_batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
        n = images.shape[0]
        if n < self.batch_size:  # pad with the last image; its rows are dropped below
            pad = np.repeat(images[-1:], self.batch_size - n, axis=0)
            images = np.concatenate([images, pad])
        out = self._fn(images)
        return {k: np.asarray(v)[:n] for k, v in out.items()}

    def iter_batches(self, images: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Features of each array of ``images`` (each split into whole batches)."""
        for chunk in images:
            for start in range(0, chunk.shape[0], self.batch_size):
                yield self._one_batch(chunk[start:start + self.batch_size])

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        parts = list(self.iter_batches([np.asarray(images)]))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
