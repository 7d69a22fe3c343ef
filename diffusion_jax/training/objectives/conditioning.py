"""Class conditioning and classifier-free guidance for every objective, from the config.

Fields (`training.config.default_config`): ``model.num_classes`` (None: unconditional),
``train.p_uncond`` (label dropout to the null class id num_classes, `guidance.drop_labels`;
> 0 makes the U-Net embed that class), ``sample.guidance`` (w; 0 = the conditional model)
and ``sample.guidance_convention`` ('ho_salimans': (1 + w) eps(x, c) - w eps(x); 'lerp':
the scale is s = 1 + w). Samples for the grids and ``--mode=sample`` ask for the classes
0, 1, ..., num_classes - 1, 0, 1, ... in turn.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from jax.tree_util import Partial

from diffusion_jax import guidance
from diffusion_jax.training.objectives.base import model_fn_for

__all__ = ["check_conditioning", "sampling_model_fn", "sample_labels", "training_labels"]


def check_conditioning(config: ml_collections.ConfigDict) -> int | None:
    """Validates the fields of the module docstring; returns num_classes (or None)."""
    num_classes = config.model.get("num_classes")
    p_uncond = config.train.get("p_uncond", 0.0)
    scale = config.sample.get("guidance", 0.0)
    convention = config.sample.get("guidance_convention", "ho_salimans")
    if not 0.0 <= p_uncond < 1.0:
        raise ValueError(f"train.p_uncond must lie in [0, 1) (the share of labels dropped to "
                         f"the null class); got {p_uncond}.")
    if p_uncond > 0 and num_classes is None:
        raise ValueError("train.p_uncond > 0 drops class labels, but model.num_classes is None "
                         "(an unconditional model): set model.num_classes.")
    w = guidance.guidance_weight(scale, convention)
    if w != 0 and num_classes is None:
        raise ValueError(f"sample.guidance = {scale} asks for classifier-free guidance, but the "
                         "model is unconditional (model.num_classes is None).")
    if w != 0 and p_uncond == 0:
        raise ValueError(f"sample.guidance = {scale} needs the unconditional model of a run "
                         "trained with label dropout (train.p_uncond > 0); this config has 0.")
    return num_classes


def training_labels(config, batch: dict, key):
    """The batch's labels with dropout (or None for an unconditional model)."""
    num_classes = config.model.get("num_classes")
    if num_classes is None:
        return None
    labels = batch["label"]
    p_uncond = config.train.get("p_uncond", 0.0)
    if p_uncond == 0:
        return labels
    return guidance.drop_labels(key, labels, p_uncond=p_uncond, num_classes=num_classes)


def sample_labels(config, num: int):
    """Classes 0..num_classes-1 in turn, int32 (num,), or None for an unconditional model."""
    num_classes = config.model.get("num_classes")
    if num_classes is None:
        return None
    return jnp.arange(num, dtype=jnp.int32) % num_classes


def _unconditional(model, params, x, t):
    return model_fn_for(model, params)(x, t)


def _conditional(model, params, x, t, labels):
    return model.apply({"params": params}, x, t, labels, train=False)


def sampling_model_fn(config, model, params, num: int, *, guided_channels=None) -> Partial:
    """``model_fn(x, t)`` for ``num`` samples: unconditional, conditional on `sample_labels`,
    or guided by ``sample.guidance`` (one call on the doubled batch; ``guided_channels``:
    `guidance.guided_model_fn`'s, for outputs with variances)."""
    labels = sample_labels(config, num)
    if labels is None:
        return Partial(lambda p, x, t: _unconditional(model, p, x, t), params)
    cond = Partial(lambda p, x, t, y: _conditional(model, p, x, t, y), params)
    return guidance.guided_model_fn(
        cond, labels, scale=config.sample.get("guidance", 0.0),
        num_classes=config.model.num_classes,
        convention=config.sample.get("guidance_convention", "ho_salimans"),
        guided_channels=guided_channels)
