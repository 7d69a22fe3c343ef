"""The diffusion transformer, DiT (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), for NHWC images.

The image is cut into p x p patches (patchify), each patch a token of ``hidden_size``
features plus a fixed 2-D sine-cosine position embedding. A stack of adaLN-Zero blocks
(Sec. 3.2) conditions on c = timestep embedding + class embedding: each block regresses
from c the shift, scale and gate of its two sub-layers,

    x <- x + gate_msa * Attention(LN(x) * (1 + scale_msa) + shift_msa)
    x <- x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp),

with the regression zero-initialised, so every block starts as the identity. The final
layer (adaLN, then a zero-initialised linear map to p * p * out_channels per token) and
unpatchify give an output of the input's height and width; with ``out_channels = 2 C`` the
second half is the learned variance (Sec. 3.2, "learned sigma", improved DDPM).

The layer shapes and initialisers follow the paper's reference code, so the parameter
counts match the paper's Table 4 for 256 x 256 images (32 x 32 x 4 latents, 1000 classes,
learned sigma): see `DIT_SIZES` and `dit_size_kwargs`.

Mixed precision: parameters in ``param_dtype`` (float32); dense layers, attention and the
MLP compute in ``dtype`` (e.g. bfloat16); LayerNorm statistics in float32; the output is
float32. Attention goes through `jax.nn.dot_product_attention`.

The model maps ``(x_t, t[, y])`` to an array, like `UNet`: ``model.apply({'params': p},
x, t, y, train=...)``. The class ``num_classes`` is the null class of classifier-free
guidance (Ho & Salimans 2022): pass it as a label, or ask for it with ``force_drop``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DIT_SIZES",
    "DiT",
    "DiTBlock",
    "dit_size_kwargs",
    "dit_timestep_embedding",
    "patchify",
    "sincos_pos_embed_2d",
    "unpatchify",
]

Dtype = Any

# Table 4 of the paper: (depth, hidden size, heads).
DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
_LN_EPS = 1e-6
_TIME_FREQ_DIM = 256


def dit_size_kwargs(name: str) -> dict:
    """DiT constructor fields of a named model, e.g. ``'DiT-XL/2'`` -> depth 28, hidden
    1152, 16 heads, patch 2. Valid names: DiT-{S,B,L,XL}/{2,4,8}."""
    valid = [f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES]
    if name not in valid:
        raise ValueError(f"Unknown DiT size {name!r}; valid names are {valid}.")
    size, patch = name[len("DiT-"):].split("/")
    return dict(DIT_SIZES[size], patch_size=int(patch))


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p) * (W/p), p * p * C), tokens in row-major patch order,
    features of each patch ordered (row in patch, column in patch, channel)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, grid: tuple[int, int]) -> jax.Array:
    """The inverse of `patchify`: (B, gh * gw, p * p * C) -> (B, gh * p, gw * p, C)."""
    b, _, features = tokens.shape
    gh, gw = grid
    c = features // (p * p)
    x = tokens.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, c)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings (MAE, He et al. 2022; used by DiT), float64
    of shape (gh * gw, dim): the first dim/2 features encode the patch's column, the last
    dim/2 its row, each as [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k/(dim/2)),
    k < dim/4. ``dim`` must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4; got {dim}.")
    gh, gw = grid
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)


def dit_timestep_embedding(t: jax.Array, dim: int = _TIME_FREQ_DIM,
                           max_period: float = 10000.0) -> jax.Array:
    """DiT's (GLIDE's) sinusoidal embedding of t: [cos(t f_k), sin(t f_k)], f_k =
    max_period^(-k / (dim/2)), k < dim/2. t: shape (B,), any number dtype; float32 (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, per example (shift, scale of shape (B, D))."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(dtype, name):
    """LayerNorm without affine parameters, eps 1e-6 (statistics in float32)."""
    return nn.LayerNorm(epsilon=_LN_EPS, use_bias=False, use_scale=False, dtype=dtype, name=name)


_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (Fig. 3 of the paper).

    Input x (B, N, D), conditioning c (B, D); output (B, N, D) in ``dtype``.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        d, heads = self.hidden_size, self.num_heads
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = nn.Dense(6 * d, kernel_init=_zeros, bias_init=_zeros, name="adaLN_modulation",
                       **dense)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)

        h = _modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        b, n, _ = h.shape
        qkv = nn.Dense(3 * d, kernel_init=_xavier, name="qkv", **dense)(h)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, heads, d // heads), 3, axis=2)
        attn = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        attn = nn.Dense(d, kernel_init=_xavier, name="proj", **dense)(attn.reshape(b, n, d))
        x = x + gate_msa[:, None, :] * attn

        h = _modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        h = nn.Dense(int(d * self.mlp_ratio), kernel_init=_xavier, name="fc1", **dense)(h)
        h = nn.Dense(d, kernel_init=_xavier, name="fc2", **dense)(nn.gelu(h, approximate=True))
        return x + gate_mlp[:, None, :] * h


class DiT(nn.Module):
    """The diffusion transformer.

    Attributes:
      patch_size: p; the image height and width must be divisible by it.
      hidden_size: D, the token width; divisible by ``num_heads`` and by 4.
      depth: the number of adaLN-Zero blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / D.
      out_channels: output channels (None: the input's C; 2 C for a learned variance).
      num_classes: if set, class-conditional with a learned embedding of num_classes + 1
        rows, the last one the null class of classifier-free guidance.
      class_dropout_prob: in training, the probability that a label is replaced by the null
        class (the paper uses 0.1); draws from the ``'dropout'`` rng.
      dtype, param_dtype: compute and parameter dtypes.
      remat: keep only each block's input for the backward pass and recompute the rest
        there (`nn.remat`), at the cost of about one more forward pass.
    """

    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    out_channels: int | None = None
    num_classes: int | None = None
    class_dropout_prob: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
                 train: bool, force_drop: jax.Array | None = None) -> jax.Array:
        """Predicts the model output for noisy images.

        Args:
          x: (B, H, W, C) float, H and W divisible by ``patch_size``.
          t: timesteps, shape (B,).
          y: int32 labels (B,) in [0, num_classes] (num_classes = the null class), only
            when ``num_classes`` is set.
          train: enables label dropout (``class_dropout_prob``, rng ``'dropout'``).
          force_drop: optional bool (B,): True replaces that example's label by the null
            class (the unconditional branch of guidance), in training or not.

        Returns:
          float32 (B, H, W, out_channels or C); exactly zero at initialisation.
        """
        self._check_inputs(x, t, y)
        p, d = self.patch_size, self.hidden_size
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, height, width, channels = x.shape
        grid = (height // p, width // p)

        tokens = nn.Dense(d, kernel_init=_xavier, name="x_embedder", **dense)(patchify(x, p))
        pos = jnp.asarray(sincos_pos_embed_2d(d, grid), jnp.float32).astype(tokens.dtype)
        tokens = tokens + pos[None]
        c = self._timestep_embedder(t, dense)
        if self.num_classes is not None:
            c = c + self._label_embedder(y, train, force_drop).astype(c.dtype)
        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            tokens = block(d, self.num_heads, self.mlp_ratio, name=f"block_{i}",
                              **dense)(tokens, c)

        out_channels = self.out_channels or channels
        mod = nn.Dense(2 * d, kernel_init=_zeros, bias_init=_zeros,
                       name="final_adaLN_modulation", **dense)(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        tokens = _modulate(_layer_norm(self.dtype, "norm_final")(tokens), shift, scale)
        tokens = nn.Dense(p * p * out_channels, kernel_init=_zeros, bias_init=_zeros,
                          name="final_linear", **dense)(tokens)
        return unpatchify(tokens, p, grid).astype(jnp.float32)

    def _timestep_embedder(self, t, dense):
        init = nn.initializers.normal(0.02)
        h = dit_timestep_embedding(t)
        h = nn.Dense(self.hidden_size, kernel_init=init, name="t_embedder_0", **dense)(h)
        return nn.Dense(self.hidden_size, kernel_init=init, name="t_embedder_1", **dense)(
            nn.silu(h))

    def _label_embedder(self, y, train, force_drop):
        drop = None
        if train and self.class_dropout_prob > 0:
            key = self.make_rng("dropout")
            drop = jax.random.bernoulli(key, self.class_dropout_prob, y.shape)
        if force_drop is not None:
            drop = force_drop if drop is None else drop | force_drop
        if drop is not None:
            y = jnp.where(drop, self.num_classes, y)
        table = nn.Embed(self.num_classes + 1, self.hidden_size,
                         embedding_init=nn.initializers.normal(0.02), name="y_embedder",
                         param_dtype=self.param_dtype, dtype=self.dtype)
        return table(y)

    def _check_inputs(self, x, t, y) -> None:
        """Static (trace-time) checks of the configuration and the input shapes."""
        d, heads, p = self.hidden_size, self.num_heads, self.patch_size
        if d % heads:
            raise ValueError(
                f"DiT: hidden_size {d} is not divisible by num_heads {heads}; pick a head "
                f"count that divides it (e.g. {[h for h in range(1, 17) if d % h == 0]}).")
        if d % 4:
            raise ValueError(f"DiT: hidden_size must be divisible by 4 (the 2-D position "
                             f"embedding); got {d}.")
        if jnp.ndim(x) != 4:
            raise ValueError(f"DiT: x must be NHWC (rank 4); got shape {jnp.shape(x)}.")
        batch, height, width, _ = x.shape
        if height % p or width % p:
            raise ValueError(
                f"DiT: image height and width must be divisible by patch_size {p}; got x of "
                f"shape {x.shape}. Use a patch size dividing both, or resize the images.")
        if jnp.shape(t) != (batch,):
            raise ValueError(f"DiT: t must have shape (B,) = ({batch},); got {jnp.shape(t)}.")
        if self.num_classes is None and y is not None:
            raise ValueError("DiT: y (class labels) given but the model has num_classes=None.")
        if self.num_classes is not None and (y is None or jnp.shape(y) != (batch,)):
            raise ValueError(f"DiT: y must be int labels of shape ({batch},) when num_classes="
                             f"{self.num_classes}; got {None if y is None else jnp.shape(y)}.")
