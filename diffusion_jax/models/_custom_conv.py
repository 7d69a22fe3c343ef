"""One ``custom_vjp`` for convolutions whose passes are written out (`conv`, `onednn`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax


def conv_with_gradients(forward: Callable, input_grad: Callable, weight_grad: Callable):
    """``conv(x, kernel, strides, padding) = forward(x, kernel, strides, padding)``,
    differentiable in ``x`` and ``kernel`` by ``input_grad(x, kernel, dy, strides,
    padding)`` and ``weight_grad(x, kernel, dy, strides, padding)`` (``strides`` and
    ``padding`` static). Only the gradients of differentiated arguments are computed: no
    input gradient for a network's input image."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def conv(x, kernel, strides, padding):
        return forward(x, kernel, strides, padding)

    def conv_fwd(x, kernel, strides, padding):
        # With symbolic zeros, x and kernel come as CustomVJPPrimal(value, perturbed). The
        # flags travel in the residuals' structure, which is static.
        wanted = {name: () for name, arg in (("x", x), ("kernel", kernel)) if arg.perturbed}
        y = forward(x.value, kernel.value, strides, padding)
        return y, (x.value, kernel.value, wanted)

    def conv_bwd(strides, padding, residuals, dy):
        x, kernel, wanted = residuals
        if isinstance(dy, jax.custom_derivatives.SymbolicZero):
            return None, None
        dx = input_grad(x, kernel, dy, strides, padding) if "x" in wanted else None
        dkernel = weight_grad(x, kernel, dy, strides, padding) if "kernel" in wanted else None
        return dx, dkernel

    conv.defvjp(conv_fwd, conv_bwd, symbolic_zeros=True)
    return conv
