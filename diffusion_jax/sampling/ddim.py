"""DDIM (Song, Meng, Ermon 2021): the non-Markovian sampler and its deterministic inverse.

Indexing follows the library: step t (0-based) moves between the noise levels
alphas_cumprod[t] (its input) and alphas_cumprod_prev[t] (its output; 1 at t = 0). A
respaced schedule (`respace`) makes the same functions take larger strides.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import gaussian
from diffusion_jax.gaussian import extract
from diffusion_jax.sampling import _common
from diffusion_jax.schedules import Schedule

__all__ = [
    "ddim_reverse_sample",
    "ddim_reverse_sample_loop",
    "ddim_sample",
    "ddim_sample_loop",
]


def _eps_and_xstart(schedule, model_output, x_t, t, mean_type, var_type, clip_denoised):
    out = gaussian.p_mean_variance(
        schedule, model_output, x_t, t,
        mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
    )
    # eps consistent with the (possibly clipped) x_0 prediction, as in improved DDPM.
    eps = gaussian.predict_eps_from_xstart(schedule, x_t, t, out.pred_xstart)
    return eps, out.pred_xstart


def ddim_sample(
    schedule: Schedule,
    model_output,
    x_t,
    t,
    *,
    eta=0.0,
    key=None,
    noise=None,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
) -> dict:
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021, Eq. 12, with sigma of Eq. 16).

    x_{t-1} = sqrt(abar_{t-1}) x0_pred + sqrt(1 - abar_{t-1} - sigma_t^2) eps_pred + sigma_t z,
    sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}).

    eta = 0 is deterministic (no noise is drawn; ``key``/``noise`` may be omitted);
    eta = 1 gives sigma_t^2 = beta-tilde_t, the ancestral posterior variance (with the
    posterior mean). x0_pred comes from `gaussian.p_mean_variance` (any mean_type; the
    variance part of a learned-variance output is ignored) and eps_pred is recomputed
    from it. At t = 0 (abar_{t-1} = 1) sigma is 0 and the step returns x0_pred.

    Args:
      model_output: the network output at (x_t, t).
      x_t: shape (B, ..., C). t: int array (B,).
      eta: float >= 0 (a scalar; may be traced).
      key / noise: PRNG key or standard normal z of x_t's shape, needed when eta > 0.

    Returns:
      dict with ``sample`` (x_{t-1}) and ``pred_xstart``, each of x_t's shape.
    """
    _common.check_types(mean_type, var_type)
    _common.check_eta(eta)
    eps, pred_xstart = _eps_and_xstart(
        schedule, model_output, x_t, t, mean_type, var_type, clip_denoised
    )
    shape = jnp.shape(x_t)
    abar = extract(schedule.alphas_cumprod, t, shape)
    abar_prev = extract(schedule.alphas_cumprod_prev, t, shape)
    sigma = (
        eta
        * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar))
        * jnp.sqrt(1.0 - abar / abar_prev)
    )
    # max(., 0) guards float32 rounding at eta = 1, where the difference is ~0.
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    sample = jnp.sqrt(abar_prev) * pred_xstart + direction
    if noise is not None or key is not None:
        sample = sample + sigma * gaussian.resolve_noise(x_t, noise=noise, key=key)
    elif not isinstance(eta, jax.core.Tracer) and float(eta) != 0.0:
        raise ValueError("ddim_sample with eta > 0 needs `key` or `noise`.")
    return {"sample": sample, "pred_xstart": pred_xstart}


def ddim_reverse_sample(
    schedule: Schedule,
    model_output,
    x,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
) -> dict:
    """One deterministic DDIM encoding step, noise level abar_{t-1} -> abar_t (eta = 0).

    The inverse of `ddim_sample` at eta = 0 with the model output held fixed: a forward
    Euler step of the DDIM ODE (Song et al. 2021, Eq. 14),
    x_t = sqrt(abar_t / abar_{t-1}) (x - sqrt(1 - abar_{t-1}) eps) + sqrt(1 - abar_t) eps,
    where ``x`` is at level abar_{t-1} (alphas_cumprod_prev[t]; the data at t = 0) and
    eps is the prediction of the model called at (x, t): the point at the start of the
    interval, the step label of its end. (Improved DDPM's code instead labels x with
    step t and moves it to step t + 1, which leaves its output one step off the level
    `ddim_sample_loop` starts from.) For xstart / v models, eps is recomputed from x_0
    as if x were at level t, so the round trip is exact whenever the output is.

    Args:
      model_output: the network output at (x, t).
      x: shape (B, ..., C), at noise level alphas_cumprod_prev[t]. t: int array (B,).

    Returns:
      dict with ``sample`` (at level alphas_cumprod[t]) and ``pred_xstart``.
    """
    _common.check_types(mean_type, var_type)
    eps, pred_xstart = _eps_and_xstart(
        schedule, model_output, x, t, mean_type, var_type, clip_denoised
    )
    shape = jnp.shape(x)
    abar = extract(schedule.alphas_cumprod, t, shape)
    abar_prev = extract(schedule.alphas_cumprod_prev, t, shape)
    x0_at_prev = (x - jnp.sqrt(1.0 - abar_prev) * eps) / jnp.sqrt(abar_prev)
    sample = jnp.sqrt(abar) * x0_at_prev + jnp.sqrt(1.0 - abar) * eps
    return {"sample": sample, "pred_xstart": pred_xstart}


def ddim_sample_loop(
    schedule: Schedule,
    model_fn: Callable,
    shape: Sequence[int],
    *,
    key=None,
    eta=0.0,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
    x_T=None,
    record_steps: Sequence[int] | None = None,
) -> dict:
    """DDIM sampling x_T -> x_0 over every step of ``schedule`` (Song et al. 2021, Eq. 12).

    For fewer steps, pass a respaced schedule and model (`respace.respace`). One
    ``lax.scan`` under one ``jit``; step t draws its noise from ``fold_in(key, t)`` and
    x_T (if not given) comes from ``fold_in(key, T)``. ``key`` may be omitted when
    ``x_T`` is given and eta == 0 (the map x_T -> x_0 is then deterministic).

    Args:
      model_fn: ``model_fn(x_t, t) -> output``, preferably a `jax.tree_util.Partial`.
      shape: sample shape (B, ..., C).
      eta: float >= 0: 0 deterministic DDIM, 1 ancestral-like (Eq. 16).
      record_steps: as in `p_sample_loop`.

    Returns:
      dict with ``sample`` (``shape``), and ``x_t`` / ``pred_xstart`` with record_steps.
    """
    _common.check_types(mean_type, var_type)
    _common.check_eta(eta)
    stochastic = isinstance(eta, jax.core.Tracer) or float(eta) != 0.0
    shape, x_T, key = _common.initial_state(shape, x_T, key, key_needed=stochastic)
    slots, num_records = _common.record_slots(record_steps, schedule.num_timesteps)
    return _ddim_sample_loop(
        schedule, _common.as_model_fn(model_fn), x_T, key, jnp.float32(eta), slots,
        shape=shape, mean_type=mean_type, var_type=var_type,
        clip_denoised=bool(clip_denoised), num_records=num_records,
    )


@partial(
    jax.jit,
    static_argnames=("shape", "mean_type", "var_type", "clip_denoised", "num_records"),
)
def _ddim_sample_loop(
    schedule, model_fn, x_T, key, eta, slots,
    *, shape, mean_type, var_type, clip_denoised, num_records,
):
    batch, num_timesteps = shape[0], schedule.num_timesteps
    x = _common.draw_x_T(x_T, key, shape, num_timesteps)

    def step(carry, t_scalar):
        x, xs, x0s = carry
        t = _common.full_t(t_scalar, batch)
        if key is not None:
            noise = jax.random.normal(jax.random.fold_in(key, t_scalar), shape, x.dtype)
        else:
            noise = jnp.zeros(shape, x.dtype)  # eta == 0: sigma is 0
        out = ddim_sample(
            schedule, model_fn(x, t), x, t, eta=eta, noise=noise,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        )
        slot = slots[t_scalar]
        xs, x0s = _common.record(xs, slot, x), _common.record(x0s, slot, out["pred_xstart"])
        return (out["sample"], xs, x0s), None

    buffers = jnp.zeros((num_records,) + shape, x.dtype)
    steps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
    (x, xs, x0s), _ = jax.lax.scan(step, (x, buffers, buffers), steps)
    result = {"sample": x}
    if num_records:
        result.update(x_t=xs, pred_xstart=x0s)
    return result


def ddim_reverse_sample_loop(
    schedule: Schedule,
    model_fn: Callable,
    x_start,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
) -> dict:
    """Deterministic DDIM encoding x_0 -> x_T (Song et al. 2021, Sec. 4.3 and Eq. 14).

    `ddim_reverse_sample` for t = 0, ..., T-1 in one ``lax.scan``; the result is at noise
    level alphas_cumprod[T-1], where `ddim_sample_loop` (eta = 0) starts, and decoding it
    with the same schedule and model approximately recovers x_0 (the error shrinks with
    the step size and the model's smoothness).

    Args:
      x_start: x_0, shape (B, ..., C).

    Returns:
      dict with ``sample``: x_T, x_start's shape.
    """
    _common.check_types(mean_type, var_type)
    x_start = jnp.asarray(x_start)
    _common.check_shape(x_start.shape)
    return _ddim_reverse_sample_loop(
        schedule, _common.as_model_fn(model_fn), x_start,
        mean_type=mean_type, var_type=var_type, clip_denoised=bool(clip_denoised),
    )


@partial(jax.jit, static_argnames=("mean_type", "var_type", "clip_denoised"))
def _ddim_reverse_sample_loop(schedule, model_fn, x, *, mean_type, var_type, clip_denoised):
    batch = x.shape[0]

    def step(x, t_scalar):
        t = _common.full_t(t_scalar, batch)
        out = ddim_reverse_sample(
            schedule, model_fn(x, t), x, t,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        )
        return out["sample"], None

    steps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    x, _ = jax.lax.scan(step, x, steps)
    return {"sample": x}
