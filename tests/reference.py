"""An independent float64 NumPy reference of the DDPM / improved-DDPM math.

Written from the papers' formulas alone, never from the library, so that a mistake in
``diffusion_jax`` is not silently shared by its tests:

* [HJA20] Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239),
  and the conventions of its TensorFlow code (``diffusion_utils_2.py``: the coefficient
  names, the clipped posterior log variance, the 8-bit discretized decoder with its
  1e-12 floors).
* [ND21] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
  (arXiv:2102.09672): the cosine schedule, the learned (interpolated) variance, L_hybrid.
* [SH22] Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"
  (arXiv:2202.00512): the v parameterisation.
* [SD15] Sohl-Dickstein, Weiss, Maheswaranathan, Ganguli 2015: the 1/(T-t+1) schedule.

Everything is float64 NumPy; no JAX. Indices are 0-based: ``t = 0`` is the papers' step 1.
Arrays have a leading batch axis and the channels on the LAST axis; per-example
coefficients are broadcast from the left (shape ``(B, 1, ..., 1)``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "kl", "rescaled_kl", "hybrid", "bound")

# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """[HJA20] Sec. 4: betas linear from 1e-4 to 0.02 over T=1000 steps.

    [ND21] (and its code) scale both ends by 1000/T so other T keep the same total noise.
    """
    scale = 1000.0 / T
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """[ND21] eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T) + s)/(1 + s) * pi/2).

    beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped to max_beta (the paper clips at 0.999
    to avoid a singularity at t = T). With 0-based i = t - 1: beta_i = 1 - f(i+1)/f(i)
    (the ratio makes the f(0) normalisation cancel).
    """

    def f(t):
        return math.cos((t / T + s) / (1.0 + s) * math.pi / 2.0) ** 2

    return np.array(
        [min(1.0 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64
    )


def sohl_dickstein_betas(T: int, beta_1: float, max_beta: float = 0.999) -> np.ndarray:
    """[SD15] App. D: beta_t = 1/(T - t + 1) for t = 1..T, the first replaced by beta_1.

    The last one, 1/(T-T+1) = 1, would destroy all signal in one step; it is capped at
    max_beta.
    """
    t = np.arange(1, T + 1, dtype=np.float64)
    betas = 1.0 / (T - t + 1.0)
    betas[0] = beta_1
    return np.minimum(betas, max_beta)


class Schedule(NamedTuple):
    """All the derived coefficients of [HJA20]'s TF code, float64, each of shape (T,)."""

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


COEFFICIENT_NAMES = Schedule._fields


def schedule_from_betas(betas) -> Schedule:
    """The coefficients of q(x_t|x_0) ([HJA20] eq. 4) and q(x_{t-1}|x_t,x_0) (eqs. 6-7)."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)  # alpha_bar_t = prod_{s<=t} alpha_s
    abar_prev = np.concatenate([[1.0], abar[:-1]])  # alpha_bar_0 = 1 (no noise yet)
    abar_next = np.concatenate([abar[1:], [0.0]])
    # eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta_tilde at the first step is 0; the TF code clips its log by using step 2's value.
    posterior_log_variance_clipped = np.log(
        np.concatenate([posterior_variance[1:2], posterior_variance[1:]])
    )
    return Schedule(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        alphas_cumprod_next=abar_next,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        # eq. 7: mu_tilde = sqrt(abar_{t-1}) beta_t/(1-abar_t) x_0
        #                 + sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t) x_t
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )


def get_schedule(name: str, T: int, **kwargs) -> Schedule:
    makers = {
        "linear": linear_betas,
        "cosine": cosine_betas,
        "sohl_dickstein": sohl_dickstein_betas,
    }
    return schedule_from_betas(makers[name](T, **kwargs))


def extract(coef: np.ndarray, t, x: np.ndarray) -> np.ndarray:
    """coef[t] as shape (B, 1, ..., 1), to broadcast against x of shape (B, ...)."""
    t = np.asarray(t)
    return np.asarray(coef, np.float64)[t].reshape((t.shape[0],) + (1,) * (x.ndim - 1))


def mean_flat(x: np.ndarray) -> np.ndarray:
    """Mean over every axis but the batch axis."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


# ------------------------------------------------------------------------------------------
# q: forward process and posterior
# ------------------------------------------------------------------------------------------


def q_mean_variance(sch: Schedule, x_start, t):
    """[HJA20] eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
    mean = extract(sch.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = extract(1.0 - sch.alphas_cumprod, t, x_start) * np.ones_like(x_start)
    log_variance = extract(sch.log_one_minus_alphas_cumprod, t, x_start) * np.ones_like(
        x_start
    )
    return mean, variance, log_variance


def q_sample(sch: Schedule, x_start, t, noise):
    """[HJA20] eq. 4 reparameterised: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (
        extract(sch.sqrt_alphas_cumprod, t, x_start) * x_start
        + extract(sch.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )


def q_posterior_mean_variance(sch: Schedule, x_start, x_t, t):
    """[HJA20] eqs. 6-7: q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)."""
    mean = (
        extract(sch.posterior_mean_coef1, t, x_t) * x_start
        + extract(sch.posterior_mean_coef2, t, x_t) * x_t
    )
    ones = np.ones_like(x_t)
    variance = extract(sch.posterior_variance, t, x_t) * ones
    log_variance = extract(sch.posterior_log_variance_clipped, t, x_t) * ones
    return mean, variance, log_variance


# ------------------------------------------------------------------------------------------
# Conversions between parameterisations
# ------------------------------------------------------------------------------------------


def predict_xstart_from_eps(sch: Schedule, x_t, t, eps):
    """Invert eq. 4: x_0 = (x_t - sqrt(1-abar) eps)/sqrt(abar)
    (= x_t/sqrt(abar) - sqrt(1/abar - 1) eps, the TF code's form)."""
    abar = extract(sch.alphas_cumprod, t, x_t)
    return (x_t - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)


def predict_eps_from_xstart(sch: Schedule, x_t, t, pred_xstart):
    """Invert eq. 4 the other way: eps = (x_t - sqrt(abar) x_0)/sqrt(1 - abar)."""
    abar = extract(sch.alphas_cumprod, t, x_t)
    return (x_t - np.sqrt(abar) * pred_xstart) / np.sqrt(1.0 - abar)


def predict_xstart_from_xprev(sch: Schedule, x_t, t, xprev):
    """Invert eq. 7's mean: x_0 = (mu_tilde - coef2 x_t) / coef1."""
    coef1 = extract(sch.posterior_mean_coef1, t, x_t)
    coef2 = extract(sch.posterior_mean_coef2, t, x_t)
    return (xprev - coef2 * x_t) / coef1


def predict_v(sch: Schedule, x_start, t, noise):
    """[SH22] Sec. 4 / App. D: v = alpha_t eps - sigma_t x_0,
    with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)."""
    abar = extract(sch.alphas_cumprod, t, x_start)
    return np.sqrt(abar) * noise - np.sqrt(1.0 - abar) * x_start


def predict_xstart_from_v(sch: Schedule, x_t, t, v):
    """[SH22]: x_0 = alpha_t x_t - sigma_t v (since alpha^2 + sigma^2 = 1)."""
    abar = extract(sch.alphas_cumprod, t, x_t)
    return np.sqrt(abar) * x_t - np.sqrt(1.0 - abar) * v


# ------------------------------------------------------------------------------------------
# p: the reverse process from a model output
# ------------------------------------------------------------------------------------------


class PMeanVariance(NamedTuple):
    mean: np.ndarray
    variance: np.ndarray
    log_variance: np.ndarray
    pred_xstart: np.ndarray


def split_output(model_output, x_t, var_type):
    """Learned variances put 2C channels on the last axis: [mean part, variance part]."""
    C = x_t.shape[-1]
    if var_type in ("learned", "learned_range"):
        assert model_output.shape[-1] == 2 * C
        return model_output[..., :C], model_output[..., C:]
    assert model_output.shape[-1] == C
    return model_output, None


def model_variance(sch: Schedule, var_part, x_t, t, var_type):
    """The variance of p(x_{t-1}|x_t): (variance, log_variance), both of x_t's shape."""
    ones = np.ones_like(x_t)
    if var_type == "fixed_small":
        # [HJA20] Sec. 3.2: sigma_t^2 = beta_tilde_t (optimal for a deterministic x_0).
        var = sch.posterior_variance
        log_var = sch.posterior_log_variance_clipped
        return extract(var, t, x_t) * ones, extract(log_var, t, x_t) * ones
    if var_type == "fixed_large":
        # [HJA20] Sec. 3.2: sigma_t^2 = beta_t (optimal for x_0 ~ N(0, I)); the first step
        # uses beta_tilde_2 so the decoder's variance is not the tiny beta_1.
        var = np.concatenate([sch.posterior_variance[1:2], sch.betas[1:]])
        return extract(var, t, x_t) * ones, extract(np.log(var), t, x_t) * ones
    if var_type == "learned":
        log_var = var_part
        return np.exp(log_var), log_var
    if var_type == "learned_range":
        # [ND21] eq. 15: Sigma = exp(v log beta + (1 - v) log beta_tilde), the network's
        # output mapped from [-1, 1] to v in [0, 1].
        frac = (var_part + 1.0) / 2.0
        max_log = extract(np.log(sch.betas), t, x_t)
        min_log = extract(sch.posterior_log_variance_clipped, t, x_t)
        log_var = frac * max_log + (1.0 - frac) * min_log
        return np.exp(log_var), log_var
    raise ValueError(var_type)


def p_mean_variance(
    sch: Schedule, model_output, x_t, t, *, mean_type, var_type, clip_denoised=False
) -> PMeanVariance:
    """[HJA20] Sec. 3.2 / [ND21] Sec. 3.1: the Gaussian p(x_{t-1} | x_t)."""
    mean_part, var_part = split_output(model_output, x_t, var_type)
    variance, log_variance = model_variance(sch, var_part, x_t, t, var_type)

    def process(x0):
        return np.clip(x0, -1.0, 1.0) if clip_denoised else x0

    if mean_type == "xprev":
        pred_xstart = process(predict_xstart_from_xprev(sch, x_t, t, mean_part))
        mean = mean_part
    else:
        if mean_type == "xstart":
            x0 = mean_part
        elif mean_type == "eps":
            # [HJA20] eq. 11 is this same mean written directly in eps.
            x0 = predict_xstart_from_eps(sch, x_t, t, mean_part)
        elif mean_type == "v":
            x0 = predict_xstart_from_v(sch, x_t, t, mean_part)
        else:
            raise ValueError(mean_type)
        pred_xstart = process(x0)
        mean, _, _ = q_posterior_mean_variance(sch, pred_xstart, x_t, t)
    return PMeanVariance(mean, variance, log_variance, pred_xstart)


# ------------------------------------------------------------------------------------------
# Densities and divergences (elementwise, nats)
# ------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) per element, nats.

    = 1/2 [ lv2 - lv1 + e^{lv1 - lv2} + (m1 - m2)^2 e^{-lv2} - 1 ].
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + np.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * np.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of Phi used by [HJA20]'s code (Page 1977)."""
    x = np.asarray(x, np.float64)
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """[HJA20] Sec. 3.3 eq. 13: log p(x_0|x_1) for 8-bit data scaled to [-1, 1], nats.

    Each value owns the bin [x - 1/255, x + 1/255]; the lowest bin extends to -inf and the
    highest to +inf. Computed the naive way of the TF code, in float64, with its floors.
    """
    x = np.asarray(x, np.float64)
    centered_x = x - means
    inv_stdv = np.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    return np.where(
        x < -0.999,
        log_cdf_plus,
        np.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def gaussian_log_likelihood(x, *, means, log_scales):
    """log N(x; mean, exp(log_scale)^2) per element, nats (a continuous decoder)."""
    z = (x - means) * np.exp(-log_scales)
    return -0.5 * np.log(2.0 * np.pi) - log_scales - 0.5 * z**2


# ------------------------------------------------------------------------------------------
# The variational bound, in bits per dimension
# ------------------------------------------------------------------------------------------


def vb_terms_bpd(
    sch: Schedule,
    model_output,
    x_start,
    x_t,
    t,
    *,
    mean_type,
    var_type,
    clip_denoised=False,
    decoder_type="discretized",
):
    """[HJA20] eq. 5: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
    L_0 = -log p(x_0|x_1) at t = 0, each averaged over dimensions, in bits."""
    true_mean, _, true_log_var = q_posterior_mean_variance(sch, x_start, x_t, t)
    out = p_mean_variance(
        sch,
        model_output,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance))
    kl = kl / np.log(2.0)
    log_scales = 0.5 * out.log_variance
    if decoder_type == "discretized":
        ll = discretized_gaussian_log_likelihood(
            x_start, means=out.mean, log_scales=log_scales
        )
    elif decoder_type == "gaussian":
        ll = gaussian_log_likelihood(x_start, means=out.mean, log_scales=log_scales)
    else:
        raise ValueError(decoder_type)
    decoder_nll = -mean_flat(ll) / np.log(2.0)
    output = np.where(np.asarray(t) == 0, decoder_nll, kl)
    return {"output": output, "pred_xstart": out.pred_xstart}


def prior_bpd(sch: Schedule, x_start):
    """[HJA20] eq. 5: L_T = KL(q(x_T|x_0) || N(0, I)), averaged over dimensions, bits."""
    T = sch.num_timesteps
    t = np.full((x_start.shape[0],), T - 1)
    mean, _, log_var = q_mean_variance(sch, x_start, t)
    kl = normal_kl(mean, log_var, 0.0, 0.0)
    return mean_flat(kl) / np.log(2.0)


def training_target(sch: Schedule, x_start, x_t, t, noise, mean_type):
    if mean_type == "eps":
        return noise  # [HJA20] eq. 14 (L_simple)
    if mean_type == "xstart":
        return x_start
    if mean_type == "xprev":
        return q_posterior_mean_variance(sch, x_start, x_t, t)[0]
    if mean_type == "v":
        return predict_v(sch, x_start, t, noise)  # [SH22]
    raise ValueError(mean_type)


def training_losses(
    sch: Schedule,
    model_fn: Callable,
    x_start,
    t,
    *,
    noise,
    mean_type,
    var_type,
    loss_type,
    clip_denoised=False,
    decoder_type="discretized",
):
    """Per-example training losses: {'loss', 'mse', 'vb'}, each (B,).

    'mse': [HJA20] eq. 14 generalised to any target; 'vb': one term of eq. 5 in bits/dim;
    'rescaled_kl': vb * T; 'hybrid': [ND21] eq. 16, L_simple + lambda L_vlb with
    lambda = 1/1000 on the T-rescaled term (the mean gets no gradient from vb); 'bound':
    T * L_t + L_T, an unbiased one-sample estimate of the whole bound for t ~ U{0..T-1}.
    """
    T = sch.num_timesteps
    x_t = q_sample(sch, x_start, t, noise)
    model_output = model_fn(x_t, t)
    C = x_start.shape[-1]
    target = training_target(sch, x_start, x_t, t, noise, mean_type)
    mse = mean_flat((target - model_output[..., :C]) ** 2)
    vb = vb_terms_bpd(
        sch,
        model_output,
        x_start,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        decoder_type=decoder_type,
    )["output"]
    if loss_type == "mse":
        loss = mse
    elif loss_type == "kl":
        loss = vb
    elif loss_type == "rescaled_kl":
        loss = vb * T
    elif loss_type == "hybrid":
        loss = mse + vb * T / 1000.0
    elif loss_type == "bound":
        loss = T * vb + prior_bpd(sch, x_start)
    else:
        raise ValueError(loss_type)
    return {"loss": loss, "mse": mse, "vb": vb}


def calc_bpd_loop(
    sch: Schedule,
    model_fn: Callable,
    x_start,
    *,
    noise,
    mean_type,
    var_type,
    clip_denoised=True,
    decoder_type="discretized",
):
    """The whole bound of [HJA20] eq. 5 in bits/dim, term by term, with explicit noise.

    noise has shape (T, *x_start.shape); x_t = q_sample(x_0, t, noise[t]).
    Returns total_bpd (B,), prior_bpd (B,), vb (B, T), xstart_mse (B, T), mse (B, T)
    where mse compares the eps implied by the (possibly clipped) predicted x_0 to the noise.
    """
    T = sch.num_timesteps
    B = x_start.shape[0]
    vb = np.zeros((B, T))
    xstart_mse = np.zeros((B, T))
    mse = np.zeros((B, T))
    for step in range(T):
        t = np.full((B,), step)
        x_t = q_sample(sch, x_start, t, noise[step])
        out = vb_terms_bpd(
            sch,
            model_fn(x_t, t),
            x_start,
            x_t,
            t,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
            decoder_type=decoder_type,
        )
        vb[:, step] = out["output"]
        xstart_mse[:, step] = mean_flat((out["pred_xstart"] - x_start) ** 2)
        eps = predict_eps_from_xstart(sch, x_t, t, out["pred_xstart"])
        mse[:, step] = mean_flat((eps - noise[step]) ** 2)
    prior = prior_bpd(sch, x_start)
    return {
        "total_bpd": vb.sum(axis=1) + prior,
        "prior_bpd": prior,
        "vb": vb,
        "xstart_mse": xstart_mse,
        "mse": mse,
    }
