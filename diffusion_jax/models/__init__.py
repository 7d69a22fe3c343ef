"""Flax Linen networks for diffusion models.

- :class:`UNet`: the DDPM U-Net for NHWC images (Ho et al. 2020).
- :class:`MLP`: a time-conditioned MLP for (B, D) data, optionally with a per-step readout
  (Sohl-Dickstein et al. 2015).
- :class:`NormalizedRBF`: a normalized radial-basis-function net with a readout per step
  (the 2015 paper's swiss roll network).
- :func:`timestep_embedding`: DDPM's sinusoidal embedding of the step ``t``.
- :class:`Conv` / :func:`conv2d`: the U-Net's NHWC convolution, XLA's by default, with
  opt-in float32 CPU kernels (``cpu_kernels``: `diffusion_jax.models.conv`, the one place
  they are chosen).
- :class:`Dropout`: ``nn.Dropout`` with its mask from a counter-based hash, far cheaper
  than threefry on the CPU and plain integer ops on every backend
  (`diffusion_jax.models.dropout`; the U-Net's dropout).

The models know nothing of schedules or losses: they map ``(x_t, t)`` to an array.
"""

from diffusion_jax.models import conv, dropout
from diffusion_jax.models.conv import Conv, conv2d
from diffusion_jax.models.dropout import Dropout
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.rbf import NormalizedRBF
from diffusion_jax.models.unet import UNet, timestep_embedding

__all__ = [
    "Conv", "Dropout", "MLP", "NormalizedRBF", "UNet", "conv", "conv2d", "dropout",
    "timestep_embedding",
]
