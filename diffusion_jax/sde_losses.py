"""Score models in continuous time: output parameterisations and denoising score matching.

A network is called as ``model_fn(x, model_t) -> output`` with ``model_t = model_time(sde, t)``
and its output is one of `PARAMETERIZATIONS`, converted in one place (`output_to_score`,
`score_to_x0`). With x(t) = alpha(t) x0 + std(t) eps (`sde.marginal_coeffs`):

- ``score``: grad_x log p_t(x) itself; ``eps``: score = -eps / std;
- ``x0``: eps = (x - alpha x0) / std;
- ``v`` (Salimans & Ho 2022, generalised to any alpha, std): v = alpha eps - std x0, so
  eps = (std x + alpha v) / (alpha^2 + std^2).

`dsm_loss` is score_sde's continuous denoising score matching loss (Song et al. 2021,
Eq. 7; ``get_sde_loss_fn``): t ~ U(eps, T), x(t) = mean + std z, and

- weighting ``'std2'`` (lambda = std^2): || std s + z ||^2;
- weighting ``'likelihood'`` (lambda = g^2; Song, Durkan, Murray, Ermon 2021, Eq. 7, Thm. 1):
  g^2 || s + z / std ||^2, optionally with t importance-sampled from p(t) ~ g^2 / std^2
  (same expectation, lower variance; VP and VE only),

reduced over each example's dimensions by mean (``reduce_mean=True``) or sum (score_sde's
``reduce_mean`` flag). No 1/2 factor, as score_sde.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from diffusion_jax import sde as sde_lib
from diffusion_jax.gaussian import check_choice

__all__ = [
    "PARAMETERIZATIONS",
    "WEIGHTINGS",
    "dsm_loss",
    "importance_sample_t",
    "model_time",
    "output_to_score",
    "score_fn_from_model",
    "score_to_x0",
]

PARAMETERIZATIONS = ("score", "eps", "x0", "v")
WEIGHTINGS = ("std2", "likelihood")


def model_time(sde, t):
    """The time a network sees: DDPM's step index t N - 1 for `DDPMVPSDE` (so a DDPM eps
    model is called at the steps it was trained on), else score_sde's t (N - 1)."""
    if isinstance(sde, sde_lib.DDPMVPSDE):
        return sde.model_timestep(t)
    return t * (sde.N - 1)


def output_to_score(sde, output, x, t, parameterization: str):
    """The score (B, ...) from a model output of the named parameterisation at (x, t)."""
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if parameterization == "score":
        return output
    alpha, std = (sde_lib._bcast(c, x) for c in sde.marginal_coeffs(t))
    if parameterization == "eps":
        eps = output
    elif parameterization == "x0":
        eps = (x - alpha * output) / std
    else:
        eps = (std * x + alpha * output) / (jnp.square(alpha) + jnp.square(std))
    return -eps / std


def score_to_x0(sde, score, x, t):
    """Tweedie's formula: E[x0 | x(t)] = (x + std^2 score) / alpha (Efron 2011)."""
    alpha, std = (sde_lib._bcast(c, x) for c in sde.marginal_coeffs(t))
    return (x + jnp.square(std) * score) / alpha


def _score_fn(sde, model_fn, x, t, *, parameterization):
    return output_to_score(sde, model_fn(x, model_time(sde, t)), x, t, parameterization)


# One function object per parameterisation, so a `Partial` of it is the same jit cache key
# on every call (the name is static, not a leaf).
_SCORE_FNS = {p: functools.partial(_score_fn, parameterization=p) for p in PARAMETERIZATIONS}


def score_fn_from_model(sde, model_fn: Callable, parameterization: str) -> Partial:
    """``score_fn(x, t)`` (a `Partial`, so jit traces its parameters) from a network."""
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if not isinstance(model_fn, Partial):
        model_fn = Partial(model_fn)
    return Partial(_SCORE_FNS[parameterization], sde, model_fn)


def _vp_integral(sde, t):
    return sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * jnp.square(t)


def importance_sample_t(sde, key, batch: int, *, eps: float = 1e-5):
    """t ~ p(t) proportional to g(t)^2 / std(t)^2 on [eps, T], and the weight Z / (T - eps)
    that makes Z std^2 ||s + z/std||^2 / (T - eps) an unbiased estimate of the uniform-t
    likelihood-weighted loss (Song, Durkan, Murray, Ermon 2021, Sec. 5).

    VP: g^2 / std^2 = beta / (1 - e^{-B}) = d/dt log(e^B - 1), B(t) = int_0^t beta, so
    p's CDF is linear in log expm1(B) and t follows from B by the quadratic formula.
    VE: g^2 / std^2 = 2 log(sigma_max / sigma_min) is constant: uniform t.

    Returns:
      (t (B,), weight: scalar Z / (T - eps)).
    """
    u = jax.random.uniform(key, (batch,), jnp.float32)
    span = sde.T - eps
    if isinstance(sde, sde_lib.VESDE):
        z = 2.0 * math.log(sde.sigma_max / sde.sigma_min) * span
        return eps + u * span, z / span
    if not isinstance(sde, sde_lib.VPSDE):
        raise ValueError(
            f"Importance sampling of t is implemented for VPSDE and VESDE; got "
            f"{type(sde).__name__}. Use weighting 'likelihood' without importance sampling."
        )
    log_lo = jnp.log(jnp.expm1(_vp_integral(sde, jnp.float32(eps))))
    log_hi = jnp.log(jnp.expm1(_vp_integral(sde, jnp.float32(sde.T))))
    integral = jax.nn.softplus(log_lo + u * (log_hi - log_lo))  # B(t) = log1p(e^L)
    b0, slope = sde.beta_min, sde.beta_max - sde.beta_min
    t = 2.0 * integral / (b0 + jnp.sqrt(b0**2 + 2.0 * slope * integral))
    return jnp.clip(t, eps, sde.T), (log_hi - log_lo) / span


def dsm_loss(
    sde,
    model_fn: Callable,
    x0,
    *,
    key,
    parameterization: str = "score",
    weighting: str = "std2",
    importance_sampling: bool = False,
    reduce_mean: bool = True,
    eps: float = 1e-5,
    t=None,
) -> dict:
    """Continuous-time denoising score matching per example (see the module docstring).

    Args:
      sde: a forward SDE of `diffusion_jax.sde`.
      model_fn: ``model_fn(x, model_t) -> output`` of ``parameterization``.
      x0: data, shape (B, ...).
      key: PRNG key (t and z).
      t: optional fixed times (B,) in [eps, T] instead of drawing them.

    Returns:
      dict: ``loss`` (B,), ``t`` (B,).
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("parameterization", parameterization, PARAMETERIZATIONS)
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T = {sde.T}); got {eps}.")
    if importance_sampling and weighting != "likelihood":
        raise ValueError("importance_sampling needs weighting 'likelihood'.")
    x0 = jnp.asarray(x0)
    t_key, z_key = jax.random.split(key)
    weight = 1.0
    if t is None:
        if importance_sampling:
            t, weight = importance_sample_t(sde, t_key, x0.shape[0], eps=eps)
        else:
            t = eps + jax.random.uniform(t_key, (x0.shape[0],), jnp.float32) * (sde.T - eps)
    else:
        sde_lib.check_time(t, eps=eps, T=sde.T)
    z = jax.random.normal(z_key, x0.shape, x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    std_b = sde_lib._bcast(std, x0)
    score = _score_fn(sde, model_fn, mean + std_b * z, t, parameterization=parameterization)
    reduce = jnp.mean if reduce_mean else jnp.sum
    axes = tuple(range(1, x0.ndim))
    if weighting == "std2" or importance_sampling:
        loss = reduce(jnp.square(score * std_b + z), axis=axes) * weight
    else:
        g2 = jnp.square(sde.sde(jnp.zeros_like(x0), t)[1])
        loss = reduce(jnp.square(score + z / std_b), axis=axes) * g2
    return {"loss": loss, "t": t}
