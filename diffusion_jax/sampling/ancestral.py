"""Ancestral sampling (DDPM Algorithm 2) and the 2015 paper's multiplying distributions.

`p_sample` is one step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); `p_sample_loop` runs the whole
chain x_T -> x_0 in one ``lax.scan`` under one ``jit`` (memory independent of T).

Multiplying distributions (Sohl-Dickstein et al. 2015, Sec. 2.5 and Appendix C): the
reverse chain can sample p~(x_0) proportional to p(x_0) r(x_0) by perturbing each kernel,
p~(x_{t-1} | x_t) proportional to p(x_{t-1} | x_t) r(x_{t-1}) (Sec. 2.5.2-2.5.3; the
paper takes r the same function at every step, Sec. 2.5.4):

- a smooth r, given as ``log_r_fn(x, t) -> (B,)``: to first order in the kernel width the
  product of the Gaussian kernel N(mu, Sigma) and r is N(mu + Sigma grad log r(mu), Sigma)
  (Appendix C, Eq. 61). This covers denoising with a Gaussian r and guidance by any
  differentiable log r. ``log_r_fn(x, t)`` scores the OUTPUT of step t, x_{t-1}, at noise
  level alphas_cumprod_prev[t] (the data level at t = 0). The chain starts from
  x_T ~ N(0, I) unless ``x_T`` is passed (the exact start is N(0, I) r(x_T) / Z).

  Accuracy: with r_t(x) = E_q[r(x_0) | x_t = x] at each level (the intermediate targets
  are then the marginals of one process) the error is first order in the step size. With
  the same r at every level (the paper's choice, ``log_r_fn`` ignoring t) the targets
  p(x_t) r(x_t) are not the marginals of one process and the result is biased however
  small the steps: for N(0.5, 0.3^2) data and r = N(-0.2, 0.25^2) at T = 1000 the
  samples have mean 0.041 and std 0.141 against the product's 0.087 and 0.192 (exact
  r_t: 0.094 and 0.192). See tests/test_sampling.py.
- a delta r on known coordinates (inpainting, the paper's Fig. 5): ``mask`` (1 = known) and
  ``known`` (the values). Choice made here: after every reverse step the known coordinates
  are replaced by a fresh draw of their forward-noised value, x_{t-1} ~ q(x_{t-1} | x_0 =
  known), so they carry the noise level the model expects at the next step; x_T's known
  coordinates are drawn from q(x_T | x_0 = known); the last step (t = 0, where
  alpha-bar_{t-1} = 1) sets them exactly to ``known``.
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

__all__ = ["p_sample", "p_sample_loop"]


def p_sample(
    schedule: Schedule,
    model_output,
    x_t,
    t,
    *,
    key=None,
    noise=None,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
    log_r_fn: Callable | None = None,
) -> dict:
    """One ancestral step x_{t-1} = mean + sigma z (DDPM Eq. 11 / Algorithm 2, line 4).

    The mean and variance come from `gaussian.p_mean_variance`; no noise is added at
    t = 0, where the sample is the decoder's mean. With ``log_r_fn`` the mean becomes
    mean + variance * grad_x log r(x, t) at x = mean: the perturbed kernel of
    Sohl-Dickstein et al. 2015, Appendix C (Eq. 61), first order in the kernel width.

    Args:
      schedule: the diffusion schedule (T steps).
      model_output: the network output at (x_t, t) (x_t's shape, 2C channels if learned).
      x_t: shape (B, ..., C). t: int array (B,), 0-based steps.
      key / noise: PRNG key, or the standard normal z of x_t's shape (exactly one).
      log_r_fn: optional ``log_r_fn(x, t) -> (B,)`` in nats, differentiable in x; x is
        at the output's noise level, alphas_cumprod_prev[t].

    Returns:
      dict with ``sample`` (x_{t-1}, x_t's shape) and ``pred_xstart`` (x_t's shape).
    """
    _common.check_types(mean_type, var_type)
    noise = gaussian.resolve_noise(x_t, noise=noise, key=key)
    out = gaussian.p_mean_variance(
        schedule, model_output, x_t, t,
        mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
    )
    mean = out.mean
    if log_r_fn is not None:
        mean = mean + out.variance * grad_log_r(log_r_fn, mean, t)
    nonzero = (jnp.asarray(t) != 0).astype(mean.dtype).reshape((-1,) + (1,) * (mean.ndim - 1))
    sample = mean + nonzero * jnp.exp(0.5 * out.log_variance) * noise
    return {"sample": sample, "pred_xstart": out.pred_xstart}


def grad_log_r(log_r_fn: Callable, x, t) -> jax.Array:
    """grad_x log r(x, t) of x's shape; ``log_r_fn`` must return one value per example."""
    batch = jnp.shape(x)[0]

    def total(x_):
        values = log_r_fn(x_, t)
        if jnp.shape(values) != (batch,):
            raise ValueError(
                f"log_r_fn(x, t) must return one log r per example, shape ({batch},); got "
                f"shape {jnp.shape(values)}."
            )
        return jnp.sum(values)

    # Examples are independent, so the gradient of the sum is each example's gradient.
    return jax.grad(total)(x)


def replace_known(schedule: Schedule, x_prev, t, mask, known, noise) -> jax.Array:
    """Known coordinates of x_{t-1} drawn from q(x_{t-1} | x_0 = known) (exact at t = 0)."""
    shape = jnp.shape(x_prev)
    abar_prev = extract(schedule.alphas_cumprod_prev, t, shape)
    noised = jnp.sqrt(abar_prev) * known + jnp.sqrt(1.0 - abar_prev) * noise
    return jnp.where(mask, noised, x_prev)


def check_inpainting(shape, mask, known):
    """Checks ``mask`` and ``known`` against the sample shape; returns them as arrays."""
    if (mask is None) != (known is None):
        raise ValueError("Pass both `mask` and `known` for inpainting, or neither.")
    if mask is None:
        return None, None
    known = jnp.asarray(known, jnp.float32)
    mask = jnp.asarray(mask)
    if known.shape != tuple(shape):
        raise ValueError(
            f"known must have the sample shape {tuple(shape)}; got known with shape "
            f"{known.shape}."
        )
    broadcastable = mask.ndim == len(shape) and all(
        m in (1, s) for m, s in zip(mask.shape, shape)
    )
    if not broadcastable:
        raise ValueError(
            f"mask must have the sample shape {tuple(shape)} or one of the same rank with "
            f"size-1 axes; got mask with shape {mask.shape}."
        )
    return mask.astype(bool), known


def p_sample_loop(
    schedule: Schedule,
    model_fn: Callable,
    shape: Sequence[int],
    *,
    key=None,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
    x_T=None,
    record_steps: Sequence[int] | None = None,
    mask=None,
    known=None,
    log_r_fn: Callable | None = None,
) -> dict:
    """Ancestral sampling x_T ~ N(0, I), x_{t-1} ~ p(x_{t-1} | x_t) (DDPM Algorithm 2).

    One ``lax.scan`` over t = T-1, ..., 0 under one ``jit``; memory does not grow with T.
    Step t draws its noise from ``fold_in(key, t)``; x_T (if not given) from
    ``fold_in(key, T)``; inpainting draws x_T's known coordinates from
    ``fold_in(key, T + 1)``. Conditioning on r(x) (``mask``/``known`` or ``log_r_fn``):
    see the module docstring (Sohl-Dickstein et al. 2015, Sec. 2.5, Appendix C).

    Args:
      schedule: the schedule (possibly respaced, with ``model_fn`` wrapped by
        `respace.respaced_model_fn`).
      model_fn: ``model_fn(x_t, t) -> output``; preferably a `jax.tree_util.Partial` so
        its parameters are traced (new parameters of the same shapes reuse the compiled
        loop).
      shape: sample shape (B, ..., C).
      key: PRNG key (required).
      x_T: optional start of the chain, of ``shape``.
      record_steps: optional 0-based steps whose input state and x_0 prediction are kept;
        ``range(T)`` keeps the whole trajectory (memory T * shape).
      mask, known: inpainting; ``known`` of ``shape``, ``mask`` (1/True = known) of
        ``shape`` or of the same rank with size-1 axes.
      log_r_fn: ``log_r_fn(x, t) -> (B,)``, log r in nats, differentiable in x.

    Returns:
      dict with ``sample`` (x_0, ``shape``); with ``record_steps`` also ``x_t`` and
      ``pred_xstart``, each (len(record_steps), *shape), in the order of record_steps:
      the state entering step t (at noise level alphas_cumprod[t]) and its x_0 prediction.
    """
    _common.check_types(mean_type, var_type)
    shape, x_T, key = _common.initial_state(shape, x_T, key, key_needed=True)
    slots, num_records = _common.record_slots(record_steps, schedule.num_timesteps)
    mask, known = check_inpainting(shape, mask, known)
    return _p_sample_loop(
        schedule, _common.as_model_fn(model_fn), x_T, key, slots, mask, known,
        _common.wrap_fn("log_r_fn", log_r_fn),
        shape=shape, mean_type=mean_type, var_type=var_type,
        clip_denoised=bool(clip_denoised), num_records=num_records,
    )


@partial(
    jax.jit,
    static_argnames=("shape", "mean_type", "var_type", "clip_denoised", "num_records"),
)
def _p_sample_loop(
    schedule, model_fn, x_T, key, slots, mask, known, log_r_fn,
    *, shape, mean_type, var_type, clip_denoised, num_records,
):
    batch, num_timesteps = shape[0], schedule.num_timesteps
    x = _common.draw_x_T(x_T, key, shape, num_timesteps)
    if mask is not None:
        x_noise_key = jax.random.fold_in(key, num_timesteps + 1)
        x_noise = jax.random.normal(x_noise_key, shape, x.dtype)
        last = _common.full_t(num_timesteps - 1, batch)
        x = jnp.where(mask, gaussian.q_sample(schedule, known, last, noise=x_noise), x)

    def step(carry, t_scalar):
        x, xs, x0s = carry
        t = _common.full_t(t_scalar, batch)
        step_key, known_key = jax.random.split(jax.random.fold_in(key, t_scalar))
        out = p_sample(
            schedule, model_fn(x, t), x, t, key=step_key, mean_type=mean_type,
            var_type=var_type, clip_denoised=clip_denoised, log_r_fn=log_r_fn,
        )
        sample = out["sample"]
        if mask is not None:
            known_noise = jax.random.normal(known_key, shape, x.dtype)
            sample = replace_known(schedule, sample, t, mask, known, known_noise)
        slot = slots[t_scalar]
        xs, x0s = _common.record(xs, slot, x), _common.record(x0s, slot, out["pred_xstart"])
        return (sample, xs, x0s), None

    buffers = jnp.zeros((num_records,) + shape, x.dtype)
    steps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
    (x, xs, x0s), _ = jax.lax.scan(step, (x, buffers, buffers), steps)
    result = {"sample": x}
    if num_records:
        result.update(x_t=xs, pred_xstart=x0s)
    return result
