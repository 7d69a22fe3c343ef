"""The networks the cases time: DDPM's CIFAR-10 config at the U-Net sizes of `MODELS`.

`make_config` builds a case's config; `ddpm_extra_flops` is the work DDPM's network as
written does on top of ours (its upsampling), for the ``ddpm_flops`` figures.
"""

from __future__ import annotations

from configs import ddpm_cifar
from diffusion_jax import data

CIFAR_INFO = data.DataInfo("cifar10", "image", (32, 32, 3), 50_000, 10)
# name -> (ch, ch_mult, num_res_blocks, attn_resolutions)
MODELS = {
    "cifar": (128, (1, 2, 2, 2), 2, (16,)),
    "small": (64, (1, 2, 2), 1, (8,)),
    "micro": (32, (1,), 1, ()),  # --quick: one level (no resampling), compiles in seconds
}


def make_config(model: str, dtype: str = "float32", *, num_timesteps: int = 1000,
                cpu_kernels: str = "none"):
    """The DDPM CIFAR-10 config with the named U-Net size, compute dtype and opt-in CPU
    kernels (`diffusion_jax.models.conv`; float32 only, so other dtypes keep 'none')."""
    config = ddpm_cifar.get_config()
    config.model.cpu_kernels = cpu_kernels if dtype == "float32" else "none"
    ch, ch_mult, blocks, attn = MODELS[model]
    config.model.ch, config.model.ch_mult = ch, ch_mult
    config.model.num_res_blocks, config.model.attn_resolutions = blocks, attn
    config.model.dtype = dtype
    config.diffusion.num_timesteps = num_timesteps
    return config


def ddpm_extra_flops(model: str, batch: int, passes: int) -> float:
    """FLOPs that DDPM's network as written spends on top of ours: its upsampling layers
    convolve the 2x nearest-upsampled image (36 multiply-adds per input pixel and channel
    pair) where `unet.Upsample` convolves the input per output phase (16). ``passes``:
    network passes (3 for a train step: forward, input and weight gradients)."""
    ch, ch_mult, _, _ = MODELS[model]
    size = CIFAR_INFO.shape[0]
    extra = 0.0
    for level in range(1, len(ch_mult)):
        channels, side = ch * ch_mult[level], size // 2**level
        extra += 2.0 * batch * side * side * channels * channels * (36 - 16)
    return extra * passes
