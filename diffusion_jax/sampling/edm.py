"""EDM's samplers (Karras et al. 2022, Algorithms 1 and 2; NVlabs/edm ``generate.py``).

The grid and the churn factors come from `diffusion_jax.edm` (`sigma_steps`, `step_gammas`);
the denoiser D(x, sigma) from `edm.denoiser_fn` (any preconditioning) or any function of that
contract. These are the paper's own steps on its non-uniform grid (Heun in sigma, the last
step Euler, optional churn), not a solve of the generic integrator `diffusion_jax.ode`, whose
fixed-step solvers take uniform steps.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import edm
from diffusion_jax.sampling import _common

__all__ = ["edm_sampler", "edm_step"]


def edm_step(denoiser, x, sigma_cur, sigma_next, *, gamma=0.0, noise=None, S_noise=1.0,
             second_order: bool = True):
    """One step of Algorithm 2 (Algorithm 1 when gamma = 0): x at sigma_cur -> sigma_next.

    sigma_hat = sigma_cur (1 + gamma); x_hat = x + sqrt(sigma_hat^2 - sigma_cur^2) S_noise z;
    d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat; x' = x_hat + (sigma_next - sigma_hat) d;
    with ``second_order`` (never into sigma_next = 0) Heun's correction
    x' = x_hat + (sigma_next - sigma_hat) (d + d') / 2, d' = (x' - D(x'; sigma_next)) / sigma_next.

    Args:
      denoiser: ``D(x, sigma)`` with sigma of shape (B,). x: (B, ...).
      sigma_cur, sigma_next, gamma: scalars (may be traced). noise: z, x's shape (needed
        when gamma > 0; ignored when gamma = 0).
    """
    batch = x.shape[0]
    sigma_hat = sigma_cur * (1.0 + gamma)
    if noise is not None:
        # sqrt(sigma_hat^2 - sigma_cur^2) written so that gamma = 0 gives exactly 0 (the
        # difference of squares can round below 0 in float32 and give NaN).
        x = x + sigma_cur * jnp.sqrt(gamma * (2.0 + gamma)) * S_noise * noise
    d_cur = (x - denoiser(x, jnp.full((batch,), sigma_hat))) / sigma_hat
    x_next = x + (sigma_next - sigma_hat) * d_cur
    if not second_order:
        return x_next
    d_prime = (x_next - denoiser(x_next, jnp.full((batch,), sigma_next))) / sigma_next
    return x + (sigma_next - sigma_hat) * (0.5 * d_cur + 0.5 * d_prime)


def edm_sampler(
    denoiser: Callable,
    shape: Sequence[int],
    *,
    key=None,
    x_T=None,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    grid: Sequence[float] | None = None,
) -> dict:
    """EDM's sampler (Algorithm 1 with S_churn = 0, else Algorithm 2; ``edm_sampler``).

    One ``lax.scan`` under one ``jit`` over the N - 1 Heun steps, then the Euler step into
    sigma_N = 0. Noise: x_0 = sigma_max z with z drawn from ``fold_in(key, N)`` (or
    ``x_T``, standard normal, given); step i's churn noise from ``fold_in(key, i)``.
    Clamp sigma_min / sigma_max to a preconditioning's ``sigma_range`` yourself, as
    ``generate.py`` does (VP and VE networks support a bounded range).

    Args:
      denoiser: ``D(x, sigma)`` (`denoiser_fn`); a `Partial` reuses the compiled loop.
      shape: (B, ...). Other arguments: the paper's names (Table 1, Algorithm 2).

    Returns:
      dict: ``sample`` (shape), ``nfe`` (int: 2 N - 1), ``sigmas`` (the grid, (N + 1,)).
    """
    sigmas = edm.sigma_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, grid=grid)
    gammas = edm.step_gammas(sigmas, S_churn=S_churn, S_min=S_min, S_max=S_max)
    if not (isinstance(S_noise, (int, float)) and math.isfinite(S_noise) and S_noise >= 0):
        raise ValueError(f"S_noise must be a finite number >= 0; got {S_noise!r}.")
    shape, x_T, key = _common.initial_state(shape, x_T, key, key_needed=bool(gammas.any()))
    denoiser = _common.wrap_fn("denoiser", denoiser)
    sample = _edm_loop(denoiser, x_T, key, jnp.asarray(sigmas, jnp.float32),
                       jnp.asarray(gammas, jnp.float32), shape=shape, S_noise=float(S_noise),
                       churn=bool(gammas.any()))
    return {"sample": sample, "nfe": 2 * num_steps - 1, "sigmas": sigmas}


@partial(jax.jit, static_argnames=("shape", "S_noise", "churn"))
def _edm_loop(denoiser, x_T, key, sigmas, gammas, *, shape, S_noise, churn):
    num = sigmas.shape[0] - 1
    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, num), shape, jnp.float32)
    x = x_T.astype(jnp.float32) * sigmas[0]

    def noise_at(i):
        if not churn:
            return None
        return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)

    def body(x, i):
        x = edm_step(denoiser, x, sigmas[i], sigmas[i + 1], gamma=gammas[i],
                     noise=noise_at(i), S_noise=S_noise)
        return x, None

    x, _ = jax.lax.scan(body, x, jnp.arange(num - 1))
    last = num - 1
    return edm_step(denoiser, x, sigmas[last], sigmas[last + 1], gamma=gammas[last],
                    noise=noise_at(last), S_noise=S_noise, second_order=False)
