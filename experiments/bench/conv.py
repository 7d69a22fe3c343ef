"""The ``conv`` case: a bare 3x3 convolution at each level of a U-Net, each kernel alone.

`conv_kernels` are the forward pass, the input gradient and the weight gradient (as XLA
writes it, and in the dilated form of `diffusion_jax.models.conv`); `bench_conv` times
each at the shapes of `conv_shapes` and reports GFLOP/s and the fraction of the matmul
peak (2 x B x H x W x 9 x C_in x C_out FLOPs per kernel).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import jax

from diffusion_jax.models import conv as conv_lib
# The PyTorch side's script imports nothing beyond the standard library until it runs.
from experiments import benchmark_torch

from .models import CIFAR_INFO, MODELS
from .timing import best_peak, load_average, time_calls

CONV_KINDS = benchmark_torch.CONV_KINDS
# The conv case's JAX kernels: PyTorch's kinds and the dilated weight gradient, which is
# compared with PyTorch's weight gradient.
JAX_CONV_KINDS = CONV_KINDS + ("weight_grad_dilated",)


def conv_shapes(model: str) -> list[tuple[int, int, int]]:
    """(side, in_ch, out_ch) of a 3x3 convolution at each level of the named U-Net: the
    image side halves per level and the channels are ch x ch_mult[level] in and out (the
    residual blocks' second convolution; most of the network's convolution FLOPs)."""
    ch, ch_mult, _, _ = MODELS[model]
    size = CIFAR_INFO.shape[0]
    return [(size // 2**level, ch * m, ch * m) for level, m in enumerate(ch_mult)]


def conv3x3(x, w):
    """The bare convolution of the conv case: 3x3, stride 1, SAME padding, NHWC / HWIO,
    differentiated as XLA does it."""
    return conv_lib.conv2d(x, w)


def conv_kernels() -> dict[str, Callable]:
    """``kind -> jitted f(x, w, dy)``: the bare convolution's forward pass, and its input
    and weight gradients as the transposes of the convolution in one argument (what
    differentiation gives XLA; no forward pass inside them), and the weight gradient in
    the dilated form (`diffusion_jax.models.conv.dilated_weight_grad`)."""
    return {
        "forward": jax.jit(lambda x, w, dy: conv3x3(x, w)),
        "input_grad": jax.jit(lambda x, w, dy: jax.linear_transpose(
            lambda x_: conv3x3(x_, w), x)(dy)[0]),
        "weight_grad": jax.jit(lambda x, w, dy: jax.linear_transpose(
            lambda w_: conv3x3(x, w_), w)(dy)[0]),
        "weight_grad_dilated": jax.jit(lambda x, w, dy: conv_lib.dilated_weight_grad(
            x, dy, w.shape, (1, 1), ((1, 1), (1, 1)))),
    }


def bench_conv(args, peaks: dict) -> list[dict[str, Any]]:
    """`conv_kernels` at each shape of `conv_shapes`, on one device (on a CPU all cores
    are its threads)."""
    device = jax.devices()[0]
    batch = args.conv_batch
    kernels = conv_kernels()
    peak = best_peak(peaks, "float32")
    cases = []
    for side, in_ch, out_ch in conv_shapes(args.conv_model):
        keys = jax.random.split(jax.random.key(4), 3)
        x = jax.device_put(jax.random.normal(keys[0], (batch, side, side, in_ch)), device)
        w = jax.device_put(jax.random.normal(keys[1], (3, 3, in_ch, out_ch)) * 0.05, device)
        dy = jax.device_put(jax.random.normal(keys[2], (batch, side, side, out_ch)), device)
        flops = benchmark_torch.conv_flops(batch, side, in_ch, out_ch)
        case = {"case": "conv", "model": args.conv_model, "dtype": "float32", "batch": batch,
                "side": side, "in_ch": in_ch, "out_ch": out_ch, "devices": 1,
                "flops": flops}
        for kind, fn in kernels.items():
            compiled = fn.lower(x, w, dy).compile()
            times, _ = time_calls(lambda c=compiled: c(x, w, dy), steps=args.conv_steps,
                                  warmup=1)
            seconds = statistics.median(times)
            case[f"{kind}_s"] = seconds
            case[f"{kind}_flops_per_s"] = flops / seconds
            if peak:
                case[f"{kind}_fraction_of_peak"] = flops / seconds / peak
        case["load_average"] = load_average()
        cases.append(case)
    return cases
