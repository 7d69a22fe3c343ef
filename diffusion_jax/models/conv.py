"""The one place where the U-Net's 2-D convolutions (NHWC / HWIO) are chosen.

By default (``cpu_kernels='none'``) every convolution is ``lax.conv_general_dilated``:
XLA's own convolution on every backend, differentiable in every direction (``grad``,
``jvp``, ``jacfwd``, ``linearize``, Hessian-vector products), batchable and shardable.

``cpu_kernels`` names an opt-in set of CPU kernels, for float32 on the CPU backend only
(`check_cpu_kernels` refuses it elsewhere, at config time, with the reason):

- ``'dilated'``: XLA's convolution, with its weight gradient computed as a convolution of
  the 2-dilated input by the 2-dilated ``dL/dy`` with window stride 2 (`dilated_weight_grad`,
  a ``custom_vjp``). XLA's CPU backend hands the plain weight-gradient shape to YNNPACK,
  slow on large images with many channels; the dilated form runs in Eigen's kernel.
  Nothing is compiled. Reverse mode only (a ``custom_vjp`` has no forward-mode rule).
- ``'onednn'``: all three passes of every convolution (and the U-Net's 1x1 projections)
  by oneDNN through XLA's FFI (`diffusion_jax.models.onednn`), compiled on first use with
  the system's C++ compiler against the wheels of the ``onednn`` install extra
  (``pip install -e ".[onednn]"``). Reverse mode only.

`conv2d` is the switch: every convolution of the models goes through it with the
``cpu_kernels`` name, and only ``'onednn'`` imports (and builds) the oneDNN module. The
README's Performance section has the measured figures of each form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models._custom_conv import conv_with_gradients

# The opt-in CPU kernels (module doc); 'none' is the default path.
CPU_KERNELS = ("none", "dilated", "onednn")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# The weight gradient as a convolution: the input's channels are its batch and the
# batch its features; dL/dy is the kernel (batch in, channels out); the output is HWIO.
_WEIGHT_GRAD_DIMENSION_NUMBERS = ("CHWN", "IHWO", "HWNC")
_DILATION = 2

Padding = tuple[tuple[int, int], tuple[int, int]]


def check_cpu_kernels(cpu_kernels: str, dtype: Any, *, field: str = "model.cpu_kernels",
                      build: bool = True) -> None:
    """Stops, before anything is traced, when ``cpu_kernels`` cannot run here.

    'none' runs everywhere. 'dilated' and 'onednn' need the CPU backend and float32
    compute; 'onednn' also needs x86_64 Linux, oneDNN's wheels and a C++ compiler, and
    (with ``build``) builds its handlers now, so that a failure to build stops here.

    Raises:
      ValueError: an unknown name (the valid ones listed), or the cause why the opt-in
        cannot run here and the alternative.
    """
    if cpu_kernels not in CPU_KERNELS:
        raise ValueError(f"{field} must be one of {list(CPU_KERNELS)}; got {cpu_kernels!r}.")
    if cpu_kernels == "none":
        return
    alternative = f"Use {field}='none' (XLA's convolutions, every backend and dtype)."
    backend = jax.default_backend()
    if backend != "cpu":
        raise ValueError(f"{field}={cpu_kernels!r} are CPU kernels; the default JAX "
                         f"backend here is {backend!r}. {alternative}")
    if jnp.dtype(dtype) != jnp.float32:
        raise ValueError(f"{field}={cpu_kernels!r} computes in float32; the model computes "
                         f"in {jnp.dtype(dtype).name}. {alternative}")
    if cpu_kernels == "onednn":
        from diffusion_jax.models import onednn  # only when asked for

        reason = onednn.unavailable_reason(build=build)
        if reason is not None:
            raise ValueError(f"{field}='onednn' cannot run here: {reason} {alternative}")


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
           cpu_kernels: str = "none") -> jax.Array:
    """``lax.conv_general_dilated`` for NHWC input and an HWIO kernel, computed by the
    kernels ``cpu_kernels`` names (module doc; the value is the same in every form).

    Args:
      x: (B, H, W, C_in).
      kernel: (KH, KW, C_in, C_out), the same dtype as ``x``.
      strides: window strides (rows, columns).
      padding: 'SAME', 'VALID', or ((lo, hi), (lo, hi)) per spatial axis.
      cpu_kernels: 'none' (XLA's convolution, the default), 'dilated' or 'onednn'.

    Raises:
      ValueError: an unknown ``cpu_kernels``, or ``x`` / ``kernel`` not rank 4.
      onednn.OneDNNUnavailableError: ``cpu_kernels='onednn'`` where oneDNN cannot be used.
    """
    if jnp.ndim(x) != 4 or jnp.ndim(kernel) != 4:
        raise ValueError(
            f"conv2d: x must be NHWC and kernel HWIO (rank 4); got shapes {jnp.shape(x)} "
            f"and {jnp.shape(kernel)}"
        )
    if cpu_kernels not in CPU_KERNELS:
        raise ValueError(f"cpu_kernels must be one of {list(CPU_KERNELS)}; got {cpu_kernels!r}.")
    strides = tuple(int(s) for s in strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if cpu_kernels == "onednn":
        from diffusion_jax.models import onednn  # only when asked for

        return onednn.conv2d(x, kernel, strides, padding)
    if cpu_kernels == "dilated":
        return _conv_dilated_weight_grad(x, kernel, strides, padding)
    return _conv(x, kernel, strides, padding)


class Conv(nn.Module):
    """``nn.Conv(features, kernel_size, strides, padding='SAME')`` for NHWC input, with
    the same parameters (``kernel`` (KH, KW, C_in, features), ``bias``), initialisers and
    dtype promotion, computed by `conv2d` with ``cpu_kernels``."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    cpu_kernels: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init,
                            (*kernel_size, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.strides, "SAME", cpu_kernels=self.cpu_kernels)
        return y + bias.reshape(1, 1, 1, -1)
