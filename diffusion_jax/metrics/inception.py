"""The FID Inception network of pytorch-fid in Flax (Szegedy et al. 2016, Inception-v3).

This is the network behind the field's FID and Inception Score numbers: TensorFlow's 2015
Inception graph (``inception-2015-12-05``) as ported by pytorch-fid
(``pytorch_fid.inception.fid_inception_v3``), which differs from torchvision's
Inception-v3 in three places, all reproduced here:

- 1008 output classes;
- the average pools inside the Mixed_5*, Mixed_6b-6e and Mixed_7b blocks
  (``FIDInceptionA``, ``FIDInceptionC``, ``FIDInceptionE_1``) do not count the zero padding
  (``count_include_pad=False``, as TensorFlow's pool);
- the pool of the last block (Mixed_7c, ``FIDInceptionE_2``) is a 3x3 *max* pool.

Input pipeline, as ``pytorch_fid.inception.InceptionV3.forward``: images in [0, 1] are
resized to 299x299 by bilinear interpolation with ``align_corners=False`` and no
anti-aliasing (``F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)``;
`resize_bilinear` reproduces it, also when shrinking), then scaled to [-1, 1] by ``2x - 1``.

Layout: NHWC (the PyTorch weights are NCHW/OIHW; `weights.py` converts them). Every
convolution is followed by batch normalisation with its running statistics (eps 1e-3) and
a ReLU (torchvision's ``BasicConv2d``). Module names equal the PyTorch state-dict names, so
``Mixed_6b.branch7x7_2.conv.weight`` becomes ``params/Mixed_6b/branch7x7_2/conv/kernel``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["InceptionV3", "resize_bilinear", "bilinear_matrix", "INPUT_SIZE", "NUM_CLASSES",
           "FEATURE_DIM"]

INPUT_SIZE = 299
NUM_CLASSES = 1008
FEATURE_DIM = 2048
_BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix of PyTorch's bilinear weights, align_corners=False.

    Row ``o`` samples the input at ``src = max((o + 0.5) * in_size / out_size - 0.5, 0)``
    between ``i0 = floor(src)`` and ``i1 = min(i0 + 1, in_size - 1)`` with weights
    ``1 - (src - i0)`` and ``src - i0`` (ATen's ``upsample_bilinear2d``: no anti-aliasing,
    so shrinking samples two pixels per output pixel as growing does). ``src`` and the
    weights are computed in float32 as ATen's compiled kernel does (its multiply-add
    fused: one rounding); computed in float64 they would differ from PyTorch's by up to
    ~1e-4 of a pixel value for inputs of several hundred pixels.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    centres = np.arange(out_size, dtype=f32) + f32(0.5)
    src = np.maximum((np.float64(scale) * centres - 0.5).astype(f32), f32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0.astype(f32)).astype(f32)
    matrix = np.zeros((out_size, in_size), f32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, i0), f32(1) - frac)
    np.add.at(matrix, (rows, i1), frac)
    return matrix


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """(B, H, W, C) -> (B, size, size, C), as ``F.interpolate(mode='bilinear',
    align_corners=False)`` (separable: rows, then columns; two float32 matmuls)."""
    _, h, w, _ = images.shape
    rows = jnp.asarray(bilinear_matrix(h, size), images.dtype)
    cols = jnp.asarray(bilinear_matrix(w, size), images.dtype)
    x = jnp.einsum("oh,bhwc->bowc", rows, images, precision=_HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=_HIGHEST)


class BasicConv2d(nn.Module):
    """Convolution (no bias) -> batch norm (running statistics, eps 1e-3) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 average, stride 1, padding 1, padding not counted (TensorFlow's pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int = 1, pad: int = 1):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """pytorch-fid's FIDInceptionA: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (Mixed_6a): a grid reduction, stride 2."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        bp = _max_pool_3x3(x, stride=2, pad=0)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    """pytorch-fid's FIDInceptionC: factorised 7x7 branches and avgpool-1x1."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (Mixed_7a): a grid reduction, stride 2."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        bp = _max_pool_3x3(x, stride=2, pad=0)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (``max_pool=False``: average pool without padding
    counted) and FIDInceptionE_2 (``max_pool=True``: the last block's 3x3 max pool)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception: images -> 2048-d pool features and 1008 logits.

    Call with ``images`` float (B, H, W, 3) in [0, 1] (any H, W >= 75 when
    ``resize_input=False``). Returns a dict:

    - ``pool``: (B, 2048) float32, the global average pool after Mixed_7c: the FID features
      (pytorch-fid's ``InceptionV3([3])`` output, flattened);
    - ``logits``: (B, 1008) ``fc(pool)``, the classifier of ``fid_inception_v3()``;
    - ``logits_unbiased``: (B, 1008) ``pool @ fc.weight.T`` without the bias, what the
      Inception Score of Salimans et al. (2016)'s code and torch-fidelity use.
    """

    resize_input: bool = True
    normalize_input: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, self.dtype)
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE)
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, stride=2, pad=0)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, stride=2, pad=0)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, precision=_HIGHEST, name="fc")
        logits = fc(pool)
        unbiased = jnp.dot(pool, fc.variables["params"]["kernel"], precision=_HIGHEST)
        return {"pool": pool, "logits": logits, "logits_unbiased": unbiased}
