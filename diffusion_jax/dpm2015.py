"""Gaussian diffusion the 2015 way (Sohl-Dickstein et al. 2015, arXiv 1503.03585 v8).

What differs from DDPM (`gaussian`, `losses`):

- The reverse kernel p(x_{t-1} | x_t) = N(mu, diag(Sigma)) comes from two network outputs
  (z_mu, z_Sigma) per coordinate through Eq. 64-65:

      Sigma = sigmoid(z_Sigma + logit(beta_t)),    mu = (x_t - z_mu)(1 - Sigma) + z_mu,

  so z_Sigma = 0 gives the forward variance beta_t and mu decays from x_t toward z_mu.
- The first reverse step is not learned: p(x_0 | x_1) = q(x_1 | x_0) pi(x_0) / pi(x_1)
  (Appendix B.2), which for pi = N(0, I) is N(x_0; sqrt(1 - beta_1) x_1, beta_1 I).
- The objective is the bound K of Eq. 14,

      K = -sum_{t=2}^{T} E_q[KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))]
          + H_q(X_T | X_0) - H_q(X_1 | X_0) - H_p(X_T),

  T - 1 KL terms (the paper's code multiplies one term by T, over-weighting them). K
  replaces E_q[log pi(x_t)] by -H_p(X_T) at t = 1 and t = T (Appendix B.1-B.2), which is
  exact for data with E|x_0|^2 = D, i.e. data scaled to unit variance per coordinate.
- The forward schedule can be learned (Sec. 2.4.1): beta_2..beta_T move by gradient
  ascent on K with the noise frozen (reparameterised x_t), beta_1 stays a small constant
  (`learned_betas`); or it is fixed to beta_t = 1 / (T - t + 1)
  (`schedules.sohl_dickstein_betas`).
- L_null, the log-likelihood under the prior pi = N(0, I), is the baseline the paper's
  Table 1 subtracts: K - L_null is how much better than an isotropic Gaussian the model is.

Conventions are those of `gaussian`: a `Schedule` argument, 0-based ``t`` (index t is the
paper's step t + 1, so the KL terms have t in [1, T) and t = 0 is the fixed first step),
``t`` an int array of shape (B,), data (B, D). A model output is an array of shape
(B, 2D): z_mu in the first D channels, z_Sigma in the last D. Units: nats per example
(summed over the D coordinates) unless a name says bits.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import gaussian, losses
from diffusion_jax.gaussian import extract
from diffusion_jax.schedules import Schedule

__all__ = [
    "LN2",
    "bound_estimate",
    "bound_k",
    "entropy_terms",
    "forward_reversal_output",
    "geometric_betas",
    "kl_terms",
    "learned_betas",
    "logit",
    "null_log_likelihood",
    "p_mean_variance",
    "p_sample_loop",
    "reverse_mean_variance",
    "schedule_from_offsets",
]

#: ln 2: divide nats by it for bits.
LN2 = math.log(2.0)
# Learned beta logits are clipped to [_MIN_LOGIT, _MAX_LOGIT]: sigmoid(12) = 1 - 6e-6 still
# leaves 1 - beta representable in float32, and sigmoid(-30) = 9e-14 keeps beta positive
# while leaving room (and a gradient) for the tiny early betas a beta_1 of 1e-6 implies.
_MAX_LOGIT = 12.0
_MIN_LOGIT = -30.0
_LOG_2PI_E = math.log(2.0 * math.pi * math.e)


def logit(p):
    """log(p / (1 - p)), elementwise (NumPy in, NumPy out; JAX in, JAX out)."""
    if isinstance(p, (np.ndarray, float, int)):
        p = np.asarray(p, dtype=np.float64)
        return np.log(p) - np.log1p(-p)
    return jnp.log(p) - jnp.log1p(-p)


def geometric_betas(
    num_timesteps: int, *, beta_1: float = 1e-3, final_noise: float = 0.9999
) -> np.ndarray:
    """Betas whose noise variances 1 - abar_t grow geometrically from beta_1 to final_noise.

    1 - abar_t = beta_1 (final_noise / beta_1)^(t / (T - 1)) for 0-based t, so every step
    multiplies the noise variance by the same factor: the same number of steps for each
    decade of noise scale. A baseline for learned betas when beta_1 is so small that the
    schedule 1 / (T - t + 1) would jump from beta_1 straight to 1 / (T - 1).

    Returns:
      float64 (T,) betas in (0, 1), betas[0] == beta_1.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) \
            or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2; got {num_timesteps!r}.")
    if not 0.0 < beta_1 < final_noise < 1.0:
        raise ValueError(
            f"need 0 < beta_1 < final_noise < 1; got beta_1={beta_1}, final_noise={final_noise}."
        )
    u = np.arange(num_timesteps, dtype=np.float64) / (num_timesteps - 1)
    one_minus = np.exp(np.log(beta_1) + (np.log(final_noise) - np.log(beta_1)) * u)
    abar = 1.0 - one_minus
    return 1.0 - abar / np.concatenate([[1.0], abar[:-1]])


def learned_betas(offsets, baseline) -> jax.Array:
    """The learned forward schedule of Sec. 2.4.1: beta_1 fixed, beta_2..beta_T learned.

    beta_1 = baseline[0]; beta_t = sigmoid(logit(baseline[t]) + offsets[t - 1]) for the
    0-based t >= 1, with the logit clipped to [-30, 12] so every beta stays in (0, 1) in
    float32. Zero offsets give the baseline (e.g. `schedules.sohl_dickstein_betas`).

    Args:
      offsets: float (T - 1,), the learned parameters (a traced array under ``grad``).
      baseline: (T,) betas in (0, 1), a constant (NumPy).

    Returns:
      float32 (T,) betas.
    """
    baseline = np.asarray(baseline, dtype=np.float64)
    if baseline.ndim != 1 or baseline.shape[0] < 2:
        raise ValueError(f"baseline must be 1-D with T >= 2 betas; got shape {baseline.shape}.")
    if not np.all((baseline > 0.0) & (baseline < 1.0)):
        raise ValueError("baseline betas must lie in the open interval (0, 1).")
    if jnp.shape(offsets) != (baseline.shape[0] - 1,):
        raise ValueError(
            f"offsets must have shape (T - 1,) = ({baseline.shape[0] - 1},) for T = "
            f"{baseline.shape[0]}; got {jnp.shape(offsets)}."
        )
    base_logits = jnp.asarray(logit(baseline[1:]), jnp.float32)
    logits = jnp.clip(base_logits + offsets, _MIN_LOGIT, _MAX_LOGIT)
    first = jnp.asarray(baseline[:1], jnp.float32)
    return jnp.concatenate([first, jax.nn.sigmoid(logits)])


def schedule_from_offsets(offsets, baseline) -> Schedule:
    """`Schedule.from_betas(learned_betas(offsets, baseline))`; traced offsets keep
    gradients (coefficients in JAX), concrete ones are computed in float64 NumPy."""
    betas = learned_betas(offsets, baseline)
    if not isinstance(betas, jax.core.Tracer):
        betas = np.asarray(betas, dtype=np.float64)
    return Schedule.from_betas(betas)


def _split(model_output, x_t):
    shape = jnp.shape(x_t)
    want = shape[:-1] + (2 * shape[-1],)
    if jnp.shape(model_output) != want:
        raise ValueError(
            f"model_output must have shape {want} (z_mu and z_Sigma, 2 x {shape[-1]} "
            f"channels) for x_t of shape {shape}; got {jnp.shape(model_output)}."
        )
    channels = shape[-1]
    return model_output[..., :channels], model_output[..., channels:]


def _logit_beta(schedule: Schedule, t, shape) -> jax.Array:
    # logit(beta) = log beta - log(1 - beta), from the stored logs (no 1 - beta rounding).
    return extract(schedule.log_betas - jnp.log(schedule.alphas), t, shape)


def reverse_mean_variance(schedule: Schedule, model_output, x_t, t):
    """The learned reverse kernel of Eq. 64-65: Sigma = sigmoid(z_Sigma + logit(beta_t)),
    mu = (x_t - z_mu)(1 - Sigma) + z_mu.

    Args:
      model_output: (B, 2D), z_mu then z_Sigma.
      x_t: (B, D). t: int (B,), the kernel p(x_{t-1} | x_t) of 0-based step t.

    Returns:
      ``(mean, variance, log_variance)``, each (B, D); the log variance is
      log_sigmoid(...) (no log of a rounded variance).
    """
    z_mu, z_sigma = _split(model_output, x_t)
    u = z_sigma + _logit_beta(schedule, t, jnp.shape(x_t))
    variance = jax.nn.sigmoid(u)
    mean = x_t * jax.nn.sigmoid(-u) + z_mu * variance
    return mean, variance, jax.nn.log_sigmoid(u)


def forward_reversal_output(schedule: Schedule, x_t, t) -> jax.Array:
    """The model output for which Eq. 64-65 give N(sqrt(1 - beta_t) x_t, beta_t I).

    That kernel is the forward kernel run backwards, the exact reverse kernel when the
    data are N(0, I) (the paper's debug check), and the fixed first step. z_Sigma = 0 and
    z_mu = x_t sqrt(alpha_t) / (1 + sqrt(alpha_t)) solve (x - z)(1 - beta) + z =
    sqrt(1 - beta) x. Shape (B, 2D).
    """
    sqrt_alpha = jnp.sqrt(extract(schedule.alphas, t, jnp.shape(x_t)))
    z_mu = x_t * sqrt_alpha / (1.0 + sqrt_alpha)
    return jnp.concatenate([z_mu, jnp.zeros_like(x_t)], axis=-1)


def p_mean_variance(schedule: Schedule, model_output, x_t, t):
    """p(x_{t-1} | x_t): Eq. 64-65 for t >= 1, the fixed first step at t = 0.

    At t = 0 the kernel is q(x_1 | x_0) pi(x_0) / pi(x_1) = N(sqrt(1 - beta_1) x_1,
    beta_1 I) (Appendix B.2) whatever ``model_output`` holds.

    Returns:
      ``(mean, variance, log_variance)``, each (B, D).
    """
    mean, variance, log_variance = reverse_mean_variance(schedule, model_output, x_t, t)
    shape = jnp.shape(x_t)
    first = jnp.reshape(jnp.asarray(t) == 0, (-1,) + (1,) * (len(shape) - 1))
    mean = jnp.where(first, extract(jnp.sqrt(schedule.alphas), t, shape) * x_t, mean)
    log_beta = jnp.broadcast_to(extract(schedule.log_betas, t, shape), shape)
    log_variance = jnp.where(first, log_beta, log_variance)
    variance = jnp.where(first, jnp.exp(log_beta), variance)
    return mean, variance, log_variance


def _sum_dims(x) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, jnp.ndim(x))))


def kl_terms(schedule: Schedule, model_output, x_start, x_t, t) -> jax.Array:
    """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) summed over dimensions: (B,) nats.

    One term of the sum in Eq. 14 for t >= 1 (the paper's t = 2..T), p from Eq. 64-65.
    t = 0 has no KL term (the first step is fixed); it returns 0 there.
    """
    true_mean, _, true_log_variance = gaussian.q_posterior_mean_variance(
        schedule, x_start, x_t, t
    )
    mean, _, log_variance = reverse_mean_variance(schedule, model_output, x_t, t)
    kl = _sum_dims(losses.normal_kl(true_mean, true_log_variance, mean, log_variance))
    return jnp.where(jnp.asarray(t) == 0, 0.0, kl)


def entropy_terms(schedule: Schedule, dim: int) -> jax.Array:
    """H_q(X_T | X_0) - H_q(X_1 | X_0) - H_p(X_T) of Eq. 14, a scalar in nats.

    With H(N(., v I_D)) = D/2 log(2 pi e v): q(x_T | x_0) has variance 1 - abar_T,
    q(x_1 | x_0) has beta_1 and pi has 1, so the sum is
    D/2 (log(1 - abar_T) - log beta_1 - log(2 pi e)).
    """
    return 0.5 * dim * (
        schedule.log_one_minus_alphas_cumprod[-1] - schedule.log_betas[0] - _LOG_2PI_E
    )


def null_log_likelihood(x_start) -> jax.Array:
    """L_null: log N(x_0; 0, I) per example, (B,) nats (the prior pi as the model)."""
    return -0.5 * _sum_dims(jnp.square(x_start) + math.log(2.0 * math.pi))


def _check_model_fn(fn):
    if not callable(fn):
        raise ValueError(f"model_fn must be callable as model_fn(x_t, t); got {fn!r}.")
    return fn


def _noise(x_start, num_timesteps, key, noise):
    want = (num_timesteps - 1,) + tuple(jnp.shape(x_start))
    if (key is None) == (noise is None):
        raise ValueError("Pass exactly one of `key` and `noise`.")
    if noise is None:
        return jax.random.normal(key, want, jnp.result_type(x_start))
    if jnp.shape(noise) != want:
        raise ValueError(
            f"noise must have shape (T - 1, *x_start.shape) = {want} (one draw per KL term "
            f"t = 1..T-1); got {jnp.shape(noise)}."
        )
    return noise


def bound_k(schedule: Schedule, model_fn: Callable, x_start, *, key=None, noise=None) -> dict:
    """K of Eq. 14 per example, every KL term evaluated (t = 1..T-1, 0-based).

    Each term takes one draw x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_t: an unbiased
    estimate of K whose gradient reaches learned betas through the frozen noise eps
    (Sec. 2.4.1). The network is called once on all (T - 1) B rows, so memory grows with
    T B D: meant for low-dimensional data. Differentiable; jit it in the caller.

    Args:
      model_fn: ``model_fn(x_t, t) -> output`` of shape (N, 2D) for x_t (N, D), t (N,).
      x_start: (B, D), scaled to unit variance per coordinate (see the module docstring).
      key: PRNG key for the noise, or
      noise: (T - 1, B, D) standard normal draws, noise[t - 1] for step t.

    Returns:
      dict: ``k`` (B,) nats; ``k_minus_null`` (B,) nats; ``kl`` (B, T) nats with the
      term of step t in column t (column 0, the fixed first step, is 0); ``entropy`` ()
      nats, the entropy terms of Eq. 14.
    """
    _check_model_fn(model_fn)
    num_timesteps = schedule.num_timesteps
    if num_timesteps < 2:
        raise ValueError("The bound K needs T >= 2 (the first step has no KL term).")
    batch, dim = jnp.shape(x_start)
    eps = _noise(x_start, num_timesteps, key, noise)
    steps = num_timesteps - 1
    t = jnp.repeat(jnp.arange(1, num_timesteps, dtype=jnp.int32), batch)
    x0 = jnp.tile(x_start, (steps, 1))
    x_t = gaussian.q_sample(schedule, x0, t, noise=eps.reshape((steps * batch, dim)))
    kl = kl_terms(schedule, model_fn(x_t, t), x0, x_t, t).reshape((steps, batch))
    entropy = entropy_terms(schedule, dim)
    k = entropy - jnp.sum(kl, axis=0)
    return {
        "k": k,
        "k_minus_null": k - null_log_likelihood(x_start),
        "kl": jnp.concatenate([jnp.zeros((batch, 1), kl.dtype), kl.T], axis=1),
        "entropy": entropy,
    }


def bound_estimate(schedule: Schedule, model_fn: Callable, x_start, *, key) -> dict:
    """An unbiased one-term estimate of K per example: t ~ U[1, T), K_hat =
    entropy_terms - (T - 1) KL_t. Cheaper than `bound_k` per example, noisier.

    Returns:
      dict of (B,) nats: ``k``, ``k_minus_null``, ``kl`` (the unscaled KL_t).
    """
    _check_model_fn(model_fn)
    num_timesteps = schedule.num_timesteps
    if num_timesteps < 2:
        raise ValueError("The bound K needs T >= 2 (the first step has no KL term).")
    t_key, noise_key = jax.random.split(key)
    batch, dim = jnp.shape(x_start)
    t = jax.random.randint(t_key, (batch,), 1, num_timesteps, dtype=jnp.int32)
    x_t = gaussian.q_sample(schedule, x_start, t, key=noise_key)
    kl = kl_terms(schedule, model_fn(x_t, t), x_start, x_t, t)
    k = entropy_terms(schedule, dim) - (num_timesteps - 1) * kl
    return {"k": k, "k_minus_null": k - null_log_likelihood(x_start), "kl": kl}


def p_sample_loop(
    schedule: Schedule,
    model_fn: Callable,
    shape: Sequence[int],
    *,
    key,
    save_steps: Sequence[int] = (),
) -> dict:
    """Ancestral sampling: x_T ~ N(0, I), x_{t-1} ~ p(x_{t-1} | x_t) for t = T..1.

    The learned kernels (Eq. 64-65) for t >= 1, the fixed first step at t = 0. One
    ``lax.scan`` under one ``jit``; step t draws from ``fold_in(key, t)``, x_T from
    ``fold_in(key, T)``.

    Args:
      model_fn: ``model_fn(x_t, t) -> (B, 2D)``; a `jax.tree_util.Partial` lets new
        parameters reuse the compiled loop.
      shape: (B, D).
      save_steps: the paper's step numbers s in [0, T] to keep: x^(T) is the prior draw,
        x^(0) the sample, x^(s) the state at array index s - 1. Static.

    Returns:
      dict with ``sample`` (x_0, ``shape``) and ``saved`` (len(save_steps), *shape).
    """
    shape = tuple(int(s) for s in shape)
    save_steps = tuple(int(s) for s in save_steps)
    for s in save_steps:
        if not 0 <= s <= schedule.num_timesteps:
            raise ValueError(f"save_steps must lie in [0, {schedule.num_timesteps}]; got {s}.")
    fn = model_fn if isinstance(model_fn, jax.tree_util.Partial) else jax.tree_util.Partial(
        _check_model_fn(model_fn))
    return _p_sample_loop(schedule, fn, key, shape=shape, save_steps=save_steps)


@partial(jax.jit, static_argnames=("shape", "save_steps"))
def _p_sample_loop(schedule, model_fn, key, *, shape, save_steps):
    num_timesteps = schedule.num_timesteps
    x_T = jax.random.normal(jax.random.fold_in(key, num_timesteps), shape)
    saves = jnp.array(save_steps, dtype=jnp.int32).reshape((-1,))
    expand = (-1,) + (1,) * len(shape)
    saved0 = jnp.zeros((len(save_steps),) + shape, jnp.float32)
    saved0 = jnp.where((saves == num_timesteps).reshape(expand), x_T[None], saved0)

    def step(carry, t_scalar):
        x_t, saved = carry
        t = jnp.full((shape[0],), t_scalar, jnp.int32)
        mean, _, log_variance = p_mean_variance(schedule, model_fn(x_t, t), x_t, t)
        eps = jax.random.normal(jax.random.fold_in(key, t_scalar), shape)
        x_prev = mean + jnp.exp(0.5 * log_variance) * eps
        saved = jnp.where((saves == t_scalar).reshape(expand), x_prev[None], saved)
        return (x_prev, saved), None

    steps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
    (x_0, saved), _ = jax.lax.scan(step, (x_T, saved0), steps)
    return {"sample": x_0, "saved": saved}
