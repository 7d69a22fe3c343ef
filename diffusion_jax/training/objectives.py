"""Training objectives: what a run optimises and, for image data, how it samples.

An `Objective` bundles three pure functions built from the config:

- ``init(key) -> params``: the trainable parameters (any pytree);
- ``loss(params, batch, key) -> (loss, metrics)``: the scalar to minimise for one batch
  and a dict of scalar metrics (batch means), with all randomness drawn from ``key``;
- ``sample(params, key, num) -> samples`` (optional): ``num`` samples for the grids;
- ``evaluate(params, batch, key) -> dict`` (optional): per-example evaluation values of
  shape (B,) for ``--mode=eval`` (bits/dim of the bound, importance-weighted estimates).

The train step (`step.make_train_step`) only sees these, so new model families (e.g. the
2015 paper's learned-schedule models) plug in by adding a factory to `OBJECTIVES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import losses, schedules
from diffusion_jax.gaussian import check_choice

__all__ = ["OBJECTIVES", "Objective", "create_objective", "ddpm_objective", "model_fn_for"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """See the module docstring."""

    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
    sample: Callable[[Any, jax.Array, int], jax.Array] | None = None
    evaluate: Callable[[Any, dict, jax.Array], dict] | None = None


def data_key(batch: dict) -> str:
    """The name of the data array in a batch: ``image`` (NHWC) or ``x`` (B, D)."""
    for name in ("image", "x"):
        if name in batch:
            return name
    raise ValueError(f"A batch must hold 'image' or 'x'; got keys {sorted(batch)}.")


def model_fn_for(model, params, *, labels=None, train: bool = False, dropout_key=None):
    """``model_fn(x_t, t)`` for the math functions, from a Flax module and its params."""
    rngs = {"dropout": dropout_key} if train else None

    def model_fn(x_t, t):
        args = (x_t, t) if labels is None else (x_t, t, labels)
        return model.apply({"params": params}, *args, train=train, rngs=rngs)

    return model_fn


def ddpm_objective(config: ml_collections.ConfigDict, info) -> Objective:
    """DDPM-style training (Ho et al. 2020, Algorithm 1) with any mean/variance/loss type.

    Per batch: t ~ U{0..T-1}, noise ~ N(0, I), the loss of `losses.training_losses`
    averaged over the batch. Metrics: ``mse`` and ``vb`` (bits/dim) batch means.
    """
    from diffusion_jax.training.setup import create_model

    d = config.diffusion
    schedule = schedules.get_schedule(d.schedule, d.num_timesteps)
    model = create_model(config, info)
    class_conditional = config.model.get("num_classes") is not None
    shape = tuple(info.shape)

    def init(key):
        x = jnp.zeros((1,) + shape, jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        args = (x, t, jnp.zeros((1,), jnp.int32)) if class_conditional else (x, t)
        return model.init({"params": key}, *args, train=False)["params"]

    def loss(params, batch, key):
        x_start = batch[data_key(batch)]
        labels = batch.get("label") if class_conditional else None
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        t = jax.random.randint(t_key, (x_start.shape[0],), 0, d.num_timesteps, dtype=jnp.int32)
        model_fn = model_fn_for(model, params, labels=labels, train=True, dropout_key=dropout_key)
        terms = losses.training_losses(
            schedule, model_fn, x_start, t, key=noise_key, mean_type=d.mean_type,
            var_type=d.var_type, loss_type=d.loss_type, decoder_type=d.decoder_type,
        )
        return jnp.mean(terms["loss"]), {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"])}

    def sample(params, key, num):
        from diffusion_jax import sampling

        labels = None
        if class_conditional:
            labels = jnp.arange(num, dtype=jnp.int32) % config.model.num_classes
        model_fn = jax.tree_util.Partial(
            lambda params, x, t: model_fn_for(model, params, labels=labels)(x, t), params
        )
        return sampling.sample(
            schedule, model_fn, (num,) + shape, key=key, sampler=config.sample.sampler,
            num_steps=config.sample.num_steps, mean_type=d.mean_type, var_type=d.var_type,
            clip_denoised=config.sample.clip_denoised,
            spacing=config.sample.spacing,
        )

    def evaluate(params, batch, key):
        from diffusion_jax import likelihood

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
        return values

    return Objective(
        init=init, loss=loss, sample=sample if info.kind == "image" else None, evaluate=evaluate
    )


def _dpm2015_gaussian(config, info) -> Objective:
    from diffusion_jax.training import objectives_2015  # imported here: it imports us

    return objectives_2015.gaussian_objective(config, info)


def _dpm2015_binomial(config, info) -> Objective:
    from diffusion_jax.training import objectives_2015

    return objectives_2015.binomial_objective(config, info)


OBJECTIVES: dict[str, Callable[[ml_collections.ConfigDict, Any], Objective]] = {
    "ddpm": ddpm_objective,
    "dpm2015_gaussian": _dpm2015_gaussian,
    "dpm2015_binomial": _dpm2015_binomial,
}


def create_objective(config: ml_collections.ConfigDict, info) -> Objective:
    """The objective named by ``config.objective`` (one of `OBJECTIVES`)."""
    check_choice("objective", config.objective, tuple(OBJECTIVES))
    return OBJECTIVES[config.objective](config, info)
