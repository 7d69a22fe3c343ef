"""KL terms, decoder likelihoods, the variational bound's per-step terms and training losses.

Units: `normal_kl` and the log-likelihoods are elementwise, in nats. Every ``*_bpd``
function averages over all non-batch dimensions and divides by ln 2: bits per dimension,
one value per example, shape ``(B,)``.

References: DDPM (Ho et al. 2020) Eq. 5 (the bound), Eq. 13 (the discretized decoder),
Eq. 14 (L_simple); improved DDPM (Nichol & Dhariwal 2021) Eq. 16 (L_hybrid).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import gaussian
from diffusion_jax.gaussian import LEARNED_VAR_TYPES, MEAN_TYPES, VAR_TYPES, check_choice
from diffusion_jax.schedules import Schedule

__all__ = [
    "DECODER_TYPES",
    "LOSS_TYPES",
    "approx_standard_normal_cdf",
    "check_loss_config",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
    "prior_bpd",
    "training_losses",
    "training_losses_from_output",
    "vb_terms_bpd",
]

LOSS_TYPES = ("mse", "kl", "rescaled_kl", "hybrid", "bound")
#: ``discretized``: DDPM's 8-bit image decoder; ``gaussian``: a continuous Gaussian density
#: (for continuous data such as 2-D toy sets, where it gives a bound on log density).
DECODER_TYPES = ("discretized", "gaussian")

_LN2 = math.log(2.0)
# The floor DDPM puts inside its logs: log(max(p, 1e-12)).
_LOG_FLOOR = math.log(1e-12)
# sqrt(2/pi) and the cubic coefficient of the tanh approximation of the normal CDF.
_K = math.sqrt(2.0 / math.pi)
_C = 0.044715
# Standardised distances beyond which every bin probability is far below the floor
# (the tanh CDF's tail at 40 scales is ~exp(-4600)); clipping keeps x^3 finite.
_Z_MAX = 40.0


def mean_flat(x) -> jax.Array:
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return jnp.mean(x, axis=tuple(range(1, jnp.ndim(x))))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)).
    Arguments broadcast against each other (same rank required).
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by DDPM's decoder.

    0.5 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Elementwise.
    """
    return 0.5 * (1.0 + jnp.tanh(_K * (x + _C * x**3)))


def _cdf_logit(z):
    # 0.5 (1 + tanh(u)) = sigmoid(2u): the tanh CDF is a sigmoid of this logit.
    return 2.0 * _K * (z + _C * z**3)


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> jax.Array:
    """log p(x) of the 8-bit discretized Gaussian decoder (DDPM Eq. 13), elementwise nats.

    ``x`` holds 8-bit values scaled to [-1, 1]; each is the centre of a bin of width 2/255.
    The first bin is open below and the last open above. The normal CDF is DDPM's tanh
    approximation and each log is floored at log(1e-12), as in DDPM's code.

    The tanh CDF is a sigmoid, so every term is evaluated in log space:
    log CDF(z) = log_sigmoid(a(z)), log(1 - CDF(z)) = log_sigmoid(-a(z)) and
    log(CDF(z+) - CDF(z-)) = log_sigmoid(a+) + log_sigmoid(-a-) + log(1 - exp(-(a+ - a-)))
    with a+ - a- formed in closed form. float32 therefore gives what the formula gives in
    float64 deep in the tails, where the naive difference of two CDFs near 1 cancels.

    Args:
      x: data in [-1, 1], shape S.
      means, log_scales: decoder mean and log standard deviation, shape S.

    Returns:
      log-likelihood in nats, shape S.
    """
    if not (jnp.shape(x) == jnp.shape(means) == jnp.shape(log_scales)):
        raise ValueError(
            "x, means and log_scales must have the same shape; got "
            f"{jnp.shape(x)}, {jnp.shape(means)} and {jnp.shape(log_scales)}."
        )
    inv_stdv = jnp.exp(-log_scales)
    centered = x - means
    z_plus = jnp.clip(inv_stdv * (centered + 1.0 / 255.0), -_Z_MAX, _Z_MAX)
    z_min = jnp.clip(inv_stdv * (centered - 1.0 / 255.0), -_Z_MAX, _Z_MAX)
    log_cdf_plus = jax.nn.log_sigmoid(_cdf_logit(z_plus))
    log_one_minus_cdf_min = jax.nn.log_sigmoid(-_cdf_logit(z_min))
    # a+ - a- = 2K (z+ - z-) (1 + C (z+^2 + z+ z- + z-^2)), exact algebra, no cancellation.
    logit_gap = (
        2.0 * _K * (z_plus - z_min) * (1.0 + _C * (z_plus**2 + z_plus * z_min + z_min**2))
    )
    # A gap of 0 (both edges clipped) means a probability below the floor; keep the log
    # finite so gradients through the floor stay 0 rather than NaN.
    logit_gap = jnp.maximum(logit_gap, 1e-30)
    log_cdf_delta = log_cdf_plus + log_one_minus_cdf_min + jnp.log(-jnp.expm1(-logit_gap))
    log_probs = jnp.where(
        x < -0.999,
        jnp.maximum(log_cdf_plus, _LOG_FLOOR),
        jnp.where(
            x > 0.999,
            jnp.maximum(log_one_minus_cdf_min, _LOG_FLOOR),
            jnp.maximum(log_cdf_delta, _LOG_FLOOR),
        ),
    )
    return log_probs


def gaussian_log_likelihood(x, *, means, log_scales) -> jax.Array:
    """log N(x; means, exp(log_scales)^2), elementwise, in nats (a continuous decoder)."""
    if not (jnp.shape(x) == jnp.shape(means) == jnp.shape(log_scales)):
        raise ValueError(
            "x, means and log_scales must have the same shape; got "
            f"{jnp.shape(x)}, {jnp.shape(means)} and {jnp.shape(log_scales)}."
        )
    return -0.5 * (
        math.log(2.0 * math.pi)
        + 2.0 * log_scales
        + jnp.square(x - means) * jnp.exp(-2.0 * log_scales)
    )


def _decoder_nll_bpd(x_start, mean, log_variance, decoder_type: str) -> jax.Array:
    log_scales = 0.5 * log_variance
    if decoder_type == "discretized":
        ll = discretized_gaussian_log_likelihood(x_start, means=mean, log_scales=log_scales)
    else:
        ll = gaussian_log_likelihood(x_start, means=mean, log_scales=log_scales)
    return -mean_flat(ll) / _LN2


def vb_terms_bpd(
    schedule: Schedule,
    model_output,
    x_start,
    x_t,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
    decoder_type: str = "discretized",
) -> dict:
    """One term of the variational bound (DDPM Eq. 5), in bits per dimension.

    For t > 0: L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0:
    L_0 = -log p(x_0 | x_1) under the decoder (``discretized`` 8-bit bins or a continuous
    ``gaussian`` density). Each is averaged over the non-batch dimensions, divided by ln 2.

    Args:
      model_output: the network output at (x_t, t), see `gaussian.p_mean_variance`.
      x_start, x_t: shape (B, ..., C). t: int array (B,).

    Returns:
      dict with ``output`` (B,) bits/dim and ``pred_xstart`` (x_t's shape).
    """
    check_choice("decoder_type", decoder_type, DECODER_TYPES)
    true_mean, _, true_log_variance = gaussian.q_posterior_mean_variance(
        schedule, x_start, x_t, t
    )
    out = gaussian.p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / _LN2
    decoder_nll = _decoder_nll_bpd(x_start, out.mean, out.log_variance, decoder_type)
    return {"output": jnp.where(t == 0, decoder_nll, kl), "pred_xstart": out.pred_xstart}


def prior_bpd(schedule: Schedule, x_start) -> jax.Array:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape (B,) (DDPM Eq. 5).

    It does not depend on the model; it is small when the schedule destroys the data.
    """
    batch = jnp.shape(x_start)[0]
    t = jnp.full((batch,), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = gaussian.q_mean_variance(schedule, x_start, t)
    zeros = jnp.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_variance, zeros, zeros)) / _LN2


def check_loss_config(*, mean_type: str, var_type: str, loss_type: str) -> None:
    """Checks the names, and that the loss can train what the model predicts.

    ``mse`` cannot train a learned variance (its gradient never reaches it): use
    ``hybrid``, ``kl``, ``rescaled_kl`` or ``bound``. ``hybrid`` trains only the variance
    through its vb term, so a fixed variance makes it ``mse`` with extra work.

    Raises:
      ValueError: an unknown name (listing the valid ones) or an incompatible pair.
    """
    check_choice("mean_type", mean_type, MEAN_TYPES)
    check_choice("var_type", var_type, VAR_TYPES)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if loss_type == "mse" and var_type in LEARNED_VAR_TYPES:
        raise ValueError(
            f"loss_type 'mse' cannot train var_type {var_type!r}: no gradient reaches the "
            "variance. Use loss_type 'hybrid' (L_simple + L_vb, improved DDPM), 'kl', "
            "'rescaled_kl' or 'bound', or a fixed var_type ('fixed_small', 'fixed_large')."
        )
    if loss_type == "hybrid" and var_type not in LEARNED_VAR_TYPES:
        raise ValueError(
            f"loss_type 'hybrid' adds a vb term that trains only a learned variance; with "
            f"var_type {var_type!r} it would equal 'mse'. Use 'mse', or var_type 'learned' "
            "or 'learned_range'."
        )


def training_losses(
    schedule: Schedule,
    model_fn: Callable,
    x_start,
    t,
    *,
    noise=None,
    key=None,
    mean_type: str,
    var_type: str,
    loss_type: str,
    clip_denoised: bool = False,
    decoder_type: str = "discretized",
) -> dict:
    """Training losses of one batch: noises x_0 to x_t, calls the model, scores its output.

    Args:
      model_fn: ``model_fn(x_t, t) -> model_output`` (x_t's shape, or 2C channels for
        learned variances).
      x_start: x_0, shape (B, ..., C). t: int array (B,), usually uniform on [0, T).
      noise / key: the forward noise, or a key to draw it (exactly one).

    Returns:
      See `training_losses_from_output`.
    """
    check_loss_config(mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    noise = gaussian.resolve_noise(x_start, noise=noise, key=key)
    x_t = gaussian.q_sample(schedule, x_start, t, noise=noise)
    model_output = model_fn(x_t, t)
    return training_losses_from_output(
        schedule,
        model_output,
        x_start,
        x_t,
        t,
        noise,
        mean_type=mean_type,
        var_type=var_type,
        loss_type=loss_type,
        clip_denoised=clip_denoised,
        decoder_type=decoder_type,
    )


def training_losses_from_output(
    schedule: Schedule,
    model_output,
    x_start,
    x_t,
    t,
    noise,
    *,
    mean_type: str,
    var_type: str,
    loss_type: str,
    clip_denoised: bool = False,
    decoder_type: str = "discretized",
) -> dict:
    """Training losses given the network's output at (x_t, t); every value has shape (B,).

    - ``mse`` (L_simple, DDPM Eq. 14): mean squared error of the mean part of the output
      against its target (eps: the noise; xstart: x_0; xprev: the posterior mean; v: v).
    - ``kl``: the bound term L_t in bits/dim (`vb_terms_bpd`); ``rescaled_kl``: L_t * T.
    - ``hybrid`` (improved DDPM Eq. 16): mse + L_t * T / 1000, where L_t sees the mean
      part through ``stop_gradient`` so it trains only the variance.
    - ``bound``: T * L_t + L_T (the prior term), an unbiased estimate, for t uniform, of
      the whole negative bound in bits/dim; gradients reach the betas when the schedule
      was built from traced betas (`Schedule.from_betas` inside ``grad``).

    Returns:
      dict with ``loss``, ``mse``, ``vb`` (L_t in bits/dim) and ``prior_bpd`` (L_T), each
      (B,). Values that are not part of the loss carry no gradient.
    """
    check_loss_config(mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    mean_part, var_part = gaussian.split_model_output(model_output, x_t, var_type)
    _check_shapes(x_start, x_t, noise)
    if mean_type == "eps":
        target = noise
    elif mean_type == "xstart":
        target = x_start
    elif mean_type == "v":
        target = gaussian.predict_v(schedule, x_start, t, noise)
    else:  # "xprev"
        target, _, _ = gaussian.q_posterior_mean_variance(schedule, x_start, x_t, t)
    mse = mean_flat(jnp.square(target - mean_part))

    vb_model_output = model_output
    if loss_type == "hybrid":
        # The vb term must not pull on the mean: it trains the variance only.
        vb_model_output = jnp.concatenate([jax.lax.stop_gradient(mean_part), var_part], -1)
    vb = vb_terms_bpd(
        schedule,
        vb_model_output,
        x_start,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        decoder_type=decoder_type,
    )["output"]
    prior = prior_bpd(schedule, x_start)
    num_timesteps = schedule.num_timesteps
    sg = jax.lax.stop_gradient
    if loss_type == "mse":
        loss, vb, prior = mse, sg(vb), sg(prior)
    elif loss_type == "kl":
        loss, mse, prior = vb, sg(mse), sg(prior)
    elif loss_type == "rescaled_kl":
        loss, mse, prior = vb * num_timesteps, sg(mse), sg(prior)
    elif loss_type == "hybrid":
        loss, prior = mse + vb * (num_timesteps / 1000.0), sg(prior)
    else:  # "bound"
        loss, mse = vb * num_timesteps + prior, sg(mse)
    return {"loss": loss, "mse": mse, "vb": vb, "prior_bpd": prior}


def _check_shapes(x_start, x_t, noise) -> None:
    shapes = {"x_start": jnp.shape(x_start), "x_t": jnp.shape(x_t), "noise": jnp.shape(noise)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"x_start, x_t and noise must have the same shape; got {shapes}.")
