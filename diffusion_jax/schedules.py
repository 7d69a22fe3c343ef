"""Noise schedules: named beta schedules and the `Schedule` pytree of derived coefficients.

Conventions (DDPM, Ho et al. 2020, Sec. 2 and its TF code): time is 0-based, so array
index ``t`` holds DDPM's step ``t + 1``; ``betas[t]`` is the variance of the forward kernel
q(x_{t+1} | x_t) in DDPM's 1-based notation, and ``alphas_cumprod[t]`` is alpha-bar of step
``t + 1``, so that q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I).

Named schedules are computed in float64 NumPy and stored as float32 JAX arrays.
`Schedule.from_betas` also accepts traced JAX arrays (inside ``jit`` or ``grad``): the
coefficients are then computed in JAX so gradients reach the betas, as the 2015 paper's
learned schedule needs.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SCHEDULES",
    "Schedule",
    "cosine_betas",
    "get_betas",
    "get_schedule",
    "linear_betas",
    "sohl_dickstein_betas",
]


def linear_betas(
    num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """DDPM's linear schedule (Ho et al. 2020, Sec. 4): betas from beta_start to beta_end.

    Both ends are multiplied by ``1000 / num_timesteps`` (improved DDPM, Nichol & Dhariwal
    2021, Sec. 3.2) so that other step counts keep the shape of the T = 1000 schedule.

    Returns:
      float64 array of shape ``(num_timesteps,)``.
    """
    _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    if beta_end * scale >= 1.0 or beta_start * scale <= 0.0:
        raise ValueError(
            f"The linear schedule scaled to T = {num_timesteps} has betas from "
            f"{beta_start * scale} to {beta_end * scale}; they must lie in (0, 1). Use more "
            f"steps (T > {int(beta_end * 1000)}) or smaller beta_start / beta_end."
        )
    return np.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=np.float64)


def cosine_betas(
    num_timesteps: int, *, s: float = 0.008, max_beta: float = 0.999
) -> np.ndarray:
    """The cosine schedule of improved DDPM (Nichol & Dhariwal 2021, Eq. 17).

    alpha_bar(u) = cos^2(((u + s) / (1 + s)) * pi / 2) for u in [0, 1], and
    beta_t = min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta) for t = 0..T-1.
    The cap at ``max_beta`` avoids the singularity at the end of the chain.

    Returns:
      float64 array of shape ``(num_timesteps,)``.
    """
    _check_num_timesteps(num_timesteps)

    def alpha_bar(u):
        return np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = alpha_bar(u)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def sohl_dickstein_betas(
    num_timesteps: int, *, beta_1: float = 1e-3, max_beta: float = 0.999
) -> np.ndarray:
    """The fixed schedule of Sohl-Dickstein et al. 2015 (Sec. 2.4.1, Appendix D).

    beta_t = 1 / (T - t + 1) for the paper's 1-based t = 1..T: each step erases a constant
    fraction of the remaining signal variance. beta_1 is replaced by the small constant
    ``beta_1`` (the paper fixes the first step "to prevent overfitting").

    The formula gives beta_T = 1, which removes x_0 exactly but makes sqrt(1/alpha_bar_T)
    infinite (no x_0 can be predicted from x_T); it is capped at ``max_beta``.

    Returns:
      float64 array of shape ``(num_timesteps,)``.
    """
    _check_num_timesteps(num_timesteps)
    if not 0.0 < beta_1 < 1.0:
        raise ValueError(f"beta_1 must lie in (0, 1); got {beta_1}.")
    t = np.arange(1, num_timesteps + 1, dtype=np.float64)
    betas = 1.0 / (num_timesteps - t + 1.0)
    betas[0] = beta_1
    return np.minimum(betas, max_beta)


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sohl_dickstein": sohl_dickstein_betas,
}


def get_betas(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
    """Float64 betas of the named schedule (one of `SCHEDULES`); kwargs go to its function."""
    if name not in SCHEDULES:
        raise ValueError(
            f"Unknown beta schedule {name!r}; valid names are {sorted(SCHEDULES)}."
        )
    return SCHEDULES[name](num_timesteps, **kwargs)


def get_schedule(name: str, num_timesteps: int, **kwargs) -> "Schedule":
    """`Schedule` of the named beta schedule: coefficients in float64, stored float32."""
    return Schedule.from_betas(get_betas(name, num_timesteps, **kwargs))


@flax.struct.dataclass
class Schedule:
    """Betas and every coefficient derived from them; an immutable pytree.

    Every field is a 1-D array of length T indexed by the 0-based timestep t
    (DDPM's step t + 1). With abar = alphas_cumprod:

    - ``log_betas`` (stored so float32 users need not take the log of a rounded beta);
      ``alphas = 1 - betas``; ``alphas_cumprod[t] = prod_{s<=t} alphas[s]``;
      ``alphas_cumprod_prev`` has 1 prepended (abar of step t - 1, with abar_{-1} = 1);
      ``alphas_cumprod_next`` has 0 appended (used by deterministic DDIM inversion).
    - ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
      ``log_one_minus_alphas_cumprod``: moments of q(x_t | x_0) (DDPM Eq. 4).
    - ``sqrt_recip_alphas_cumprod = sqrt(1 / abar)``,
      ``sqrt_recipm1_alphas_cumprod = sqrt(1 / abar - 1)``: x_0 from (x_t, eps) (Eq. 15).
    - ``posterior_variance = betas * (1 - abar_prev) / (1 - abar)`` (Eq. 7, beta-tilde);
      it is 0 at t = 0, so ``posterior_log_variance_clipped`` uses the t = 1 entry there.
    - ``posterior_mean_coef1 = betas * sqrt(abar_prev) / (1 - abar)`` (multiplies x_0),
      ``posterior_mean_coef2 = (1 - abar_prev) * sqrt(alphas) / (1 - abar)`` (multiplies
      x_t) (Eq. 7, mu-tilde).
    """

    betas: jax.Array
    log_betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    alphas_cumprod_next: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (a static Python int, also under jit)."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas, dtype=jnp.float32) -> "Schedule":
        """Builds a schedule from betas of shape ``(T,)``.

        Concrete input (NumPy, lists, or JAX arrays outside a trace) is validated, the
        coefficients are computed in float64 NumPy and stored as ``dtype``. Traced input
        (inside ``jit``/``grad``) is computed with ``jax.numpy`` in its own dtype, so that
        gradients flow to the betas; its values cannot be checked there and are the
        caller's duty (keep them in (0, 1), e.g. through a sigmoid).

        Raises:
          ValueError: betas not 1-D or empty, or (concrete input) a value that is not
            finite or not in the open interval (0, 1); the message names the first bad
            index and value.
        """
        if isinstance(betas, jax.core.Tracer):
            if betas.ndim != 1 or betas.shape[0] < 1:
                raise ValueError(f"betas must be 1-D and non-empty; got shape {betas.shape}.")
            return cls(**_coefficients(jnp, betas))
        betas64 = np.asarray(betas, dtype=np.float64)
        _validate_betas(betas64)
        coefs = _coefficients(np, betas64)
        return cls(**{k: jnp.asarray(v, dtype=dtype) for k, v in coefs.items()})


def _coefficients(xp, betas) -> dict:
    """Every `Schedule` field from betas, with ``xp`` = numpy (float64) or jax.numpy."""
    alphas = 1.0 - betas
    # Sums of log1p keep the product accurate over many steps close to 1, and expm1 keeps
    # 1 - abar accurate where abar is close to 1 (float32 traced betas need both).
    log_alphas_cumprod = xp.cumsum(xp.log1p(-betas))
    alphas_cumprod = xp.exp(log_alphas_cumprod)
    one = xp.ones((1,), dtype=betas.dtype)
    alphas_cumprod_prev = xp.concatenate([one, alphas_cumprod[:-1]])
    alphas_cumprod_next = xp.concatenate([alphas_cumprod[1:], 0.0 * one])
    one_minus = -xp.expm1(log_alphas_cumprod)
    one_minus_prev = xp.concatenate([0.0 * one, one_minus[:-1]])
    posterior_variance = betas * one_minus_prev / one_minus
    # posterior_variance[0] is 0; its log is replaced by the t = 1 entry (DDPM's clipping).
    # With a single step there is no t = 1 entry; betas[0] is then the natural stand-in.
    pv1 = posterior_variance[1:2] if betas.shape[0] > 1 else betas[:1]
    posterior_log_variance_clipped = xp.log(xp.concatenate([pv1, posterior_variance[1:]]))
    return dict(
        betas=betas,
        log_betas=xp.log(betas),
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        alphas_cumprod_next=alphas_cumprod_next,
        sqrt_alphas_cumprod=xp.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=xp.sqrt(one_minus),
        log_one_minus_alphas_cumprod=xp.log(one_minus),
        sqrt_recip_alphas_cumprod=xp.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=xp.sqrt(one_minus / alphas_cumprod),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * xp.sqrt(alphas_cumprod_prev) / one_minus,
        posterior_mean_coef2=one_minus_prev * xp.sqrt(alphas) / one_minus,
    )


def _validate_betas(betas: np.ndarray) -> None:
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be 1-D and non-empty; got shape {betas.shape}.")
    bad = ~(np.isfinite(betas) & (betas > 0.0) & (betas < 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"betas must be finite and in the open interval (0, 1); betas[{i}] = {float(betas[i])!r}."
        )


def _check_num_timesteps(num_timesteps) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps}.")
