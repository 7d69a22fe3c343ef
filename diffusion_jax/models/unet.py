"""The DDPM U-Net (Ho, Jain and Abbeel 2020, appendix B) as a Flax Linen module.

The architecture follows the authors' TensorFlow code (``diffusion_tf/models/unet.py`` and
``diffusion_tf/nn.py``) layer for layer, so that the CIFAR-10 configuration has the paper's
35.7M parameters (35,746,307) and the same initialisation:

- a PixelCNN++-style backbone of wide-ResNet blocks with GroupNorm (32 groups, eps 1e-6)
  and swish, ``num_res_blocks`` blocks per resolution on the way down and
  ``num_res_blocks + 1`` on the way up, each up block taking one concatenated skip;
- single-head self-attention at the resolutions in ``attn_resolutions`` and in the middle;
- the Transformer sinusoidal timestep embedding, passed through two dense layers and added
  to every residual block;
- ``variance_scaling(1, 'fan_avg', 'uniform')`` weights, zero biases, and a scale of 1e-10
  (DDPM's ``init_scale=0``) for the last layer of every residual branch and the output conv,
  so that at initialisation every block is close to the identity and the output close to 0.

Images are NHWC. Mixed precision: with ``dtype=jnp.bfloat16`` the parameters stay in
``param_dtype`` (float32), convolutions and dense layers compute in bfloat16, GroupNorm
statistics and the attention softmax are computed in float32, and the output is float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import conv as conv_lib
from diffusion_jax.models.conv import Conv, conv2d
from diffusion_jax.models.dropout import Dropout

Dtype = Any

_NUM_GROUPS = 32
_GROUP_NORM_EPSILON = 1e-6
# DDPM's ``default_init(scale)`` turns ``init_scale=0`` into 1e-10 (TF's variance_scaling
# needs a positive scale): these layers start near zero, so each block starts near identity.
_ZERO_INIT_SCALE = 1e-10


def default_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """DDPM's ``default_init``: ``variance_scaling(scale, 'fan_avg', 'uniform')``."""
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep embedding, DDPM's ``get_timestep_embedding``.

    This is the Transformer position encoding (Vaswani et al. 2017, section 3.5) as DDPM
    writes it: with ``half = dim // 2`` and frequencies
    ``f_i = exp(-log(max_period) * i / (half - 1))`` for ``i = 0 .. half-1``, the embedding
    is ``[sin(t * f_0), ..., sin(t * f_{half-1}), cos(t * f_0), ..., cos(t * f_{half-1})]``,
    zero-padded by one column when ``dim`` is odd.

    Args:
      t: timesteps, shape ``(B,)``, any integer or float dtype (cast to float32).
      dim: embedding width, at least 4 (so that ``half - 1 > 0``).
      max_period: the longest period; the frequencies span ``[1/max_period, 1]``.

    Returns:
      float32 array of shape ``(B, dim)``.
    """
    if jnp.ndim(t) != 1:
        raise ValueError(f"timestep_embedding: t must have shape (B,), got shape {jnp.shape(t)}")
    if dim < 4:
        raise ValueError(f"timestep_embedding: dim must be at least 4, got {dim}")
    half = dim // 2
    exponent = -math.log(max_period) / (half - 1)
    frequencies = jnp.exp(jnp.arange(half, dtype=jnp.float32) * exponent)
    angles = jnp.asarray(t, jnp.float32)[:, None] * frequencies[None, :]
    embedding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    if dim % 2 == 1:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


class ResnetBlock(nn.Module):
    """DDPM's ``resnet_block``: a wide-ResNet block conditioned on the time embedding.

    ``h = conv1(swish(norm1(x))) + dense(swish(temb))``, then
    ``h = conv2(dropout(swish(norm2(h))))`` with ``conv2`` initialised near zero, and the
    output is ``shortcut(x) + h``, the shortcut a 1x1 projection (DDPM's ``nin``) when the
    channel count changes.

    Input ``x`` (B, H, W, C_in), ``temb`` (B, E); output (B, H, W, out_ch) in ``dtype``.
    """

    out_ch: int
    dropout: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rng: str = "hash"
    cpu_kernels: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = dict(dense, cpu_kernels=self.cpu_kernels)
        h = nn.swish(_group_norm(self, "norm1")(x))
        h = Conv(self.out_ch, (3, 3), kernel_init=default_init(), name="conv1", **conv)(h)
        temb_proj = nn.Dense(self.out_ch, kernel_init=default_init(), name="temb_proj", **dense)
        h = h + temb_proj(nn.swish(temb))[:, None, None, :]
        h = nn.swish(_group_norm(self, "norm2")(h))
        h = Dropout(self.dropout, deterministic=not train, rng=self.dropout_rng)(h)
        h = Conv(
            self.out_ch, (3, 3), kernel_init=default_init(_ZERO_INIT_SCALE), name="conv2", **conv
        )(h)
        if x.shape[-1] != self.out_ch:
            x = _Pointwise(self.out_ch, cpu_kernels=self.cpu_kernels, name="nin_shortcut",
                           **dense)(x)
        return x + h


class _Pointwise(nn.Module):
    """DDPM's ``nin`` (a 1x1 convolution): what ``nn.Dense(features)`` computes over the
    channels of a (B, H, W, C) input, with its parameters (``kernel`` (C, features),
    ``bias``), initialisers and dtype promotion. With ``cpu_kernels='onednn'`` it is
    computed as a 1x1 convolution by oneDNN (`diffusion_jax.models.conv.conv2d`)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cpu_kernels: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", default_init(), (x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.cpu_kernels == "onednn":
            y = conv2d(x, kernel[None, None], (1, 1), ((0, 0), (0, 0)), cpu_kernels="onednn")
        else:  # nn.Dense's own contraction
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y + bias.reshape(1, 1, 1, -1)


class AttnBlock(nn.Module):
    """DDPM's ``attn_block``: single-head self-attention over all H*W positions.

    ``q, k, v`` are 1x1 projections of ``GroupNorm(x)``; the output is
    ``softmax(q k^T / sqrt(C)) v`` (Vaswani et al. 2017, eq. 1), computed by
    `attention`; the output projection is initialised near zero and added to ``x``.

    Input and output (B, H, W, C), output in ``dtype``.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _group_norm(self, "norm")(x)
        q = nn.Dense(channels, kernel_init=default_init(), name="q", **dense)(h)
        k = nn.Dense(channels, kernel_init=default_init(), name="k", **dense)(h)
        v = nn.Dense(channels, kernel_init=default_init(), name="v", **dense)(h)
        shape = (batch, height * width, channels)
        h = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape))
        h = h.reshape(batch, height, width, channels)
        h = nn.Dense(
            channels, kernel_init=default_init(_ZERO_INIT_SCALE), name="proj_out", **dense
        )(h)
        return x + h


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head ``softmax(q k^T / sqrt(C)) v`` for (B, L, C) queries, keys and values.

    Through ``jax.nn.dot_product_attention`` (``implementation=None``: JAX picks the
    kernel, cuDNN's fused one on GPUs where it applies, XLA's elsewhere), whose logits
    are accumulated and whose softmax is computed in float32 under bfloat16 or float16
    inputs, the output in the inputs' dtype. That function's softmax is float32 for every
    input dtype, so for inputs wider than float32 (float64 references and derivative
    checks) the same formula is written out in the inputs' dtype.
    """
    if jnp.finfo(q.dtype).bits > 32:
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (q.shape[-1] ** -0.5)
        return jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), v)
    out = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                       implementation=None)
    return out[:, :, 0]


class Downsample(nn.Module):
    """DDPM's ``downsample``: a 3x3 stride-2 conv ('SAME' padding, as TF), or 2x2 average
    pooling when ``with_conv`` is False. (B, H, W, C) -> (B, H/2, W/2, C)."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cpu_kernels: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        return Conv(
            x.shape[-1],
            (3, 3),
            strides=(2, 2),
            kernel_init=default_init(),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            cpu_kernels=self.cpu_kernels,
            name="conv",
        )(x)


class Upsample(nn.Module):
    """DDPM's ``upsample``: nearest-neighbour x2, then a 3x3 conv when ``with_conv``.
    (B, H, W, C) -> (B, 2H, 2W, C).

    With the conv, the upsampled image is never formed: see `_UpsampleConv`.
    """

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cpu_kernels: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            batch, height, width, channels = x.shape
            # Nearest neighbour as a broadcast and a reshape: no gather, no resize kernel.
            return jnp.broadcast_to(
                x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels)
            ).reshape(batch, 2 * height, 2 * width, channels)
        return _UpsampleConv(
            x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
            cpu_kernels=self.cpu_kernels, name="conv",
        )(x)


# Nearest-neighbour upsampling followed by a 3x3 'SAME' conv, per output phase: output row
# 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are input rows (i - 1, i, i)
# for a = 0 and (i, i, i + 1) for a = 1. So each phase sees two input rows, and the
# kernel rows that land on the same input row add up: _PHASE_TAPS[a] maps the 3 kernel
# rows to the 2 taps (the same holds for columns).
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
               ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


class _UpsampleConv(nn.Module):
    """``conv3x3(upsample2x_nearest(x))`` as four 2x2 convs of ``x``, one per output phase.

    The same result (up to float rounding) with 16 instead of 36 multiply-adds per input
    pixel and channel pair, and without the 4x larger upsampled activation; its gradient
    is cheaper in the same ratio. The parameters are those of ``nn.Conv(features, (3, 3))``
    (``kernel`` (3, 3, C, features), ``bias``), created in the same order with the same
    initialisers, so the parameter tree and its initial values are DDPM's.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cpu_kernels: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        kernel = self.param(
            "kernel", default_init(), (3, 3, channels, self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
        # kernels[a, b]: the 2x2 kernel of output phase (a, b), summed in param_dtype.
        kernels = jnp.einsum("api,bqj,ijco->abpqco", taps, taps, kernel)
        x, kernels, bias = nn.dtypes.promote_dtype(x, kernels, bias, dtype=self.dtype)
        rows = []
        for a in range(2):
            phases = []
            for b in range(2):
                # Phase 0 reads (i - 1, i): pad one before; phase 1 reads (i, i + 1).
                padding = ((1 - a, a), (1 - b, b))
                phases.append(conv2d(
                    x, kernels[a, b], (1, 1), padding, cpu_kernels=self.cpu_kernels))
            rows.append(jnp.stack(phases, axis=3))  # (B, H, W, 2 [b], F)
        y = jnp.stack(rows, axis=2)  # (B, H, 2 [a], W, 2 [b], F)
        return y.reshape(batch, 2 * height, 2 * width, self.features) + bias.reshape(1, 1, 1, -1)


def _group_norm(module: nn.Module, name: str) -> "GroupNorm":
    """GroupNorm as DDPM (tf.contrib group_norm: 32 groups, eps 1e-6), statistics in
    float32 with the two-pass variance, output in the module's compute dtype."""
    return GroupNorm(dtype=module.dtype, param_dtype=module.param_dtype, name=name)


class GroupNorm(nn.Module):
    """Group normalisation (Wu and He 2018) over (H, W, channels of a group), NHWC.

    Computes what flax's ``nn.GroupNorm(num_groups, epsilon, use_fast_variance=False)``
    computes, with the same ``scale`` and ``bias`` parameters: float32 (or wider)
    statistics, the two-pass variance, ``y = xhat * scale + bias`` with
    ``xhat = (x - mean) * rsqrt(var + eps)``. Statistics are summed per channel first, in
    the NHWC layout (a grouped (..., G, C/G) layout leaves a minor axis of 2 to 8 elements
    that does not vectorise). Its derivative is a ``custom_jvp`` (`_group_norm_jvp`): one
    reduction pass and one elementwise pass, linear in the tangents, so JAX transposes it
    for reverse mode and differentiates it again for higher orders; ``jvp``, ``grad``,
    ``linearize``, ``jacfwd`` and Hessian-vector products all work. Outputs agree with
    flax's to float rounding.
    """

    num_groups: int = _NUM_GROUPS
    epsilon: float = _GROUP_NORM_EPSILON
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype)
        return _group_norm_fn(x, scale, bias, self.num_groups, self.epsilon, self.dtype)


def _per_channel_sums(x: jax.Array) -> jax.Array:
    """(B, ..., C) -> (B, C): sums over the spatial axes, in the input's layout (channels
    stay the contiguous axis, so the reduction vectorises)."""
    return x.sum(tuple(range(1, x.ndim - 1)))


def _group_means(sums: jax.Array, num_groups: int, count: int) -> jax.Array:
    """(B, C) per-channel sums -> (B, C): the mean over each channel's group, repeated
    over the group's channels."""
    batch, channels = sums.shape
    means = sums.reshape(batch, num_groups, channels // num_groups).sum(-1) / count
    return jnp.repeat(means, channels // num_groups, axis=-1)


def _spatial(v: jax.Array, ndim: int) -> jax.Array:
    """(B, C) -> (B, 1, ..., 1, C), to broadcast against a rank-``ndim`` activation."""
    return v.reshape(v.shape[:1] + (1,) * (ndim - 2) + v.shape[1:])


def _normalise(x, num_groups, epsilon):
    """(xhat, rstd) of ``x`` in float32 or wider: xhat = (x - mean) * rstd per group and
    example, rstd = rsqrt(var + epsilon) (two-pass variance), rstd as (B, 1, .., 1, C)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    count = math.prod(x.shape[1:]) // num_groups  # elements per group and example
    mean = _spatial(_group_means(_per_channel_sums(xf), num_groups, count), x.ndim)
    centred = xf - mean
    var = _group_means(_per_channel_sums(jnp.square(centred)), num_groups, count)
    rstd = _spatial(jax.lax.rsqrt(var + epsilon), x.ndim)
    return centred * rstd, rstd


def _channels(v: jax.Array, ndim: int) -> jax.Array:
    """(C,) -> (1, ..., 1, C)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _group_norm_fn(x, scale, bias, num_groups, epsilon, dtype):
    xhat, _ = _normalise(x, num_groups, epsilon)
    y = xhat * _channels(scale, x.ndim) + _channels(bias, x.ndim)
    return y.astype(dtype)


@_group_norm_fn.defjvp
def _group_norm_jvp(num_groups, epsilon, dtype, primals, tangents):
    """With xhat = (x - mean) * rstd, per group of n elements (Wu and He 2018, eq. 1-3
    differentiated): dxhat = rstd * (dx - mean(dx) - xhat * mean(dx * xhat)), and
    dy = dxhat * scale + xhat * dscale + dbias. One reduction pass (per-channel sums of
    dx and dx * xhat) and one elementwise pass."""
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    xhat, rstd = _normalise(x, num_groups, epsilon)
    y = xhat * _channels(scale, x.ndim) + _channels(bias, x.ndim)
    count = math.prod(x.shape[1:]) // num_groups
    dxf = dx.astype(xhat.dtype)
    mean_dx = _spatial(_group_means(_per_channel_sums(dxf), num_groups, count), x.ndim)
    mean_dx_xhat = _spatial(
        _group_means(_per_channel_sums(dxf * xhat), num_groups, count), x.ndim)
    dxhat = rstd * (dxf - mean_dx - xhat * mean_dx_xhat)
    dy = (dxhat * _channels(scale, x.ndim) + xhat * _channels(dscale, x.ndim)
          + _channels(dbias, x.ndim))
    return y.astype(dtype), dy.astype(dtype)


class UNet(nn.Module):
    """The DDPM noise-prediction network (Ho et al. 2020, appendix B).

    The defaults are the CIFAR-10 model (35,746,307 parameters for 32x32x3 input). For
    LSUN/CelebA-HQ 256 DDPM uses ``ch_mult=(1, 1, 2, 2, 4, 4)``, ``dropout=0.0``.

    Attributes:
      ch: base channel count; level ``i`` has ``ch * ch_mult[i]`` channels, the time
        embedding ``4 * ch``. Every ``ch * ch_mult[i]`` must be divisible by 32 (GroupNorm).
      ch_mult: channel multiplier per resolution level; ``len(ch_mult) - 1`` downsamplings.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes (height) at which self-attention follows each block.
      dropout: dropout rate inside the residual blocks, used only when ``train=True``.
      out_channels: output channels; None means the input's (predicting the noise). Pass
        ``2 * C`` for a model that also outputs variances (improved DDPM).
      num_classes: if set, a learned class embedding is added to the time embedding and
        ``y`` is required.
      null_class: embed one more class, id ``num_classes``: the unconditional model of
        classifier-free guidance (`diffusion_jax.guidance`).
      resamp_with_conv: use convs in the down/upsampling layers (DDPM: True).
      dtype: compute dtype of convs and dense layers (e.g. ``jnp.bfloat16``).
      param_dtype: dtype of the parameters.
      cpu_kernels: 'none' (default: XLA's convolutions, every backend, every
        transformation) or an opt-in set of float32 CPU kernels, 'dilated' or 'onednn'
        (reverse-mode differentiation only; `diffusion_jax.models.conv`).
      dropout_rng: how the dropout masks are drawn: 'hash' (a counter-based hash, fast
        on every backend) or 'jax' (``jax.random.bernoulli``, flax's ``nn.Dropout``);
        see `diffusion_jax.models.dropout`.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    out_channels: int | None = None
    num_classes: int | None = None
    null_class: bool = False
    resamp_with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dropout_rng: str = "hash"
    cpu_kernels: str = "none"

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool
    ) -> jax.Array:
        """Predicts the noise (or mean/x_0 and variances) for a batch of noisy images.

        Args:
          x: noisy images ``x_t``, shape (B, H, W, C), float; H and W divisible by
            ``2 ** (len(ch_mult) - 1)``.
          t: timesteps, int32 of shape (B,).
          y: class labels, int32 of shape (B,) in ``[0, num_classes)`` (``num_classes``:
            the null class, with ``null_class``), only when ``num_classes`` is set (the
            range is the caller's duty inside ``jit``).
          train: enables dropout, which then draws from the ``'dropout'`` rng.

        Returns:
          float32 (float64 for dtype float64) array of shape (B, H, W, out_channels or C).
        """
        self._check_inputs(x, t, y)
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.cpu_kernels not in conv_lib.CPU_KERNELS:
            raise ValueError(f"UNet cpu_kernels must be one of {list(conv_lib.CPU_KERNELS)}; "
                             f"got {self.cpu_kernels!r}.")
        conv = dict(kwargs, cpu_kernels=self.cpu_kernels)
        out_channels = self.out_channels or x.shape[-1]

        temb = timestep_embedding(t, self.ch)
        temb = nn.Dense(4 * self.ch, kernel_init=default_init(), name="temb_dense0", **kwargs)(
            temb
        )
        temb = nn.Dense(4 * self.ch, kernel_init=default_init(), name="temb_dense1", **kwargs)(
            nn.swish(temb)
        )
        if self.num_classes is not None:
            num_embedded = self.num_classes + int(self.null_class)
            temb = temb + nn.Embed(num_embedded, 4 * self.ch, name="class_embed", **kwargs)(y)

        def resnet_block(h, out_ch, name):
            return ResnetBlock(out_ch, self.dropout, dropout_rng=self.dropout_rng, name=name,
                               **conv)(
                h, temb, train=train)

        # Downsampling: keep every intermediate output as a skip connection.
        hs = [Conv(self.ch, (3, 3), kernel_init=default_init(), name="conv_in", **conv)(x)]
        for level, mult in enumerate(self.ch_mult):
            for block in range(self.num_res_blocks):
                h = resnet_block(hs[-1], self.ch * mult, f"down_{level}_block_{block}")
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(name=f"down_{level}_attn_{block}", **kwargs)(h)
                hs.append(h)
            if level != len(self.ch_mult) - 1:
                name = f"down_{level}_downsample"
                hs.append(Downsample(self.resamp_with_conv, name=name, **conv)(hs[-1]))

        # Middle.
        h = hs[-1]
        h = resnet_block(h, h.shape[-1], "mid_block_1")
        h = AttnBlock(name="mid_attn_1", **kwargs)(h)
        h = resnet_block(h, h.shape[-1], "mid_block_2")

        # Upsampling: num_res_blocks + 1 blocks per level, each consuming one skip.
        for level in reversed(range(len(self.ch_mult))):
            for block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = resnet_block(h, self.ch * self.ch_mult[level], f"up_{level}_block_{block}")
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(name=f"up_{level}_attn_{block}", **kwargs)(h)
            if level != 0:
                name = f"up_{level}_upsample"
                h = Upsample(self.resamp_with_conv, name=name, **conv)(h)
        assert not hs, "every skip connection must be consumed"

        h = nn.swish(_group_norm(self, "norm_out")(h))
        h = Conv(
            out_channels,
            (3, 3),
            kernel_init=default_init(_ZERO_INIT_SCALE),
            name="conv_out",
            **conv,
        )(h)
        return h.astype(jnp.promote_types(self.dtype, jnp.float32))  # float64 stays

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None) -> None:
        """Static (trace-time) checks of the configuration and the input shapes."""
        for level, mult in enumerate(self.ch_mult):
            if (self.ch * mult) % _NUM_GROUPS:
                raise ValueError(
                    f"UNet config: ch * ch_mult[{level}] = {self.ch} * {mult} = "
                    f"{self.ch * mult} channels is not divisible by the {_NUM_GROUPS} "
                    "GroupNorm groups"
                )
        if jnp.ndim(x) != 4:
            raise ValueError(f"UNet: x must be NHWC (rank 4), got shape {jnp.shape(x)}")
        batch, height, width, _ = x.shape
        factor = 2 ** (len(self.ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"UNet: height and width must be divisible by 2**(len(ch_mult)-1) = {factor}, "
                f"got x of shape {x.shape}"
            )
        if jnp.shape(t) != (batch,):
            raise ValueError(f"UNet: t must have shape (B,) = ({batch},), got shape {jnp.shape(t)}")
        if self.null_class and self.num_classes is None:
            raise ValueError("UNet: null_class=True needs num_classes (the real classes)")
        if self.num_classes is None and y is not None:
            raise ValueError("UNet: y (class labels) given but the model has num_classes=None")
        if self.num_classes is not None:
            if y is None:
                raise ValueError(
                    f"UNet: y (class labels) is required when num_classes={self.num_classes}"
                )
            if jnp.shape(y) != (batch,):
                raise ValueError(
                    f"UNet: y must have shape (B,) = ({batch},), got shape {jnp.shape(y)}"
                )
