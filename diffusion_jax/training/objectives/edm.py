"""The ``edm`` objective: Karras et al. 2022's preconditioned denoiser, loss and sampler.

Config (``config.edm``, added by `add_edm_fields`): ``preconditioning`` ('edm' | 'vp' |
've', `diffusion_jax.edm`), ``sigma_data`` (EDM's), ``P_mean``, ``P_std`` (its log-normal
training sigma), ``reduce_mean`` (mean of the weighted squares over an example's elements;
NVlabs sums them). The network F is called as ``F(c_in x, c_noise)``: its time input is
c_noise (EDM: ln(sigma) / 4, a float, fed to the U-Net's sinusoidal embedding as NVlabs
feeds it to theirs).

``config.sample``: ``sampler`` 'edm_heun' (Algorithm 1, or Algorithm 2 with S_churn > 0),
``num_steps`` (N; 2 N - 1 evaluations), ``sigma_min``, ``sigma_max`` (clamped to the
preconditioning's range, as ``generate.py``), ``rho``, ``S_churn``, ``S_min``, ``S_max``,
``S_noise``; and classifier-free guidance (`conditioning`). ``--mode=eval`` reports the
per-example weighted loss and the unweighted denoising error at training sigmas.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import edm
from diffusion_jax.gaussian import check_choice
from diffusion_jax.models import factory
from diffusion_jax.sampling import edm as edm_sampling
from diffusion_jax.training.objectives import conditioning
from diffusion_jax.training.objectives.base import Objective, data_key, model_fn_for

__all__ = ["EDM_SAMPLERS", "add_edm_fields", "edm_objective", "init_params"]

EDM_SAMPLERS = ("edm_heun",)


def add_edm_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds ``config.edm`` and the sampler fields with the paper's values (Table 1,
    Algorithm 1: 18 steps, sigma in [0.002, 80], rho = 7, no churn)."""
    config.objective = "edm"
    e = config.edm = ml_collections.ConfigDict()
    e.preconditioning = "edm"
    e.sigma_data = 0.5
    e.P_mean, e.P_std = -1.2, 1.2
    e.reduce_mean = True
    c = config.sample
    c.sampler = "edm_heun"
    c.num_steps = 18
    c.sigma_min, c.sigma_max, c.rho = 0.002, 80.0, 7.0
    c.S_churn, c.S_min, c.S_max, c.S_noise = 0.0, 0.0, math.inf, 1.0
    return config


def _preconditioning(config):
    e = config.edm
    check_choice("edm.preconditioning", e.preconditioning, ("edm", "vp", "ve"))
    if e.preconditioning == "edm":
        return edm.get_preconditioning("edm", sigma_data=e.sigma_data)
    return edm.get_preconditioning(e.preconditioning)


def _validate(config, precond):
    c = config.sample
    check_choice("sample.sampler", c.sampler, EDM_SAMPLERS)
    lo, hi = _sigma_range(config, precond)
    edm.sigma_steps(c.num_steps, sigma_min=lo, sigma_max=hi, rho=c.rho)  # raises on bad values
    edm.step_gammas(edm.sigma_steps(2), S_churn=c.S_churn, S_min=c.S_min, S_max=c.S_max)
    if not config.edm.P_std > 0:
        raise ValueError(f"edm.P_std must be > 0; got {config.edm.P_std}.")


def _sigma_range(config, precond):
    lo, hi = precond.sigma_range
    return max(config.sample.sigma_min, lo), min(config.sample.sigma_max, hi)


def init_params(model, key, shape, num_classes, time_dtype=jnp.float32):
    """The network's parameters, initialised on one example (with a label if conditional)."""
    x = jnp.zeros((1,) + tuple(shape), jnp.float32)
    t = jnp.zeros((1,), time_dtype)
    args = (x, t) if num_classes is None else (x, t, jnp.zeros((1,), jnp.int32))
    return model.init({"params": key}, *args, train=False)["params"]


def check_image_model(config, info, objective: str) -> None:
    if config.model.name != "unet" or info.kind != "image":
        raise ValueError(
            f"objective {objective!r} trains the U-Net on image data (its time input is a "
            f"float); got model.name {config.model.name!r} on {info.kind} data {info.name!r}."
        )


def edm_objective(config: ml_collections.ConfigDict, info) -> Objective:
    """EDM training (Eq. 8) of D = c_skip x + c_out F(c_in x, c_noise); Heun sampling."""
    if "edm" not in config:
        raise ValueError("objective 'edm' needs config.edm (see configs/edm_digits.py).")
    check_image_model(config, info, "edm")
    precond = _preconditioning(config)
    _validate(config, precond)
    num_classes = conditioning.check_conditioning(config)
    model = factory.create_model(config, info, info.shape[-1])
    shape, e = tuple(info.shape), config.edm

    def init(key):
        return init_params(model, key, shape, num_classes)

    def loss(params, batch, key):
        y = batch[data_key(batch)]
        label_key, loss_key, dropout_key = jax.random.split(key, 3)
        labels = conditioning.training_labels(config, batch, label_key)
        model_fn = model_fn_for(model, params, labels=labels, train=True, dropout_key=dropout_key)
        out = edm.edm_loss(precond, model_fn, y, key=loss_key, P_mean=e.P_mean, P_std=e.P_std,
                           reduce_mean=e.reduce_mean)
        value = jnp.mean(out["loss"])
        return value, {"edm_loss": value, "mse": jnp.mean(out["mse"])}

    def sample(params, key, num):
        c = config.sample
        lo, hi = _sigma_range(config, precond)
        model_fn = conditioning.sampling_model_fn(config, model, params, num)
        return edm_sampling.edm_sampler(
            edm.denoiser_fn(precond, model_fn), (num,) + shape, key=key, num_steps=c.num_steps,
            sigma_min=lo, sigma_max=hi, rho=c.rho, S_churn=c.S_churn, S_min=c.S_min,
            S_max=c.S_max, S_noise=c.S_noise)["sample"]

    def evaluate(params, batch, key):
        y = batch[data_key(batch)]
        labels = batch.get("label") if num_classes is not None else None
        model_fn = model_fn_for(model, params, labels=labels)
        out = edm.edm_loss(precond, model_fn, y, key=key, P_mean=e.P_mean, P_std=e.P_std,
                           reduce_mean=e.reduce_mean)
        return {"edm_loss": out["loss"], "denoising_mse": out["mse"]}

    return Objective(init=init, loss=loss, sample=sample, evaluate=evaluate)
