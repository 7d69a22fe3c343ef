"""The full variational bound on -log p(x_0), in bits per dimension.

`calc_bpd_loop` evaluates every term of DDPM's bound (Ho et al. 2020, Eq. 5) for a batch,
L_0 (decoder) + L_1 + ... + L_{T-1} (KLs) + L_T (prior), in one compiled ``lax.scan``
over the T steps: one dispatch, memory independent of T (unless a fixed noise sequence of
shape (T, *x.shape) is passed in for replay).

Models are passed as ``model_fn(x_t, t) -> output``. Wrap parameters with
``jax.tree_util.Partial(apply_fn, params)``: the parameters are then traced arguments of
the compiled loop, not constants baked into it, and a new set of parameters of the same
shapes reuses the compiled code. A plain function is wrapped the same way (and compiled
once per function object).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from diffusion_jax import gaussian, losses
from diffusion_jax.gaussian import MEAN_TYPES, VAR_TYPES, check_choice
from diffusion_jax.schedules import Schedule

__all__ = ["as_model_fn", "calc_bpd_loop"]


def as_model_fn(model_fn: Callable) -> Partial:
    """Wraps a callable as a `jax.tree_util.Partial`, a pytree that ``jit`` can take."""
    if isinstance(model_fn, Partial):
        return model_fn
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable as model_fn(x_t, t); got {model_fn!r}.")
    return Partial(model_fn)


def calc_bpd_loop(
    schedule: Schedule,
    model_fn: Callable,
    x_start,
    *,
    key=None,
    noise=None,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    decoder_type: str = "discretized",
) -> dict:
    """Every term of the variational bound for a batch (DDPM Eq. 5; improved DDPM Sec. 4).

    For each t in [0, T): x_t = q_sample(x_0, t, noise_t), the model is called at
    (x_t, t), and L_t is computed (`losses.vb_terms_bpd`). One Monte Carlo sample of x_t
    per step and example: the total is an unbiased estimate of the bound.

    Args:
      schedule: the diffusion schedule (T steps).
      model_fn: ``model_fn(x_t, t) -> output``; preferably a `jax.tree_util.Partial`.
      x_start: x_0, shape (B, ..., C), scaled to [-1, 1] for the discretized decoder.
      key: PRNG key; step t draws its noise from ``fold_in(key, t)``. Or:
      noise: a fixed noise sequence of shape (T, *x_start.shape), noise[t] for step t,
        to replay results against another implementation.
      clip_denoised: clip pred_xstart to [-1, 1] (images).
      decoder_type: ``discretized`` (8-bit data) or ``gaussian`` (continuous data).

    Returns:
      dict of bits/dim values: ``total_bpd`` (B,) = sum of ``vb`` over t + ``prior_bpd``;
      ``prior_bpd`` (B,) = L_T; ``vb`` (B, T) = L_t for each t; ``xstart_mse`` (B, T),
      mean squared error of pred_xstart; ``mse`` (B, T), mean squared error of the eps
      implied by the prediction against the true noise.
    """
    check_choice("mean_type", mean_type, MEAN_TYPES)
    check_choice("var_type", var_type, VAR_TYPES)
    check_choice("decoder_type", decoder_type, losses.DECODER_TYPES)
    x_start = jnp.asarray(x_start)
    if (key is None) == (noise is None):
        raise ValueError("Pass exactly one of `key` and `noise` to calc_bpd_loop.")
    if noise is not None:
        want = (schedule.num_timesteps,) + x_start.shape
        if jnp.shape(noise) != want:
            raise ValueError(
                f"noise must have shape (T, *x_start.shape) = {want}; got {jnp.shape(noise)}."
            )
    return _calc_bpd_loop(
        schedule,
        as_model_fn(model_fn),
        x_start,
        key,
        noise,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        decoder_type=decoder_type,
    )


@partial(jax.jit, static_argnames=("mean_type", "var_type", "clip_denoised", "decoder_type"))
def _calc_bpd_loop(
    schedule, model_fn, x_start, key, noise, *, mean_type, var_type, clip_denoised, decoder_type
):
    batch = x_start.shape[0]

    def step(_, inputs):
        t_scalar, noise_t = inputs
        if noise_t is None:
            noise_t = jax.random.normal(
                jax.random.fold_in(key, t_scalar), x_start.shape, x_start.dtype
            )
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        x_t = gaussian.q_sample(schedule, x_start, t, noise=noise_t)
        terms = losses.vb_terms_bpd(
            schedule,
            model_fn(x_t, t),
            x_start,
            x_t,
            t,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
            decoder_type=decoder_type,
        )
        pred_xstart = terms["pred_xstart"]
        eps = gaussian.predict_eps_from_xstart(schedule, x_t, t, pred_xstart)
        return None, (
            terms["output"],
            losses.mean_flat(jnp.square(pred_xstart - x_start)),
            losses.mean_flat(jnp.square(eps - noise_t)),
        )

    steps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    _, (vb, xstart_mse, mse) = jax.lax.scan(step, None, (steps, noise))
    prior = losses.prior_bpd(schedule, x_start)
    return {
        "total_bpd": jnp.sum(vb, axis=0) + prior,
        "prior_bpd": prior,
        "vb": vb.T,
        "xstart_mse": xstart_mse.T,
        "mse": mse.T,
    }
