"""From a config to the pieces of a run: checks across fields, the model."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from diffusion_jax import gaussian, losses, schedules
from diffusion_jax.models import conv, dropout, factory
from diffusion_jax.models.factory import DTYPES, MODEL_NAMES
from diffusion_jax.sampling import SAMPLERS, SPACINGS
from diffusion_jax.training import config_checks
from diffusion_jax.training.objectives import OBJECTIVES, conditioning
from diffusion_jax.training.step import NAN_POLICIES

__all__ = ["MODEL_NAMES", "create_model", "validate_config"]


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.{name} must be a positive int; got {value!r}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks values and combinations that no single field's type can express.

    Raises:
      ValueError: naming the field(s), the value found and what is valid.
    """
    gaussian.check_choice("objective", config.objective, tuple(OBJECTIVES))
    gaussian.check_choice("train.nan_policy", config.train.nan_policy, NAN_POLICIES)
    for name in ("train.batch_size", "train.num_steps", "train.log_every",
                 "train.checkpoint_every", "train.keep_checkpoints", "sample.num_samples"):
        section, field = name.split(".")
        _require_positive_int(name, config[section][field])
    config_checks.check_ranges(config)
    if not 0.0 <= config.optim.ema_decay < 1.0:
        raise ValueError(f"optim.ema_decay must lie in [0, 1); got {config.optim.ema_decay}.")
    _validate_lr_schedule(config.optim)
    conditioning.check_conditioning(config)
    if config.objective == "ddpm":
        _validate_ddpm(config)


LR_SCHEDULES = ("constant", "cosine")


def _validate_lr_schedule(optim: ml_collections.ConfigDict) -> None:
    kind = optim.get("lr_schedule", "constant")
    gaussian.check_choice("optim.lr_schedule", kind, LR_SCHEDULES)
    if kind != "cosine":
        return
    decay, warmup = optim.get("decay_steps"), int(optim.warmup_steps)
    if isinstance(decay, bool) or not isinstance(decay, int) or decay <= max(warmup, 0):
        raise ValueError(
            f"optim.decay_steps must be an int > optim.warmup_steps = {warmup} for "
            f"lr_schedule 'cosine' (the step where the decay ends); got {decay!r}."
        )
    fraction = optim.get("final_lr_fraction")
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"optim.final_lr_fraction must be a number in [0, 1]; got {fraction!r}."
        )


def _validate_ddpm(config: ml_collections.ConfigDict) -> None:
    d = config.diffusion
    losses.check_loss_config(mean_type=d.mean_type, var_type=d.var_type, loss_type=d.loss_type)
    gaussian.check_choice("diffusion.schedule", d.schedule, tuple(schedules.SCHEDULES))
    gaussian.check_choice("diffusion.decoder_type", d.decoder_type, losses.DECODER_TYPES)
    gaussian.check_choice("model.name", config.model.name, MODEL_NAMES)
    gaussian.check_choice("model.dtype", config.model.dtype, tuple(DTYPES))
    gaussian.check_choice("model.dropout_rng", config.model.dropout_rng, dropout.DROPOUT_RNGS)
    gaussian.check_choice("model.cpu_kernels", config.model.cpu_kernels, conv.CPU_KERNELS)
    if config.model.name == "unet" and config.model.dtype in DTYPES:
        conv.check_cpu_kernels(config.model.cpu_kernels, DTYPES[config.model.dtype])
    gaussian.check_choice("sample.sampler", config.sample.sampler, SAMPLERS)
    gaussian.check_choice("sample.spacing", config.sample.spacing, SPACINGS)
    _require_positive_int("diffusion.num_timesteps", d.num_timesteps)
    steps = config.sample.num_steps
    # Every sampler takes num_steps (ancestral respaces the chain to that many steps).
    if isinstance(steps, bool) or not (isinstance(steps, int) and 0 < steps <= d.num_timesteps):
        raise ValueError(
            f"sample.num_steps must be an int in [1, diffusion.num_timesteps = "
            f"{d.num_timesteps}] for sampler {config.sample.sampler!r}; got {steps!r}."
        )


def create_model(config: ml_collections.ConfigDict, info) -> nn.Module:
    """The network of ``config.model`` for the DDPM-style objectives (`models.factory`)."""
    out = gaussian.model_output_channels(info.shape[-1], config.diffusion.var_type)
    return factory.create_model(config, info, out)
