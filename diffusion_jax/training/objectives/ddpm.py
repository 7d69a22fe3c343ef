"""The ``ddpm`` objective: DDPM-style training with any mean / variance / loss type."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import gaussian, likelihood, losses, sampling, schedules, sde as sde_lib
from diffusion_jax import sde_losses
from diffusion_jax.models import factory
from diffusion_jax.training.objectives import conditioning
from diffusion_jax.training.objectives.base import Objective, data_key, model_fn_for

__all__ = ["ddpm_objective"]

LABEL_STREAM = 0x1ABE1


def ddpm_objective(config: ml_collections.ConfigDict, info) -> Objective:
    """DDPM-style training (Ho et al. 2020, Algorithm 1) with any mean/variance/loss type.

    Per batch: t ~ U{0..T-1}, noise ~ N(0, I), the loss of `losses.training_losses`
    averaged over the batch. Metrics: ``mse`` and ``vb`` (bits/dim) batch means.
    """
    d = config.diffusion
    schedule = schedules.get_schedule(d.schedule, d.num_timesteps)
    out_channels = gaussian.model_output_channels(info.shape[-1], d.var_type)
    model = factory.create_model(config, info, out_channels)
    class_conditional = conditioning.check_conditioning(config) is not None
    shape = tuple(info.shape)

    def init(key):
        x = jnp.zeros((1,) + shape, jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        args = (x, t, jnp.zeros((1,), jnp.int32)) if class_conditional else (x, t)
        return model.init({"params": key}, *args, train=False)["params"]

    def loss(params, batch, key):
        x_start = batch[data_key(batch)]
        # Label dropout draws from its own stream, so runs without it keep their keys.
        labels = conditioning.training_labels(config, batch, jax.random.fold_in(key, LABEL_STREAM))
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        t = jax.random.randint(t_key, (x_start.shape[0],), 0, d.num_timesteps, dtype=jnp.int32)
        model_fn = model_fn_for(model, params, labels=labels, train=True, dropout_key=dropout_key)
        terms = losses.training_losses(
            schedule, model_fn, x_start, t, key=noise_key, mean_type=d.mean_type,
            var_type=d.var_type, loss_type=d.loss_type, decoder_type=d.decoder_type,
        )
        return jnp.mean(terms["loss"]), {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"])}

    def sample(params, key, num):
        learned_var = out_channels != info.shape[-1]  # guide eps; the variances stay conditional
        model_fn = conditioning.sampling_model_fn(
            config, model, params, num, guided_channels=info.shape[-1] if learned_var else None)
        return sampling.sample(
            schedule, model_fn, (num,) + shape, key=key, sampler=config.sample.sampler,
            num_steps=config.sample.num_steps, mean_type=d.mean_type, var_type=d.var_type,
            clip_denoised=config.sample.clip_denoised,
            spacing=config.sample.spacing,
        )

    def evaluate(params, batch, key):
        x_start = batch[data_key(batch)]
        labels = batch.get("label") if class_conditional else None
        model_fn = jax.tree_util.Partial(
            lambda params, x, t: model_fn_for(model, params, labels=labels)(x, t), params
        )
        kw = dict(mean_type=d.mean_type, var_type=d.var_type,
                  clip_denoised=config.eval.clip_denoised, decoder_type=d.decoder_type)
        bound_key, iw_key = jax.random.split(key)
        out = likelihood.calc_bpd_loop(schedule, model_fn, x_start, key=bound_key, **kw)
        values = {
            "total_bpd": out["total_bpd"],
            "prior_bpd": out["prior_bpd"],
            "decoder_bpd": out["vb"][:, 0],
        }
        if config.eval.iw_samples > 0:
            iw = likelihood.importance_weighted_log_likelihood(
                schedule, model_fn, x_start, key=iw_key, num_samples=config.eval.iw_samples, **kw
            )
            values["iw_bpd"] = iw["iw_bpd"]
            values["iw_elbo_bpd"] = iw["elbo_bpd"]
        if config.eval.get("ode_likelihood", False) and info.kind == "image":
            values.update(_ode_bpd(config, schedule, model_fn, x_start, key))
        return values

    return Objective(
        init=init, loss=loss, sample=sample if info.kind == "image" else None, evaluate=evaluate
    )


_PARAMETERIZATION = {"eps": "eps", "xstart": "x0", "v": "v"}


def _ode_bpd(config, schedule, model_fn, x_start, key) -> dict:
    """ODE bits/dim of a DDPM model through its schedule's VP SDE (`sde.DDPMVPSDE`)."""
    mean_type, e = config.diffusion.mean_type, config.eval
    if mean_type not in _PARAMETERIZATION or config.diffusion.var_type in ("learned",
                                                                          "learned_range"):
        raise ValueError(
            f"eval.ode_likelihood needs a model whose output is eps, xstart or v alone "
            f"(diffusion.mean_type in {sorted(_PARAMETERIZATION)}, a fixed var_type); got "
            f"mean_type {mean_type!r}, var_type {config.diffusion.var_type!r}."
        )
    sde = sde_lib.DDPMVPSDE.from_schedule(schedule)
    score_fn = sde_losses.score_fn_from_model(sde, model_fn, _PARAMETERIZATION[mean_type])
    out = likelihood.ode_bpd(
        sde, score_fn, x_start, key=jax.random.fold_in(key, 1), num_dequant=e.ode_dequant,
        divergence=e.ode_divergence, probe=e.ode_probe, rtol=e.ode_rtol, atol=e.ode_atol,
        max_steps=e.ode_max_steps,
    )
    return {"ode_bpd": out["bpd"], "ode_bpd_iw": out["bpd_iw"],
            "ode_nfe": jnp.mean(out["nfe"].astype(jnp.float32), axis=0)}
