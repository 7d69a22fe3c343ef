"""The sample grids written during training: one compiled sampler per run, drawn in
batches of ``sample.batch_size`` so that a large ``sample.num_samples`` fits in memory."""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax.training import sample_quality, writer

__all__ = ["SampleGrid"]


class SampleGrid:
    """Draws ``config.sample.num_samples`` samples from EMA parameters and writes a grid.

    On the digits, each grid also logs the digits FID (`sample_quality.log_digits_fid`),
    with ``fid.network='digits'`` of ``max(sample.num_samples, fid.num_samples)``
    samples, the grid's among them: with 64-d features a covariance from 100 samples is
    mostly estimation noise.

    The sampler is jitted once here, for one batch shape (``sample.batch_size`` rounded
    up to a multiple of the mesh size, at most the samples needed), and every grid of the
    run reuses that compiled program. Batch ``i`` of the grid at ``step`` draws with
    ``fold_in(fold_in(key, step), i)``.
    """

    def __init__(self, objective, config, key, sharding):
        self.grid_num = config.sample.num_samples
        self.upscale = config.sample.grid_upscale
        self.digits_fid = config.data.name == "digits"  # logged with each grid
        # fid.num_samples counts only where the digits network is the configured one
        # (a digits run configured for Inception FID keeps its grid's samples).
        self.num = (max(self.grid_num, config.fid.num_samples)
                    if self.digits_fid and config.fid.network == "digits" else self.grid_num)
        self.key = key
        size = sharding.mesh.size
        batch = min(config.sample.batch_size, self.num)
        self.batch = -(-batch // size) * size  # an even split over the devices
        # Sharding the samples over the mesh splits the work; replicated inputs alone
        # would make every device compute the whole chain.
        self._draw = jax.jit(
            lambda params, key: objective.sample(params, key, self.batch),
            out_shardings=sharding,
        )

    def draw(self, params, step: int) -> np.ndarray:
        """``self.num`` samples (NumPy, on every process)."""
        key = jax.random.fold_in(self.key, step)
        chunks, done = [], 0
        while done < self.num:
            images = self._draw(params, jax.random.fold_in(key, len(chunks)))
            chunks.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
            done += self.batch
        return np.concatenate(chunks)[: self.num]

    def write(self, params, step: int, metric_writer) -> None:
        images = self.draw(params, step)
        grid = writer.image_grid(images[: self.grid_num], upscale=self.upscale)
        path = metric_writer.write_image(step, "ema_samples", grid)
        if path is not None:
            logging.info("Wrote %s.", path)
        if self.digits_fid:
            sample_quality.log_digits_fid(images, step, metric_writer)
