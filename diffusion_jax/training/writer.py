"""Metrics and images: the log, ``metrics.jsonl``, TensorBoard events and PNG grids.

Only the writer of process 0 is enabled; the others accept calls and do nothing.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from etils import epath

__all__ = ["MetricWriter", "image_grid"]


def image_grid(images, *, ncols: int | None = None, upscale: int = 1, pad: int = 1) -> np.ndarray:
    """uint8 (H', W', C) grid of NHWC images in [-1, 1] (C = 1 or 3), ``upscale``-times
    enlarged by pixel repetition (for 8x8 data), separated by ``pad`` pixels."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 1 or 3); got shape {images.shape}.")
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    pixels = pixels.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = h * upscale, w * upscale
    # Mid-grey separators: visible between images with black backgrounds.
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 128, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = pixels[i]
    return grid


class MetricWriter:
    """Writes scalars to the log, ``workdir/metrics.jsonl`` and TensorBoard, and images
    to ``workdir/samples/*.png`` and TensorBoard. Disabled (no-op) when ``enabled`` is False."""

    def __init__(self, workdir, *, enabled: bool):
        self.enabled = enabled
        self.workdir = epath.Path(workdir)
        self._tb = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        self._jsonl = (self.workdir / "metrics.jsonl").open("a")

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in values.items()))
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(k, v, int(step))
        self._tb.flush()

    def write_image(self, step: int, name: str, grid: np.ndarray) -> epath.Path | None:
        """Writes a uint8 (H, W, C) grid as ``samples/{name}_{step:08d}.png`` and to TensorBoard."""
        if not self.enabled:
            return None
        from PIL import Image

        out_dir = self.workdir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}_{int(step):08d}.png"
        image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        with path.open("wb") as f:
            image.save(f, format="PNG")
        self._tb.add_image(name, grid, int(step), dataformats="HWC")
        self._tb.flush()
        return path

    def close(self) -> None:
        """Closes the files and TensorBoard's writer thread. Never raises (a full disk
        must not keep the thread alive or hide the error that stopped the run): a
        failure to flush is logged."""
        if not self.enabled:
            return
        for close in (self._jsonl.close, self._tb.close):
            try:
                close()
            except Exception as e:  # noqa: BLE001 - logged; closing must complete
                logging.error("Closing the metric writer: %s: %s", type(e).__name__, e)
