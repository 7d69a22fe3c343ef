"""A normalized radial-basis-function network with a readout per diffusion step.

Sohl-Dickstein et al. (2015), Appendix D.1.1, model the swiss roll's reverse kernels with
"a radial basis function network" of 16 hidden units, shared across time, whose readout of
the mean and covariance outputs is learned separately for each time step. Here:

    a_j(x) = -|x - c_j|^2 / (2 s_j^2),     h_j(x) = softmax_j(a(x)),     y = h(x) W[t]

with centres c_j (H, D) and widths s_j (H,) shared by all steps, and a readout matrix
W[t] of shape (H, out) for each step t. The hidden activities are normalized (they sum to
1 over the H units), so the output interpolates the per-unit rows of W[t] and stays
bounded far from the data; a bias would duplicate what the normalization already gives.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.mlp import check_step_inputs


class NormalizedRBF(nn.Module):
    """``(x, t) -> output`` for data of shape (B, D).

    Attributes:
      num_timesteps: number of readouts; ``t`` takes values in ``[0, num_timesteps)``.
      num_hidden: H, the number of radial basis units (16 in the paper).
      out_dim: output width; None means D.
      center_init_std: the centres start as N(0, center_init_std^2) draws (data scaled
        to unit variance: 1).
      width_init: the initial width s of every unit.
      readout_init_std: std of the normal initialisation of the readouts (0: zeros).
    """

    num_timesteps: int
    num_hidden: int = 16
    out_dim: int | None = None
    center_init_std: float = 1.0
    width_init: float = 0.5
    readout_init_std: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        """Applies the network.

        Args:
          x: float (B, D), or (S, B, D): S blocks of B rows, block s at step ``t[s]`` (one
            batched matmul for the readouts instead of a per-row gather).
          t: int (B,) (or (S,) for blocks) in ``[0, num_timesteps)``; checked when
            concrete, the caller's duty inside ``jit``.
          train: unused; accepted so every model has the same call signature.

        Returns:
          float32 (float64 for float64 x) (B, out_dim or D), or (S, B, out_dim or D)
          for blocks.
        """
        del train
        self._check(x, t)
        dim = x.shape[-1]
        out_dim = self.out_dim or dim
        centers = self.param(
            "centers", nn.initializers.normal(self.center_init_std), (self.num_hidden, dim),
            jnp.float32,
        )
        log_widths = self.param(
            "log_widths", nn.initializers.constant(jnp.log(self.width_init)),
            (self.num_hidden,), jnp.float32,
        )
        lead = (1,) * (x.ndim - 1)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64
        diff = xf[..., None, :] - centers.reshape(lead + centers.shape)
        inv_var = jnp.exp(-2.0 * log_widths).reshape(lead + log_widths.shape)
        h = jax.nn.softmax(-0.5 * jnp.sum(jnp.square(diff), -1) * inv_var, axis=-1)
        init = (
            nn.initializers.normal(self.readout_init_std)
            if self.readout_init_std > 0 else nn.initializers.zeros
        )
        readout = self.param(
            "readout", init, (self.num_timesteps, self.num_hidden, out_dim), jnp.float32
        )
        if h.ndim == 3:
            return jnp.einsum("sbh,sho->sbo", h, readout[t])
        return jnp.einsum("bh,bho->bo", h, readout[t])

    def _check(self, x, t) -> None:
        if self.num_timesteps < 1 or self.num_hidden < 1:
            raise ValueError(
                f"NormalizedRBF: num_timesteps and num_hidden must be positive; got "
                f"{self.num_timesteps} and {self.num_hidden}."
            )
        check_step_inputs("NormalizedRBF", x, t, self.num_timesteps, blocks=True)
