"""Predictor-corrector and probability-flow ODE samplers for score SDEs (Song et al. 2021).

Written against `diffusion_jax.sde`'s interface only, as score_sde's ``sampling.py``. A
score model is ``score_fn(x, t) -> score`` with t of shape (B,) (see
`sde_losses.score_fn_from_model`; a DDPM eps model works through `sde.DDPMVPSDE`).

Predictors (one step from t to t - 1/N; each returns (x, x_mean), x_mean without noise):

- ``reverse_diffusion``: x_mean = x - f_rev, x = x_mean + G z with (f_rev, G) the reverse
  SDE's discretization (Eq. 46, Appendix E);
- ``euler_maruyama``: dt = -1 / N (score_sde's step, also when eps > 0);
- ``ancestral``: DDPM's ancestral step for VP SDEs, SMLD's for VE (Appendix F, Eqs. 47, 48);
- ``none``.

Correctors (``n_steps`` steps at the same t; Algorithms 4 and 5, Appendix G):

- ``langevin``: step = 2 alpha_i (snr ||z|| / ||s||)^2, the norms averaged over the batch
  as score_sde does (so a step depends on the whole batch); alpha_i = 1 - beta_i of the
  VP discretization (1 for VE);
- ``ald`` (annealed Langevin dynamics, Song & Ermon 2019): step = 2 alpha_i (snr std(t))^2;
- ``none``.

`pc_sample` runs the N steps at t_i = linspace(T, eps, N) in one ``lax.scan`` under one
``jit``. The final denoising (``denoise``): ``'tweedie'`` returns E[x0 | x(eps)] =
(x + std^2 s) / alpha (one more evaluation); ``'mean'`` returns the last predictor's
x_mean (score_sde's ``denoise=True``); ``'none'`` the last x.

`ode_sample` integrates the probability-flow ODE (Eq. 13) from T to eps with
`ode.solve_ode` (Euler, Heun, or adaptive Tsit5 / Dopri5 with its NFE).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from diffusion_jax import ode, sde as sde_lib
from diffusion_jax.gaussian import check_choice
from diffusion_jax.sampling._common import check_shape
from diffusion_jax.sde_losses import score_to_x0

__all__ = [
    "CORRECTORS",
    "DENOISE",
    "PREDICTORS",
    "corrector_step",
    "ode_sample",
    "pc_sample",
    "predictor_step",
]

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")
DENOISE = ("tweedie", "mean", "none")
_b = sde_lib._bcast


def _vp_alphas(sde, t):
    """alpha_i = 1 - beta_i of the VP discretization at t's grid index (1 for VE)."""
    if isinstance(sde, (sde_lib.VPSDE, sde_lib.DDPMVPSDE)):
        return sde.alphas[sde.timestep(t)]
    if isinstance(sde, sde_lib.subVPSDE):
        betas = jnp.linspace(sde.beta_min / sde.N, sde.beta_max / sde.N, sde.N)
        index = jnp.clip((t * (sde.N - 1)).astype(jnp.int32), 0, sde.N - 1)
        return 1.0 - betas[index]
    return jnp.ones_like(t)


def predictor_step(name: str, sde, score_fn, x, t, noise):
    """One predictor step at t (B,) with the given standard normal ``noise``: (x, x_mean)."""
    check_choice("predictor", name, PREDICTORS)
    if name == "none":
        return x, x
    if name == "reverse_diffusion":
        f, G = sde.reverse(score_fn).discretize(x, t)
        x_mean = x - f
        return x_mean + _b(G, x) * noise, x_mean
    if name == "euler_maruyama":
        dt = -1.0 / sde.N
        drift, diffusion = sde.reverse(score_fn).sde(x, t)
        x_mean = x + drift * dt
        return x_mean + _b(diffusion, x) * jnp.sqrt(-dt) * noise, x_mean
    return _ancestral_step(sde, score_fn, x, t, noise)


def _check_ancestral(sde):
    if not isinstance(sde, (sde_lib.VPSDE, sde_lib.DDPMVPSDE, sde_lib.VESDE)):
        raise ValueError(
            f"The ancestral predictor is defined for VP and VE SDEs; got {type(sde).__name__}. "
            f"Use 'reverse_diffusion' or 'euler_maruyama'."
        )


def _ancestral_step(sde, score_fn, x, t, noise):
    _check_ancestral(sde)
    score = score_fn(x, t)
    if isinstance(sde, sde_lib.VESDE):
        sigma, adjacent = sde.adjacent_sigmas(t)
        x_mean = x + _b(jnp.square(sigma) - jnp.square(adjacent), x) * score
        std = jnp.sqrt(jnp.square(adjacent) * (jnp.square(sigma) - jnp.square(adjacent))
                       / jnp.square(sigma))
        return x_mean + _b(std, x) * noise, x_mean
    beta = sde.discrete_betas[sde.timestep(t)]
    x_mean = (x + _b(beta, x) * score) / _b(jnp.sqrt(1.0 - beta), x)
    return x_mean + _b(jnp.sqrt(beta), x) * noise, x_mean


def _flat_norm(v):
    return jnp.linalg.norm(v.reshape((v.shape[0], -1)), axis=-1)


def corrector_step(name: str, sde, score_fn, x, t, noise, *, snr):
    """One corrector step (one of ``n_steps``) at t with the given noise: (x, x_mean)."""
    check_choice("corrector", name, CORRECTORS)
    if name == "none":
        return x, x
    alpha = _vp_alphas(sde, t)
    score = score_fn(x, t)
    if name == "langevin":
        ratio = snr * jnp.mean(_flat_norm(noise)) / jnp.mean(_flat_norm(score))
        step = 2.0 * alpha * jnp.square(ratio)
    else:
        step = 2.0 * alpha * jnp.square(snr * sde.marginal_coeffs(t)[1])
    x_mean = x + _b(step, x) * score
    return x_mean + _b(jnp.sqrt(2.0 * step), x) * noise, x_mean


def _check_snr(snr):
    if isinstance(snr, jax.core.Tracer):
        return
    if not float(snr) > 0.0:
        raise ValueError(f"snr must be > 0 (score_sde: 0.16 for VE, 0.01 for VP); got {snr}.")


def _check_eps(sde, eps):
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T = {sde.T}); got {eps}.")


def pc_sample(
    sde,
    score_fn: Callable,
    shape: Sequence[int],
    *,
    key,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_steps: int = 1,
    eps: float = 1e-3,
    denoise: str = "tweedie",
    x_T=None,
) -> dict:
    """The PC sampler (Algorithm 1 of Song et al. 2021 with score_sde's grid); see the module.

    Args:
      sde: a forward SDE; its N is the number of predictor steps.
      score_fn: ``score_fn(x, t)``; a `jax.tree_util.Partial` reuses the compiled loop.
      shape: (B, ...). key: noise of step i from ``fold_in(key, i)``; the prior from
        ``fold_in(key, N)`` unless ``x_T`` is given.

    Returns:
      dict: ``sample`` (shape), ``nfe`` (int: score evaluations).
    """
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    check_choice("denoise", denoise, DENOISE)
    _check_snr(snr)
    _check_eps(sde, eps)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0; got {n_steps!r}.")
    shape = check_shape(shape)
    if predictor == "ancestral":
        _check_ancestral(sde)
    score_fn = score_fn if isinstance(score_fn, Partial) else Partial(score_fn)
    sample = _pc_sample(sde, score_fn, key, x_T, shape=shape, predictor=predictor,
                        corrector=corrector, snr=snr, n_steps=n_steps, eps=eps, denoise=denoise)
    per_step = (predictor != "none") + (corrector != "none") * n_steps
    return {"sample": sample, "nfe": sde.N * per_step + (denoise == "tweedie")}


@partial(jax.jit, static_argnames=("shape", "predictor", "corrector", "n_steps", "eps", "denoise"))
def _pc_sample(sde, score_fn, key, x_T, *, shape, predictor, corrector, snr, n_steps, eps,
               denoise):
    x = sde.prior_sample(jax.random.fold_in(key, sde.N), shape) if x_T is None else x_T
    times = jnp.linspace(sde.T, eps, sde.N)

    def step(carry, inputs):
        x, _ = carry
        index, t_scalar = inputs
        t = jnp.full((shape[0],), t_scalar, jnp.float32)
        keys = jax.random.split(jax.random.fold_in(key, index), n_steps + 1)
        x_mean = x
        for k in range(n_steps):
            noise = jax.random.normal(keys[k], shape, jnp.float32)
            x, x_mean = corrector_step(corrector, sde, score_fn, x, t, noise, snr=snr)
        noise = jax.random.normal(keys[n_steps], shape, jnp.float32)
        x, x_mean = predictor_step(predictor, sde, score_fn, x, t, noise)
        return (x, x_mean), None

    (x, x_mean), _ = jax.lax.scan(step, (x, x), (jnp.arange(sde.N), times))
    return _denoise(sde, score_fn, x, x_mean, eps, denoise)


def _denoise(sde, score_fn, x, x_mean, eps, denoise):
    if denoise == "mean":
        return x_mean
    if denoise == "none":
        return x
    t = jnp.full((x.shape[0],), eps, jnp.float32)
    return score_to_x0(sde, score_fn(x, t), x, t)


def _probability_flow_drift(sde, score_fn, x, time):
    """dx/dt of Eq. 13; for a `DDPMVPSDE`, dx/dr = -(x + score) / 2 in r = -log alpha^2
    (smooth in r, while beta(t) jumps at the N grid times; see `likelihood._ode_drift`)."""
    if isinstance(sde, sde_lib.DDPMVPSDE):
        t = jnp.full((x.shape[0],), sde.time_of_noise_level(time), jnp.float32)
        return -0.5 * (x + score_fn(x, t))
    t = jnp.full((x.shape[0],), time, jnp.float32)
    return sde.reverse(score_fn, probability_flow=True).sde(x, t)[0]


def ode_sample(
    sde,
    score_fn: Callable,
    shape: Sequence[int],
    *,
    key=None,
    x_T=None,
    solver: str = "tsit5",
    num_steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    eps: float = 1e-3,
    denoise: str = "tweedie",
) -> dict:
    """Samples by integrating the probability-flow ODE (Eq. 13) from T to eps.

    One solve for the whole batch (one step size, as score_sde's ``scipy`` solve of the
    flattened batch). x(T) ~ p_T drawn with ``key`` unless ``x_T`` is given.

    Returns:
      dict: ``sample`` (shape), ``nfe`` (int32: drift evaluations, + 1 for Tweedie),
      ``x_eps`` (the ODE's state at eps, before denoising), ``success`` (False if the
      step budget ran out; outside ``jit`` that raises `ode.ODEBudgetExhaustedError`).
    """
    check_choice("denoise", denoise, ("tweedie", "none"))
    _check_eps(sde, eps)
    shape = check_shape(shape)
    if x_T is None:
        if key is None:
            raise ValueError("ode_sample needs `key` (to draw x(T)) or `x_T`.")
        x_T = sde.prior_sample(key, shape)
    elif tuple(jnp.shape(x_T)) != shape:
        raise ValueError(f"x_T must have shape {shape}; got {jnp.shape(x_T)}.")
    score_fn = score_fn if isinstance(score_fn, Partial) else Partial(score_fn)
    t0, t1 = sde.T, eps
    if isinstance(sde, sde_lib.DDPMVPSDE):
        t0, t1 = (sde.noise_level(jnp.float32(t)) for t in (t0, t1))
    out = ode.solve_ode(Partial(_probability_flow_drift, sde, score_fn), x_T, t0, t1,
                        solver=solver, num_steps=num_steps, rtol=rtol, atol=atol,
                        max_steps=max_steps)
    x = out["y"]
    if denoise == "tweedie":
        x = _tweedie(sde, score_fn, x, eps)
    return {"sample": x, "nfe": out["nfe"] + (denoise == "tweedie"), "x_eps": out["y"],
            "success": out["success"]}


@partial(jax.jit, static_argnames=("eps",))
def _tweedie(sde, score_fn, x, eps):
    return _denoise(sde, score_fn, x, x, eps, "tweedie")
