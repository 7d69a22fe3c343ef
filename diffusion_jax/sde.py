"""Score SDEs (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

The vocabulary and conventions are those of score_sde's ``sde_lib.py``: time runs over
t in [0, T] with T = 1, t = 0 is data and t = T the prior; ``x`` has a batch axis first
and ``t`` has shape (B,) (float). Every SDE is an immutable pytree with

- ``sde(x, t) -> (drift, diffusion)``: f(x, t) and g(t) of dx = f dt + g dw (Eq. 5);
- ``marginal_prob(x, t) -> (mean, std)``: the perturbation kernel p_0t(x(t) | x(0));
- ``prior_sample(key, shape)`` and ``prior_logp(z)`` (nats per example, shape (B,));
- ``discretize(x, t) -> (f, G)``: x_{i+1} = x_i + f + G z of the N-step discretization;
- ``reverse(score_fn, probability_flow=False)``: the reverse-time SDE (Eq. 6) or the
  probability-flow ODE (Eq. 13) with the same methods.

The SDEs:

- `VPSDE(beta_min, beta_max, N)`: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw with
  beta(t) = beta_min + t (beta_max - beta_min) (Eq. 11, Appendix B). Discretized as DDPM
  with betas linspace(beta_min / N, beta_max / N, N) (Eq. 8, score_sde's convention).
- `subVPSDE(beta_min, beta_max, N)`: Eq. 12; discretized by Euler-Maruyama (score_sde).
- `VESDE(sigma_min, sigma_max, N)`: dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw,
  sigma(t) = sigma_min (sigma_max / sigma_min)^t (Eq. 9); SMLD's discretization with
  sigmas geometric from sigma_min to sigma_max (Eq. 7).
- `DDPMVPSDE.from_schedule(schedule)`: the VP SDE of a discrete DDPM `Schedule` whose
  marginals equal DDPM's q(x_i | x_0) exactly at t = (i + 1) / N (see its docstring).

Deviation from score_sde: 1 - exp(a) is written -expm1(a) and log(1 - exp(a)) with
log1p / expm1, so float32 keeps its relative precision near t = 0 (score_sde computes
1 - exp(...) directly, which loses every digit in float32 at t = 1e-5).
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.gaussian import check_choice

__all__ = [
    "DDPMVPSDE",
    "SDES",
    "ReverseSDE",
    "VESDE",
    "VPSDE",
    "check_time",
    "create_sde",
    "subVPSDE",
]


def _bcast(coef, x):
    """(B,) coefficients broadcast against x of shape (B, ...) from the left."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (jnp.ndim(x) - coef.ndim))


def _sum_flat(x):
    return jnp.sum(x, axis=tuple(range(1, jnp.ndim(x))))


def _standard_normal_logp(z, scale=1.0):
    """log N(z; 0, scale^2 I) summed per example (nats), shape (B,)."""
    dims = math.prod(z.shape[1:])
    return (-0.5 * dims * math.log(2.0 * math.pi) - dims * jnp.log(scale)
            - 0.5 * _sum_flat(jnp.square(z)) / scale**2)


def check_time(t, *, eps: float = 0.0, T: float = 1.0) -> None:
    """Raises ValueError if a concrete ``t`` lies outside [eps, T] (traced t: the caller's duty)."""
    if isinstance(t, jax.core.Tracer):
        return
    values = np.asarray(t, np.float64)
    if values.size and (not np.all(np.isfinite(values)) or values.min() < eps or values.max() > T):
        raise ValueError(
            f"t must lie in [eps, T] = [{eps}, {T}]; got values in "
            f"[{values.min()}, {values.max()}]."
        )


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")


class _SDE:
    """Methods shared by every forward SDE; subclasses give `sde`, `marginal_coeffs`..."""

    T = 1.0

    def marginal_prob(self, x, t):
        """Mean and std of p_0t(x(t) | x(0) = x): mean (B, ...), std (B,)."""
        alpha, std = self.marginal_coeffs(t)
        return _bcast(alpha, x) * x, std

    def prior_sample(self, key, shape):
        """x(T) ~ p_T (score_sde's ``prior_sampling``), float32 of ``shape``."""
        return jax.random.normal(key, tuple(shape), jnp.float32) * self.prior_std

    def prior_logp(self, z):
        """log p_T(z) summed over each example (nats), shape (B,)."""
        return _standard_normal_logp(z, self.prior_std)

    prior_std = 1.0

    def reverse(self, score_fn: Callable, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (Eq. 6) or, with probability_flow, the ODE (Eq. 13)."""
        if not callable(score_fn):
            raise ValueError(f"score_fn must be callable as score_fn(x, t); got {score_fn!r}.")
        return ReverseSDE(self, jax.tree_util.Partial(score_fn)
                          if not isinstance(score_fn, jax.tree_util.Partial) else score_fn,
                          probability_flow)


def _vp_log_mean_coeff(beta_min, beta_max, t):
    """log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2 (Eq. 33)."""
    return -0.25 * jnp.square(t) * (beta_max - beta_min) - 0.5 * t * beta_min


@flax.struct.dataclass
class VPSDE(_SDE):
    """Variance-preserving SDE (Song et al. 2021, Eq. 11); see the module docstring.

    marginal: mean = alpha(t) x, alpha = exp(log_mean_coeff), std = sqrt(1 - alpha^2).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = flax.struct.field(pytree_node=False, default=1000)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def sde(self, x, t):
        beta_t = self.beta(t)
        return -0.5 * _bcast(beta_t, x) * x, jnp.sqrt(beta_t)

    def marginal_coeffs(self, t):
        """(alpha(t), std(t)), each (B,): std = sqrt(-expm1(2 log alpha))."""
        log_mean = _vp_log_mean_coeff(self.beta_min, self.beta_max, t)
        return jnp.exp(log_mean), jnp.sqrt(-jnp.expm1(2.0 * log_mean))

    @property
    def discrete_betas(self):
        return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    @property
    def alphas(self):
        return 1.0 - self.discrete_betas

    def timestep(self, t):
        """score_sde's index of t in the N-step grid: int(t (N - 1) / T), shape (B,)."""
        return jnp.clip((t * (self.N - 1) / self.T).astype(jnp.int32), 0, self.N - 1)

    def discretize(self, x, t):
        """DDPM discretization (Eq. 8): f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i)."""
        beta = self.discrete_betas[self.timestep(t)]
        return _bcast(jnp.sqrt(1.0 - beta), x) * x - x, jnp.sqrt(beta)


@flax.struct.dataclass
class subVPSDE(_SDE):  # noqa: N801  (score_sde's name)
    """Sub-VP SDE (Eq. 12): g(t)^2 = beta(t) (1 - exp(-2 int_0^t beta)); std = 1 - alpha^2."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = flax.struct.field(pytree_node=False, default=1000)

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def sde(self, x, t):
        beta_t = self.beta(t)
        discount = -jnp.expm1(-2.0 * self.beta_min * t
                              - (self.beta_max - self.beta_min) * jnp.square(t))
        return -0.5 * _bcast(beta_t, x) * x, jnp.sqrt(beta_t * discount)

    def marginal_coeffs(self, t):
        log_mean = _vp_log_mean_coeff(self.beta_min, self.beta_max, t)
        return jnp.exp(log_mean), -jnp.expm1(2.0 * log_mean)

    def discretize(self, x, t):
        """Euler-Maruyama (score_sde's default): f = drift / N, G = g / sqrt(N)."""
        drift, diffusion = self.sde(x, t)
        dt = 1.0 / self.N
        return drift * dt, diffusion * math.sqrt(dt)


@flax.struct.dataclass
class VESDE(_SDE):
    """Variance-exploding SDE (Eq. 9); marginal mean = x, std = sigma(t)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = flax.struct.field(pytree_node=False, default=1000)

    @property
    def prior_std(self):
        return self.sigma_max

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        diffusion = self.sigma(t) * jnp.sqrt(2.0 * (jnp.log(self.sigma_max)
                                                    - jnp.log(self.sigma_min)))
        return jnp.zeros_like(x), diffusion

    def marginal_coeffs(self, t):
        return jnp.ones_like(t), self.sigma(t)

    @property
    def discrete_sigmas(self):
        return jnp.exp(jnp.linspace(jnp.log(self.sigma_min), jnp.log(self.sigma_max), self.N))

    def timestep(self, t):
        return jnp.clip((t * (self.N - 1) / self.T).astype(jnp.int32), 0, self.N - 1)

    def adjacent_sigmas(self, t):
        """(sigma_i, sigma_{i-1}) of t's grid index i, with sigma_{-1} = 0 (SMLD)."""
        index = self.timestep(t)
        sigmas = self.discrete_sigmas
        return sigmas[index], jnp.where(index == 0, 0.0, sigmas[jnp.maximum(index - 1, 0)])

    def discretize(self, x, t):
        """SMLD discretization (Eq. 7): f = 0, G = sqrt(sigma_i^2 - sigma_{i-1}^2)."""
        sigma, adjacent = self.adjacent_sigmas(t)
        return jnp.zeros_like(x), jnp.sqrt(jnp.square(sigma) - jnp.square(adjacent))


@flax.struct.dataclass
class DDPMVPSDE(_SDE):
    """The VP SDE of a discrete DDPM schedule, exact at its N grid times.

    With abar_i the schedule's ``alphas_cumprod`` (0-based step i), log alpha(t)^2 is the
    piecewise-linear interpolation of log abar through (0, 0) and ((i + 1) / N, log abar_i),
    so p_0t at t = (i + 1) / N is DDPM's q(x_i | x_0) (Ho et al. 2020, Eq. 4) exactly, and
    beta(t) = -d log alpha^2 / dt = -N log(1 - beta_i) on ((i) / N, (i + 1) / N]. For the
    linear schedule this is score_sde's VPSDE up to O(1/N). A network trained on step i
    sees the continuous time t = (i + 1) / N as the (float) step index ``t N - 1``
    (`model_timestep`). ``discretize`` is DDPM's own step with the schedule's betas at
    score_sde's index int(t (N - 1)).

    Fields: ``log_alphas_cumprod`` (N,), ``betas`` (N,).
    """

    log_alphas_cumprod: jax.Array
    betas: jax.Array

    @classmethod
    def from_schedule(cls, schedule) -> "DDPMVPSDE":
        betas = np.asarray(schedule.betas, np.float64)
        log_abar = np.cumsum(np.log1p(-betas))
        return cls(jnp.asarray(log_abar, jnp.float32), jnp.asarray(betas, jnp.float32))

    @property
    def N(self):
        return self.betas.shape[0]

    @property
    def discrete_betas(self):
        return self.betas

    @property
    def alphas(self):
        return 1.0 - self.betas

    def model_timestep(self, t):
        """The DDPM step index a network trained on the schedule sees at t: t N - 1."""
        return t * self.N - 1.0

    def _log_alpha_sq(self, t):
        grid = jnp.arange(self.N + 1, dtype=jnp.float32) / self.N
        values = jnp.concatenate([jnp.zeros((1,), jnp.float32), self.log_alphas_cumprod])
        return jnp.interp(t, grid, values)

    def noise_level(self, t):
        """r(t) = -log alpha(t)^2 = int_0^t beta, increasing from 0; shape of t."""
        return -self._log_alpha_sq(t)

    def time_of_noise_level(self, r):
        """The inverse of `noise_level` (piecewise linear)."""
        grid = jnp.arange(self.N + 1, dtype=jnp.float32) / self.N
        values = jnp.concatenate([jnp.zeros((1,), jnp.float32), -self.log_alphas_cumprod])
        return jnp.interp(r, values, grid)

    def beta(self, t):
        segment = jnp.clip(jnp.ceil(t * self.N).astype(jnp.int32) - 1, 0, self.N - 1)
        return -jnp.log1p(-self.betas[segment]) * self.N  # not a difference of rounded logs

    def sde(self, x, t):
        beta_t = self.beta(t)
        return -0.5 * _bcast(beta_t, x) * x, jnp.sqrt(beta_t)

    def marginal_coeffs(self, t):
        log_alpha_sq = self._log_alpha_sq(t)
        return jnp.exp(0.5 * log_alpha_sq), jnp.sqrt(-jnp.expm1(log_alpha_sq))

    def timestep(self, t):
        return jnp.clip((t * (self.N - 1)).astype(jnp.int32), 0, self.N - 1)

    def discretize(self, x, t):
        beta = self.betas[self.timestep(t)]
        return _bcast(jnp.sqrt(1.0 - beta), x) * x - x, jnp.sqrt(beta)


@flax.struct.dataclass
class ReverseSDE:
    """Reverse-time SDE dx = [f - g^2 score] dt + g dw-bar (Eq. 6), integrated from T to 0,
    or the probability-flow ODE dx = [f - g^2 score / 2] dt (Eq. 13) with probability_flow.

    Same vocabulary as score_sde's ``reverse``: ``sde(x, t)`` and ``discretize(x, t)``
    return the reverse drift and diffusion (diffusion 0 for the ODE).
    """

    forward: _SDE
    score_fn: jax.tree_util.Partial
    probability_flow: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def N(self):
        return self.forward.N

    @property
    def T(self):
        return self.forward.T

    def _weight(self):
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x, t):
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - _bcast(jnp.square(diffusion), x) * score * self._weight()
        return drift, jnp.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x, t):
        f, G = self.forward.discretize(x, t)
        rev_f = f - _bcast(jnp.square(G), x) * self.score_fn(x, t) * self._weight()
        return rev_f, jnp.zeros_like(G) if self.probability_flow else G


SDES = {"vpsde": VPSDE, "subvpsde": subVPSDE, "vesde": VESDE}


def create_sde(name: str, **kwargs):
    """The SDE named ``name`` (one of `SDES`: 'vpsde', 'subvpsde', 'vesde')."""
    check_choice("sde", name, tuple(SDES))
    sde = SDES[name](**kwargs)
    _check_positive_int("N", sde.N)
    if name == "vesde":
        if not 0.0 < kwargs.get("sigma_min", sde.sigma_min) < kwargs.get("sigma_max", sde.sigma_max):
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max; got {kwargs}.")
    elif not 0.0 < sde.beta_min <= sde.beta_max:
        raise ValueError(f"{name} needs 0 < beta_min <= beta_max; got {kwargs}.")
    return sde
