"""Gaussian diffusion: the forward process, its posterior and the reverse process.

Pure functions of a `Schedule` and arrays. Shapes: ``x`` has a leading batch axis B and
its last axis holds channels (NHWC images, or (B, D) vectors); ``t`` is an integer array
of shape ``(B,)`` with 0-based steps in [0, T). Per-example coefficients are gathered at
``t`` and shaped ``(B, 1, ..., 1)`` so they broadcast from the left without rank promotion.

Outside ``jit``, ``t`` is checked against [0, T). Inside ``jit`` its values cannot be
checked; an out-of-range ``t`` then gathers NaN (never a silently clamped coefficient), so
the mistake shows up in every result that depends on it.

References: DDPM (Ho et al. 2020), Eq. 4 (q(x_t|x_0)), Eq. 6-7 (the posterior), Eq. 11
and 15 (eps parameterisation); improved DDPM (Nichol & Dhariwal 2021), Eq. 15 (learned
range of variances); v-prediction (Salimans & Ho 2022, Sec. 4).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.schedules import Schedule

__all__ = [
    "MEAN_TYPES",
    "VAR_TYPES",
    "PMeanVariance",
    "check_choice",
    "extract",
    "model_output_channels",
    "p_mean_variance",
    "predict_eps_from_xstart",
    "predict_v",
    "predict_xstart_from_eps",
    "predict_xstart_from_v",
    "predict_xstart_from_xprev",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "resolve_noise",
    "split_model_output",
]

#: What the network predicts: the noise, x_0, the posterior mean of x_{t-1}, or v.
MEAN_TYPES = ("eps", "xstart", "xprev", "v")
#: How the reverse variance is chosen: the posterior variance beta-tilde (fixed_small),
#: beta (fixed_large), a predicted log variance (learned), or a predicted interpolation
#: between log beta and log beta-tilde (learned_range).
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")


class PMeanVariance(NamedTuple):
    """Parameters of p(x_{t-1} | x_t); every field has the shape of x_t."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_xstart: jax.Array


def check_choice(kind: str, value: str, valid: Sequence[str]) -> None:
    """Raises ValueError naming ``kind`` and the valid values when ``value`` is not one."""
    if value not in valid:
        raise ValueError(f"Unknown {kind} {value!r}; valid values are {list(valid)}.")


def model_output_channels(channels: int, var_type: str) -> int:
    """Channels a network must output for data with ``channels`` channels: 2C if learned."""
    check_choice("var_type", var_type, VAR_TYPES)
    return 2 * channels if var_type in LEARNED_VAR_TYPES else channels


def extract(coef: jax.Array, t, x_shape: Sequence[int]) -> jax.Array:
    """Gathers ``coef[t]`` and reshapes it to ``(B, 1, ..., 1)`` of ``len(x_shape)`` dims.

    Args:
      coef: 1-D array of length T (a `Schedule` field).
      t: integer array of shape ``(B,)`` with B == x_shape[0], values in [0, T).
      x_shape: shape of the array the result will multiply.

    Raises:
      ValueError: t not an integer array of shape (B,), or (outside jit) a value of t
        outside [0, T).
    """
    t = _check_t(t, x_shape, coef.shape[0])
    out = jnp.take(coef, t, mode="fill", fill_value=jnp.nan)
    return out.reshape((x_shape[0],) + (1,) * (len(x_shape) - 1))


def _check_t(t, x_shape, num_timesteps: int) -> jax.Array:
    if not isinstance(t, jax.core.Tracer):
        t_np = np.asarray(t)
        if not np.issubdtype(t_np.dtype, np.integer):
            raise ValueError(f"t must be an integer array; got dtype {t_np.dtype}.")
        if t_np.size and (t_np.min() < 0 or t_np.max() >= num_timesteps):
            bad = t_np[(t_np < 0) | (t_np >= num_timesteps)].ravel()[0]
            raise ValueError(
                f"t must lie in [0, {num_timesteps}) (0-based steps of a {num_timesteps}-step "
                f"schedule); got t = {int(bad)}."
            )
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"t must be an integer array; got dtype {t.dtype}.")
    if len(x_shape) < 1 or t.shape != (x_shape[0],):
        raise ValueError(
            f"t must have shape (B,) = ({x_shape[0] if len(x_shape) else '?'},) matching the "
            f"batch axis of x with shape {tuple(x_shape)}; got t with shape {t.shape}."
        )
    return t


def _check_same_shape(name_a: str, a, name_b: str, b) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {name_a} {jnp.shape(a)} "
            f"and {name_b} {jnp.shape(b)}."
        )


def resolve_noise(x_start, *, noise=None, key=None) -> jax.Array:
    """Returns ``noise`` (checked against x_start's shape) or N(0, I) noise drawn with ``key``.

    Exactly one of ``noise`` and ``key`` must be given.
    """
    if (noise is None) == (key is None):
        raise ValueError("Pass exactly one of `noise` (an array) and `key` (a PRNG key).")
    if noise is None:
        return jax.random.normal(key, jnp.shape(x_start), dtype=jnp.result_type(x_start))
    _check_same_shape("x_start", x_start, "noise", noise)
    return noise


def q_mean_variance(schedule: Schedule, x_start, t):
    """Moments of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM Eq. 4).

    Returns:
      ``(mean, variance, log_variance)``, each of x_start's shape.
    """
    shape = jnp.shape(x_start)
    mean = extract(schedule.sqrt_alphas_cumprod, t, shape) * x_start
    # exp of the stored log: 1 - alphas_cumprod in float32 cancels where abar is near 1.
    log_variance = jnp.broadcast_to(
        extract(schedule.log_one_minus_alphas_cumprod, t, shape), shape
    )
    variance = jnp.exp(log_variance)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, x_start, t, *, noise=None, key=None) -> jax.Array:
    """Draws x_t ~ q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM Eq. 4).

    Args:
      x_start: x_0, shape (B, ...).
      t: int array (B,).
      noise: eps of x_start's shape, or ``key`` to draw it (exactly one of the two).
    """
    noise = resolve_noise(x_start, noise=noise, key=key)
    shape = jnp.shape(x_start)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, shape) * x_start
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape) * noise
    )


def q_posterior_mean_variance(schedule: Schedule, x_start, x_t, t):
    """Moments of the posterior q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7).

    mean = coef1_t x_0 + coef2_t x_t, variance = beta-tilde_t.

    Returns:
      ``(mean, variance, log_variance_clipped)``, each of x_t's shape; the log variance at
      t = 0 (where beta-tilde is 0) is that of t = 1, as in DDPM.
    """
    _check_same_shape("x_start", x_start, "x_t", x_t)
    shape = jnp.shape(x_t)
    mean = (
        extract(schedule.posterior_mean_coef1, t, shape) * x_start
        + extract(schedule.posterior_mean_coef2, t, shape) * x_t
    )
    variance = jnp.broadcast_to(extract(schedule.posterior_variance, t, shape), shape)
    log_variance = jnp.broadcast_to(
        extract(schedule.posterior_log_variance_clipped, t, shape), shape
    )
    return mean, variance, log_variance


def predict_xstart_from_eps(schedule: Schedule, x_t, t, eps) -> jax.Array:
    """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (DDPM Eq. 4 solved for x_0)."""
    _check_same_shape("x_t", x_t, "eps", eps)
    shape = jnp.shape(x_t)
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, shape) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, shape) * eps
    )


def predict_eps_from_xstart(schedule: Schedule, x_t, t, pred_xstart) -> jax.Array:
    """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1), the inverse of the above."""
    _check_same_shape("x_t", x_t, "pred_xstart", pred_xstart)
    shape = jnp.shape(x_t)
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, shape) * x_t - pred_xstart
    ) / extract(schedule.sqrt_recipm1_alphas_cumprod, t, shape)


def predict_xstart_from_xprev(schedule: Schedule, x_t, t, xprev) -> jax.Array:
    """x_0 from the posterior mean: (xprev - coef2_t x_t) / coef1_t (DDPM Eq. 7 inverted)."""
    _check_same_shape("x_t", x_t, "xprev", xprev)
    shape = jnp.shape(x_t)
    coef1 = extract(schedule.posterior_mean_coef1, t, shape)
    coef2 = extract(schedule.posterior_mean_coef2, t, shape)
    return (xprev - coef2 * x_t) / coef1


def predict_v(schedule: Schedule, x_start, t, noise) -> jax.Array:
    """The v target of Salimans & Ho (2022, Sec. 4): sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    _check_same_shape("x_start", x_start, "noise", noise)
    shape = jnp.shape(x_start)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, shape) * noise
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape) * x_start
    )


def predict_xstart_from_v(schedule: Schedule, x_t, t, v) -> jax.Array:
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (Salimans & Ho 2022, Sec. 4)."""
    _check_same_shape("x_t", x_t, "v", v)
    shape = jnp.shape(x_t)
    return (
        extract(schedule.sqrt_alphas_cumprod, t, shape) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape) * v
    )


def split_model_output(model_output, x_t, var_type: str):
    """Splits a network output into (mean part, variance part or None), checking channels.

    Fixed variances: the output has x_t's shape. Learned variances: its last axis has 2C
    channels, the first C for the mean and the last C for the variance.
    """
    check_choice("var_type", var_type, VAR_TYPES)
    x_shape = tuple(jnp.shape(x_t))
    channels = x_shape[-1]
    want = x_shape[:-1] + (model_output_channels(channels, var_type),)
    if tuple(jnp.shape(model_output)) != want:
        raise ValueError(
            f"model_output must have shape {want} for var_type {var_type!r} and x_t of shape "
            f"{x_shape} (the last axis holds {'2C' if want[-1] != channels else 'C'} = "
            f"{want[-1]} channels); got {tuple(jnp.shape(model_output))}."
        )
    if var_type in LEARNED_VAR_TYPES:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def _fixed_large_log_variance(schedule: Schedule) -> jax.Array:
    # DDPM's "fixedlarge": beta_t, with beta-tilde_1 at t = 0 for a better decoder
    # log-likelihood (improved-diffusion's convention).
    if schedule.num_timesteps == 1:
        return schedule.log_betas
    return jnp.concatenate(
        [schedule.posterior_log_variance_clipped[1:2], schedule.log_betas[1:]]
    )


def _variance(schedule: Schedule, var_part, x_t, t, var_type: str):
    shape = jnp.shape(x_t)
    if var_type == "learned":
        return jnp.exp(var_part), var_part
    if var_type == "learned_range":
        min_log = extract(schedule.posterior_log_variance_clipped, t, shape)
        max_log = extract(schedule.log_betas, t, shape)
        frac = (var_part + 1.0) / 2.0  # the network's [-1, 1] mapped to [0, 1]
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return jnp.exp(log_variance), log_variance
    if var_type == "fixed_large":
        log_variance = jnp.broadcast_to(extract(_fixed_large_log_variance(schedule), t, shape), shape)
        return jnp.exp(log_variance), log_variance
    return (
        jnp.broadcast_to(extract(schedule.posterior_variance, t, shape), shape),
        jnp.broadcast_to(extract(schedule.posterior_log_variance_clipped, t, shape), shape),
    )


def p_mean_variance(
    schedule: Schedule,
    model_output,
    x_t,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
) -> PMeanVariance:
    """Parameters of the reverse step p(x_{t-1} | x_t) from a network's output.

    DDPM Eq. 1 and 11 with the variance choices of improved DDPM (Sec. 3.1):

    - mean_type ``eps``: pred_xstart from the predicted noise, mean = posterior mean;
      ``xstart``: the output is x_0; ``v``: the output is v (Salimans & Ho 2022);
      ``xprev``: the output is the mean itself and pred_xstart is solved from it.
    - var_type ``fixed_small``: beta-tilde_t (posterior variance, clipped log);
      ``fixed_large``: beta_t (beta-tilde_1 at t = 0); ``learned``: the second half of the
      output channels is the log variance; ``learned_range``: it is v in [-1, 1] and
      log sigma^2 = (v+1)/2 log beta_t + (1 - (v+1)/2) log beta-tilde_t (improved DDPM Eq. 15).

    Args:
      schedule: the diffusion schedule.
      model_output: x_t's shape, or 2C channels on the last axis for learned variances.
      x_t: shape (B, ..., C).
      t: int array (B,).
      clip_denoised: clip pred_xstart to [-1, 1] before the posterior mean is formed
        (for data scaled to [-1, 1], e.g. images).

    Returns:
      `PMeanVariance` (mean, variance, log_variance, pred_xstart), each of x_t's shape.
    """
    check_choice("mean_type", mean_type, MEAN_TYPES)
    mean_part, var_part = split_model_output(model_output, x_t, var_type)
    variance, log_variance = _variance(schedule, var_part, x_t, t, var_type)

    def process(x):
        return jnp.clip(x, -1.0, 1.0) if clip_denoised else x

    if mean_type == "xprev":
        pred_xstart = process(predict_xstart_from_xprev(schedule, x_t, t, mean_part))
        mean = mean_part
    else:
        if mean_type == "xstart":
            pred_xstart = process(mean_part)
        elif mean_type == "eps":
            pred_xstart = process(predict_xstart_from_eps(schedule, x_t, t, mean_part))
        else:  # "v"
            pred_xstart = process(predict_xstart_from_v(schedule, x_t, t, mean_part))
        mean, _, _ = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)
    return PMeanVariance(mean, variance, log_variance, pred_xstart)
