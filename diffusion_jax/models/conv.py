"""2-D convolution (NHWC / HWIO) whose weight gradient can be computed in another form.

Differentiating a convolution gives XLA a weight-gradient convolution: the input
convolved with dL/dy, contracting over the batch, with a window as large as the image.
On the CPU, XLA hands that shape to YNNPACK, whose kernel for it is slow on large images
with many channels (32x32x128 at batch 32: 70-110 GFLOP/s where the forward convolution
runs at 180; see the README's Performance section).

``weight_grad='dilated'`` computes the same sum as a convolution of the input dilated by
2 (a zero between neighbouring pixels, ``lhs_dilation``) with dL/dy dilated by 2 (times
the stride) and a window stride of 2: every tap of the dilated window lands on a real
pixel, so the result is exactly the weight gradient (up to float rounding), while XLA's
CPU backend runs a convolution with input dilation in Eigen's kernel rather than
YNNPACK's (YNNPACK declines it), which runs this shape at 130-195 GFLOP/s. The forward
convolution and the input gradient stay as XLA writes them.

``weight_grad='auto'`` (the default of `Conv` and the U-Net) takes 'dilated' for float32
convolutions on the CPU backend (``jax.default_backend()`` when the function is traced)
and 'xla' everywhere else: GPUs and TPUs have their own fast weight-gradient kernels, and
XLA's CPU backend has no Eigen convolution in bfloat16.

Measured on a 2-core x86 CPU (train steps, the two forms alternated in one process): the
DDPM CIFAR U-Net at batch 32 runs 6-11 % faster in the dilated form (one device 3.7 to
4.1 images/s; one device per core 3.8-4.1 to 4.1-4.4), while the 4.4M U-Net (ch 64,
batch 16) runs 4-6 % slower (19.3 to 18.1 and 24.9 to 23.8). The sizes of the
convolutions do not explain the difference: keeping only those with 4 GFLOP or more of
weight gradient in the dilated form gave the CIFAR step nothing (3.8 and 4.2 images/s
against XLA's 3.8 and 4.3), though they hold most of its weight-gradient work, so the
whole-step effect does not follow the single kernels' figures and is not understood; and
the digits config's U-Net, smaller still (8x8 images, ch 32, batch 64),
trains faster in the dilated form (76 against 89 ms per step). Time both forms on the
network at hand (``experiments/benchmark.py --conv-weight-grad``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import onednn
from diffusion_jax.models._custom_conv import conv_with_gradients

WEIGHT_GRADS = ("auto", "xla", "dilated")
IMPLS = ("xla", "onednn")
# What a config may name: 'auto' is resolved to one of IMPLS by `resolve_impl`.
IMPL_CHOICES = ("auto", *IMPLS)
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# The weight gradient as a convolution: the input's channels are its batch and the
# batch its features; dL/dy is the kernel (batch in, channels out); the output is HWIO.
_WEIGHT_GRAD_DIMENSION_NUMBERS = ("CHWN", "IHWO", "HWNC")
_DILATION = 2

Padding = tuple[tuple[int, int], tuple[int, int]]


def resolve_weight_grad(weight_grad: str, dtype: Any) -> str:
    """'xla' or 'dilated' for a convolution computing in ``dtype`` (see the module doc).

    Raises:
      ValueError: ``weight_grad`` is not one of `WEIGHT_GRADS`.
    """
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(
            f"conv weight_grad must be one of {WEIGHT_GRADS}; got {weight_grad!r}."
        )
    if weight_grad != "auto":
        return weight_grad
    cpu_float32 = jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32
    return "dilated" if cpu_float32 else "xla"


def resolve_impl(impl: str, dtype: Any) -> tuple[str, str]:
    """(``impl``, why) with 'auto' resolved for convolutions computing in ``dtype``:
    'onednn' for float32 on the CPU backend where oneDNN can be built and loaded
    (`diffusion_jax.models.onednn`; on a 2-core x86 CPU it trains the DDPM CIFAR U-Net
    12 % faster than XLA's convolutions and the 4.4M one 21-43 %, README Performance),
    else 'xla'. Calling it
    with 'auto' on a CPU builds the oneDNN handlers if they are not cached.

    Raises:
      ValueError: ``impl`` is not one of `IMPL_CHOICES`.
    """
    if impl not in IMPL_CHOICES:
        raise ValueError(f"conv impl must be one of {IMPL_CHOICES}; got {impl!r}.")
    if impl != "auto":
        return impl, "asked for"
    if jax.default_backend() != "cpu":
        return "xla", f"the {jax.default_backend()} backend has its own convolutions"
    if jnp.dtype(dtype) != jnp.float32:
        return "xla", f"oneDNN convolutions here are float32 and the model computes in {dtype}"
    reason = onednn.unavailable_reason()
    if reason is not None:
        return "xla", reason
    return "onednn", "float32 on the CPU with oneDNN available"


def _conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS)


def dilated_weight_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                        strides: tuple[int, int], padding: Padding) -> jax.Array:
    """dL/dkernel of ``conv2d(x, kernel, strides, padding)`` given ``dy`` = dL/dy, as one
    convolution of the 2-dilated input by the 2-dilated ``dy`` with window stride 2.

    Kernel tap ``k`` and output pixel ``o`` read input pixel ``o * stride + k - pad_lo``;
    in the dilated input that pixel sits at ``2 * (o * stride + k)`` (with the padding
    dilated too), which a window starting at ``2 * k`` (window stride 2) with taps every
    ``2 * stride`` reaches. The high padding is what makes exactly ``kernel_size``
    windows fit (negative when the last input rows are never read, as in 'SAME' with
    stride 2 and an odd size).
    """
    d = _DILATION
    pads = []
    for axis, (size_k, stride, (lo, _)) in enumerate(zip(kernel_shape[:2], strides, padding)):
        size_in, size_out = x.shape[1 + axis], dy.shape[1 + axis]
        hi = size_k + (size_out - 1) * stride - size_in - lo
        pads.append((d * lo, d * hi))
    return jax.lax.conv_general_dilated(
        x, dy, (d, d), pads, lhs_dilation=(d, d),
        rhs_dilation=(d * strides[0], d * strides[1]),
        dimension_numbers=_WEIGHT_GRAD_DIMENSION_NUMBERS,
    )


def _input_grad(x, kernel, dy, strides, padding):
    # The transpose of the convolution in x alone: no forward pass inside it.
    (dx,) = jax.linear_transpose(lambda x_: _conv(x_, kernel, strides, padding), x)(dy)
    return dx


def _dilated_weight_grad(x, kernel, dy, strides, padding):
    return dilated_weight_grad(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)


_conv_dilated_weight_grad = conv_with_gradients(_conv, _input_grad, _dilated_weight_grad)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: str | Sequence[tuple[int, int]] = "SAME", *,
           weight_grad: str = "auto", impl: str = "xla") -> jax.Array:
    """``lax.conv_general_dilated`` for NHWC input and an HWIO kernel, with the weight
    gradient in the form ``weight_grad`` names (see the module doc).

    Args:
      x: (B, H, W, C_in).
      kernel: (KH, KW, C_in, C_out), the same dtype as ``x``.
      strides: window strides (rows, columns).
      padding: 'SAME', 'VALID', or ((lo, hi), (lo, hi)) per spatial axis.
      weight_grad: 'auto' | 'xla' | 'dilated'. The value is the same in every form; only
        the program computing dL/dkernel differs.
      impl: 'xla' (XLA's convolution, with ``weight_grad``) or 'onednn' (all three passes
        by oneDNN through XLA's FFI, float32 on the CPU; `diffusion_jax.models.onednn`;
        ``weight_grad`` does not apply).

    Raises:
      ValueError: a bad ``weight_grad`` or ``impl``, or ``x`` / ``kernel`` not rank 4.
      onednn.OneDNNUnavailableError: ``impl='onednn'`` where oneDNN cannot be used.
    """
    if jnp.ndim(x) != 4 or jnp.ndim(kernel) != 4:
        raise ValueError(
            f"conv2d: x must be NHWC and kernel HWIO (rank 4); got shapes {jnp.shape(x)} "
            f"and {jnp.shape(kernel)}"
        )
    strides = tuple(int(s) for s in strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if impl not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}; got {impl!r}.")
    if impl == "onednn":
        return onednn.conv2d(x, kernel, strides, padding)
    if resolve_weight_grad(weight_grad, x.dtype) == "dilated":
        return _conv_dilated_weight_grad(x, kernel, strides, padding)
    return _conv(x, kernel, strides, padding)


class Conv(nn.Module):
    """``nn.Conv(features, kernel_size, strides, padding='SAME')`` for NHWC input, with
    the same parameters (``kernel`` (KH, KW, C_in, features), ``bias``), initialisers and
    dtype promotion, computed by `conv2d` with ``weight_grad`` and ``impl``."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    weight_grad: str = "auto"
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init,
                            (*kernel_size, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, "SAME", weight_grad=self.weight_grad,
                   impl=self.impl)
        return y + bias.reshape(1, 1, 1, -1)
