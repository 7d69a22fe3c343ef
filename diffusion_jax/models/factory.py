"""The network of a config: ``create_model(config, info, out_channels)``.

Lives with the models (not in the training setup) so that the objectives can build their
networks without importing the training system. The caller says how many output
channels the network needs (its objective knows: eps and a variance, a score, ...).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from diffusion_jax.models.dit import DiT
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.unet import UNet

__all__ = ["DTYPES", "MODEL_NAMES", "create_model"]

MODEL_NAMES = ("unet", "mlp", "dit")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(config: ml_collections.ConfigDict, info, out_channels: int) -> nn.Module:
    """The network of ``config.model`` for data described by ``info`` (`data.DataInfo`)."""
    m = config.model
    if m.name not in MODEL_NAMES:
        raise ValueError(f"Unknown model.name {m.name!r}; valid names are {list(MODEL_NAMES)}.")
    if m.name == "dit":
        return _create_dit(m, info, out_channels)
    if m.name == "unet":
        if info.kind != "image":
            raise ValueError(
                f"model.name 'unet' needs image data; data.name {info.name!r} is {info.kind} "
                f"data of shape {info.shape}. Use model.name 'mlp'."
            )
        num_classes = m.get("num_classes")
        if num_classes is not None and info.num_classes is None:
            raise ValueError(
                f"model.num_classes = {num_classes} but data set {info.name!r} has no labels."
            )
        return UNet(
            ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
            attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout,
            out_channels=out_channels, num_classes=num_classes,
            null_class=config.train.get("p_uncond", 0.0) > 0, dtype=DTYPES[m.dtype],
            dropout_rng=m.dropout_rng, cpu_kernels=m.cpu_kernels,
        )
    if info.kind != "vector":
        raise ValueError(
            f"model.name 'mlp' needs vector data of shape (D,); data.name {info.name!r} has "
            f"shape {info.shape}. Use model.name 'unet'."
        )
    return MLP(
        num_timesteps=config.diffusion.num_timesteps, features=tuple(m.features),
        out_dim=out_channels, activation=m.activation, per_step_readout=m.per_step_readout,
    )


def _create_dit(m: ml_collections.ConfigDict, info, out_channels: int) -> DiT:
    """The DiT of ``config.model.dit`` (`diffusion_jax.models.dit`), checked against the data.

    Its null class (id ``num_classes``) is always embedded; labels are dropped to it by the
    objective (``train.p_uncond``, `training.objectives.conditioning`), not by the module.
    """
    d = m.dit
    if info.kind != "image":
        raise ValueError(f"model.name 'dit' needs image data; data.name {info.name!r} is "
                         f"{info.kind} data of shape {info.shape}. Use model.name 'mlp'.")
    height, width = info.shape[:2]
    if height % d.patch_size or width % d.patch_size:
        raise ValueError(f"model.dit.patch_size = {d.patch_size} does not divide the image size "
                         f"{height}x{width} of data set {info.name!r}; pick a divisor of both.")
    if d.hidden_size % d.num_heads:
        raise ValueError(f"model.dit.hidden_size = {d.hidden_size} is not divisible by "
                         f"model.dit.num_heads = {d.num_heads}.")
    num_classes = m.get("num_classes")
    if num_classes is not None and info.num_classes is None:
        raise ValueError(f"model.num_classes = {num_classes} but data set {info.name!r} has "
                         "no labels.")
    return DiT(
        patch_size=d.patch_size, hidden_size=d.hidden_size, depth=d.depth,
        num_heads=d.num_heads, mlp_ratio=d.mlp_ratio, out_channels=out_channels,
        num_classes=num_classes, class_dropout_prob=0.0, dtype=DTYPES[m.dtype],
        remat=d.get("remat", False),
    )
