"""Time-conditioned MLPs for low-dimensional data (Swiss roll, toy 2-D/3-D sets).

Two ways of telling the network the step ``t``, which can be combined:

- ``time_embedding='sinusoidal'``: DDPM's sinusoidal embedding of ``t`` (see
  :func:`diffusion_jax.models.unet.timestep_embedding`) goes through a dense layer and
  swish, and a learned projection of it is added to the pre-activation of every hidden layer
  (as the DDPM U-Net adds ``temb`` to every residual block).
- ``per_step_readout=True``: the hidden layers are shared between all steps and the final
  layer has its own weight matrix and bias for each step, the structure Sohl-Dickstein et
  al. 2015 use for their low-dimensional models (lower layers shared, the readout of the
  mean and covariance learned separately for each time step). The readout kernel has shape
  ``(T, hidden, out)`` and is gathered by ``t``, so step ``t``'s output depends on readout
  ``t`` alone. With ``readout_basis=K > 0`` the per-step readouts are not free but
  smooth in t: step t's matrix and bias are ``sum_k phi_k(t) V_k`` for K learned basis
  readouts V_k and fixed normalized Gaussian bumps phi_k (`temporal_basis`), as in the
  2015 paper's published code (its "temporal basis"). Every example then trains the
  readouts of its neighbouring steps too: with T = 2000 steps that is the difference
  between a readout seeing ~16 examples per batch and one seeing thousands.

With ``time_embedding='none'`` and ``per_step_readout=True`` the model is the 2015 one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.unet import timestep_embedding


def centered_sigmoid(x: jax.Array) -> jax.Array:
    """sigmoid(x) - 1/2: a sigmoid unit whose output is centred on 0.

    A layer of these computes the same functions as a layer of sigmoid units (the next
    layer's bias absorbs the shift: W (s - 1/2) + b = W s + (b - W 1 / 2)), but the
    gradients of the next layer's weights are no longer dominated by the common 1/2 every
    unit outputs, the centring argument of LeCun et al. (1998), "Efficient BackProp", Sec.
    4.4. For the 2015 paper's heartbeat network (`configs/heartbeat.py`) it is the
    difference between K = -2.589 and -2.388 bits per sequence after the same 20,000 Adam
    steps.
    """
    return nn.sigmoid(x) - 0.5


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish,
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "centered_sigmoid": centered_sigmoid,
    "tanh": nn.tanh,
}
TIME_EMBEDDINGS = ("sinusoidal", "none")


class MLP(nn.Module):
    """An MLP ``(x_t, t) -> output`` for data of shape (B, D).

    Attributes:
      num_timesteps: T, the number of diffusion steps; ``t`` takes values in ``[0, T)``.
      features: widths of the hidden layers (at least one).
      out_dim: output width; None means D (predicting the noise or the mean). Pass ``2 * D``
        to also output variances.
      activation: one of ``'swish'``, ``'relu'``, ``'sigmoid'``, ``'centered_sigmoid'``
        (`centered_sigmoid`: sigmoid units, centred), ``'tanh'``.
      time_embedding: ``'sinusoidal'`` (added to every hidden layer) or ``'none'``.
      time_embedding_dim: width of the sinusoidal embedding (at least 4).
      per_step_readout: a separate final layer per step, shape ``(T, features[-1], out)``.
      readout_basis: 0 (the per-step readouts are free parameters) or K > 0 (they are
        combinations of K basis readouts, see `temporal_basis`); needs per_step_readout.
    """

    num_timesteps: int
    features: Sequence[int] = (128, 128, 128)
    out_dim: int | None = None
    activation: str = "swish"
    time_embedding: str = "sinusoidal"
    time_embedding_dim: int = 128
    per_step_readout: bool = False
    readout_basis: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        """Applies the network.

        Args:
          x: data ``x_t``, float of shape (B, D); or (S, B, D), S blocks of B rows that
            share a step (block s is at step ``t[s]``): the per-step readout is then one
            batched matmul instead of a gather of a (hidden, out) matrix per row.
          t: steps, integer of shape (B,) (or (S,) for blocks) with values in ``[0, T)``.
            The range is checked when ``t`` is concrete; inside ``jit`` it is the caller's
            duty (an out-of-range ``t`` would silently read another step's readout row).
          train: unused (no dropout); accepted so every model has the same call signature.

        Returns:
          float32 (float64 for float64 x) array of shape (B, out_dim or D), or
          (S, B, out_dim or D) for blocks.
        """
        del train
        act = self._check_config()
        self._check_inputs(x, t)
        out_dim = self.out_dim or x.shape[-1]

        temb = None
        if self.time_embedding == "sinusoidal":
            temb = timestep_embedding(t, self.time_embedding_dim)
            temb = nn.swish(nn.Dense(self.time_embedding_dim, name="temb_dense")(temb))

        h = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64
        for i, width in enumerate(self.features):
            h = nn.Dense(width, name=f"hidden_{i}")(h)
            if temb is not None:
                proj = nn.Dense(width, name=f"temb_proj_{i}")(temb)
                h = h + (proj[:, None, :] if h.ndim == 3 else proj)
            h = act(h)

        if not self.per_step_readout:
            return nn.Dense(out_dim, name="readout")(h)
        return self._per_step_readout(h, t, out_dim)

    def _per_step_readout(self, h: jax.Array, t: jax.Array, out_dim: int) -> jax.Array:
        """``h @ W[t] + b[t]`` with W of shape (T, hidden, out) and b of shape (T, out)."""
        hidden = h.shape[-1]
        if self.readout_basis:
            return self._basis_readout(h, t, out_dim)
        # Each step's matrix is initialised like a plain Dense layer (LeCun normal).
        kernel_init = nn.initializers.lecun_normal(batch_axis=(0,))
        kernel = self.param(
            "readout_kernel", kernel_init, (self.num_timesteps, hidden, out_dim), jnp.float32
        )
        bias = self.param(
            "readout_bias", nn.initializers.zeros, (self.num_timesteps, out_dim), jnp.float32
        )
        if h.ndim == 3:  # blocks of rows sharing a step
            return jnp.einsum("sbh,sho->sbo", h, kernel[t]) + bias[t][:, None, :]
        return jnp.einsum("bh,bho->bo", h, kernel[t]) + bias[t]

    def _basis_readout(self, h: jax.Array, t: jax.Array, out_dim: int) -> jax.Array:
        """W[t] = sum_k phi_k(t) V_k, b[t] = sum_k phi_k(t) c_k (`temporal_basis`)."""
        num = self.readout_basis
        kernel_init = nn.initializers.lecun_normal(batch_axis=(0,))
        kernel = self.param(
            "readout_basis_kernel", kernel_init, (num, h.shape[-1], out_dim), jnp.float32
        )
        bias = self.param("readout_basis_bias", nn.initializers.zeros, (num, out_dim), jnp.float32)
        phi = jnp.asarray(temporal_basis(self.num_timesteps, num))[t]  # (B or S, K)
        if h.ndim == 3:
            weights = jnp.einsum("sk,kho->sho", phi, kernel)
            return jnp.einsum("sbh,sho->sbo", h, weights) + (phi @ bias)[:, None, :]
        return jnp.einsum("bk,bh,kho->bo", phi, h, kernel) + phi @ bias

    def _check_config(self) -> Callable[[jax.Array], jax.Array]:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MLP: unknown activation {self.activation!r}; valid: {sorted(ACTIVATIONS)}"
            )
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(
                f"MLP: unknown time_embedding {self.time_embedding!r}; "
                f"valid: {list(TIME_EMBEDDINGS)}"
            )
        if self.time_embedding == "none" and not self.per_step_readout:
            raise ValueError(
                "MLP: time_embedding='none' without per_step_readout would ignore t; "
                "use time_embedding='sinusoidal' or per_step_readout=True"
            )
        if not self.features:
            raise ValueError("MLP: features must name at least one hidden layer")
        if self.readout_basis and not self.per_step_readout:
            raise ValueError("MLP: readout_basis > 0 needs per_step_readout=True")
        if self.num_timesteps < 1:
            raise ValueError(f"MLP: num_timesteps must be positive, got {self.num_timesteps}")
        return ACTIVATIONS[self.activation]

    def _check_inputs(self, x: jax.Array, t: jax.Array) -> None:
        check_step_inputs("MLP", x, t, self.num_timesteps, blocks=self.per_step_readout)


def check_step_inputs(name: str, x, t, num_timesteps: int, *, blocks: bool) -> None:
    """Checks the ``(x, t)`` of a network with a readout per step; errors start with name.

    x: (B, D), or (S, B, D) blocks of rows sharing a step when ``blocks``; t: integer (B,)
    (or (S,)) in [0, num_timesteps), the range checked only when t is concrete.
    """
    if jnp.ndim(x) != 2 and not (jnp.ndim(x) == 3 and blocks):
        extra = " (or (S, B, D), blocks of rows sharing a step, with per-step readouts)"
        raise ValueError(f"{name}: x must have shape (B, D){extra}, got shape {jnp.shape(x)}")
    if jnp.shape(t) != (x.shape[0],):
        what = "(B,)" if jnp.ndim(x) == 2 else "(S,) (one step per block)"
        raise ValueError(
            f"{name}: t must have shape {what} = ({x.shape[0]},), got shape {jnp.shape(t)}"
        )
    if not jnp.issubdtype(jnp.result_type(t), jnp.integer):
        raise ValueError(f"{name}: t must be an integer array, got dtype {jnp.result_type(t)}")
    values = _concrete_or_none(t)
    if values is not None and values.size and (
        values.min() < 0 or values.max() >= num_timesteps
    ):
        raise ValueError(
            f"{name}: t must lie in [0, {num_timesteps}), got values in "
            f"[{values.min()}, {values.max()}]"
        )


def temporal_basis(num_timesteps: int, num_basis: int) -> np.ndarray:
    """float32 (T, K): phi_k(t), K Gaussian bumps over u = sqrt((t + 1) / (T + 1)).

    Centres evenly spaced from u(0) to 1, each as wide as the spacing; each row is
    normalized to sum to 1, so a constant readout is representable exactly. The square
    root packs more bumps into the early steps, where the reverse kernels change fastest.
    """
    if not 1 <= num_basis <= num_timesteps:
        raise ValueError(
            f"readout_basis must lie in [1, num_timesteps = {num_timesteps}]; got {num_basis}."
        )
    u = np.sqrt(np.arange(1, num_timesteps + 1, dtype=np.float64) / (num_timesteps + 1))
    if num_basis == 1:
        return np.ones((num_timesteps, 1), np.float32)
    centres = np.linspace(u[0], 1.0, num_basis)
    width = centres[1] - centres[0]
    phi = np.exp(-0.5 * np.square((u[:, None] - centres[None]) / width))
    return (phi / phi.sum(axis=1, keepdims=True)).astype(np.float32)


def _concrete_or_none(t: jax.Array) -> np.ndarray | None:
    """The values of ``t`` when they are known at trace time, else None (inside jit)."""
    try:
        return np.asarray(t)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
