"""EDM (Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", arXiv:2206.00364): preconditioning, loss weighting, sigma grid, samplers.

The data are y, the noisy input x = y + n with n ~ N(0, sigma^2 I) (sigma in data units),
and the denoiser D(x; sigma) estimates E[y | x] (Eq. 2-3). A raw network F is called
through the library's ``model_fn(x, t)`` contract with t = c_noise(sigma), shape (B,):

  D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))   (Eq. 7)

with the coefficients of Table 1, as NVlabs/edm ``training/networks.py`` writes them:

- `EDMPrecond` (sigma_data = 0.5): c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd /
  sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4;
- `VPPrecond` (beta_d = 19.9, beta_min = 0.1, M = 1000, epsilon_t = 1e-5): c_skip = 1,
  c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) sigma^-1(sigma), with
  sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1);
- `VEPrecond` (sigma_min = 0.02, sigma_max = 100): c_skip = 1, c_out = sigma, c_in = 1,
  c_noise = ln(sigma / 2);
- `DDPMPrecond` (NVlabs' iDDPMPrecond): a DDPM eps network on its own discrete steps, so
  EDM's samplers run models trained here with the ``ddpm`` objective.

Training (Eq. 8, ``training/loss.py``): E_{sigma, y, n} lambda(sigma) ||D(y + n; sigma) - y||^2
with sigma drawn per preconditioning: EDM ln sigma ~ N(P_mean = -1.2, P_std^2 = 1.2^2) and
lambda = (sigma^2 + sd^2) / (sigma sd)^2; VP sigma = sigma(1 + u (epsilon_t - 1)); VE
sigma = sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1); lambda = 1 / sigma^2 for both.
NVlabs sums the weighted squares over an example's elements; `edm_loss` averages them
(``reduce_mean=True``, the project's DDPM convention) unless asked to sum.

Sampling (Algorithms 1 and 2, ``generate.py``'s ``edm_sampler``; the steps are
`diffusion_jax.sampling.edm`, the grid is here): the rho = 7 grid
sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
i < N, then sigma_N = 0 (Eq. 5); x_0 = sigma_0 z; per step an optional churn to
sigma_hat = (1 + gamma_i) sigma_i, an Euler step of dx/dsigma = (x - D(x; sigma)) / sigma
and, except into sigma_N = 0, Heun's correction: 2 N - 1 evaluations (N = 18: 35). The grid
is computed in float64 and stored as float32; the state is float32 (NVlabs: float64).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.gaussian import check_choice

__all__ = [
    "DDPMPrecond",
    "EDMPrecond",
    "PRECONDITIONINGS",
    "VEPrecond",
    "VPPrecond",
    "denoise",
    "denoiser_fn",
    "edm_loss",
    "get_preconditioning",
    "round_sigma",
    "sigma_steps",
    "step_gammas",
    "training_sigmas",
]


def _b(c, x):
    """A per-example coefficient of shape (B,) (or a scalar) broadcast against x."""
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (jnp.ndim(x) - c.ndim))


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")


@flax.struct.dataclass
class EDMPrecond:
    """EDM's own preconditioning (Table 1, right column). Supports every sigma > 0."""

    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise), each of sigma's shape."""
        sd2 = self.sigma_data**2
        total = jnp.square(sigma) + sd2
        return sd2 / total, sigma * self.sigma_data * jax.lax.rsqrt(total), jax.lax.rsqrt(total), (
            jnp.log(sigma) / 4.0
        )

    @property
    def sigma_range(self):
        return 0.0, math.inf

    def training_sigma(self, u_normal, u_uniform, *, P_mean, P_std):
        del u_uniform
        return jnp.exp(u_normal * P_std + P_mean)

    def loss_weight(self, sigma):
        """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
        return (jnp.square(sigma) + self.sigma_data**2) / jnp.square(sigma * self.sigma_data)


@flax.struct.dataclass
class VPPrecond:
    """The VP preconditioning of Table 1 (Song et al. 2021's VP SDE, DDPM++ networks)."""

    beta_d: float = flax.struct.field(pytree_node=False, default=19.9)
    beta_min: float = flax.struct.field(pytree_node=False, default=0.1)
    M: int = flax.struct.field(pytree_node=False, default=1000)
    epsilon_t: float = flax.struct.field(pytree_node=False, default=1e-5)

    def sigma(self, t):
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        return jnp.sqrt(jnp.expm1(0.5 * self.beta_d * jnp.square(t) + self.beta_min * t))

    def sigma_inv(self, sigma):
        """t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
        return (
            jnp.sqrt(self.beta_min**2 + 2.0 * self.beta_d * jnp.log1p(jnp.square(sigma)))
            - self.beta_min
        ) / self.beta_d

    def coefficients(self, sigma):
        one = jnp.ones_like(sigma)
        return one, -sigma, jax.lax.rsqrt(jnp.square(sigma) + 1.0), (
            (self.M - 1) * self.sigma_inv(sigma)
        )

    @property
    def sigma_range(self):
        return float(self.sigma(self.epsilon_t)), float(self.sigma(1.0))

    def training_sigma(self, u_normal, u_uniform, *, P_mean, P_std):
        del u_normal, P_mean, P_std
        return self.sigma(1.0 + u_uniform * (self.epsilon_t - 1.0))

    def loss_weight(self, sigma):
        return 1.0 / jnp.square(sigma)


@flax.struct.dataclass
class VEPrecond:
    """The VE preconditioning of Table 1 (Song et al. 2021's VE SDE, NCSN++ networks)."""

    sigma_min: float = flax.struct.field(pytree_node=False, default=0.02)
    sigma_max: float = flax.struct.field(pytree_node=False, default=100.0)

    def coefficients(self, sigma):
        one = jnp.ones_like(sigma)
        return one, sigma, one, jnp.log(0.5 * sigma)

    @property
    def sigma_range(self):
        return float(self.sigma_min), float(self.sigma_max)

    def training_sigma(self, u_normal, u_uniform, *, P_mean, P_std):
        del u_normal, P_mean, P_std
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u_uniform

    def loss_weight(self, sigma):
        return 1.0 / jnp.square(sigma)


@flax.struct.dataclass
class DDPMPrecond:
    """NVlabs/edm's ``iDDPMPrecond`` for an eps network trained on the T discrete steps of a
    DDPM schedule: sigma_j = sqrt((1 - abar_j) / abar_j) (x_t / sqrt(abar_j) = x_0 + sigma_j
    eps), c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = the step j whose
    sigma_j is nearest (int32; DDPM's index, 0 = least noise; NVlabs counts the other way).
    Sample on ``sigmas`` (`sigma_steps(grid=...)`) inside ``sigma_range``."""

    sigmas: jax.Array  # (T,) increasing

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod):
        abar = np.asarray(alphas_cumprod, np.float64)
        return cls(sigmas=jnp.asarray(np.sqrt((1.0 - abar) / abar), jnp.float32))

    def step_index(self, sigma):
        """The nearest step j of each sigma, int32 of sigma's shape."""
        grid = self.sigmas.reshape((1,) * jnp.ndim(sigma) + self.sigmas.shape)
        return jnp.argmin(jnp.abs(sigma[..., None] - grid), axis=-1).astype(jnp.int32)

    def coefficients(self, sigma):
        one = jnp.ones_like(sigma)
        return one, -sigma, jax.lax.rsqrt(jnp.square(sigma) + 1.0), self.step_index(sigma)

    @property
    def sigma_range(self):
        return float(self.sigmas[0]), float(self.sigmas[-1])


PRECONDITIONINGS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond}


def get_preconditioning(name: str, **kwargs):
    """A preconditioning by name ('edm', 'vp', 've') with the paper's defaults overridden
    by ``kwargs`` (e.g. ``sigma_data=0.5``)."""
    check_choice("preconditioning", name, tuple(PRECONDITIONINGS))
    if name == "ve" and "sigma_min" in kwargs and "sigma_max" in kwargs:
        _check_range(kwargs["sigma_min"], kwargs["sigma_max"])
    for field, value in kwargs.items():
        if field != "M":
            _check_positive(field, value)
    try:
        return PRECONDITIONINGS[name](**kwargs)
    except TypeError:
        fields = list(PRECONDITIONINGS[name].__dataclass_fields__)
        raise ValueError(
            f"Unknown field for preconditioning {name!r} in {sorted(kwargs)}; valid: {fields}."
        ) from None


def denoise(precond, model_output_fn: Callable, x, sigma):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7), shape of x.

    Args:
      precond: `EDMPrecond`, `VPPrecond` or `VEPrecond`.
      model_output_fn: the raw network, ``model_fn(x_in, c_noise) -> F``, x's shape.
      x: noisy data (B, ...). sigma: noise levels (B,), in data units.
    """
    c_skip, c_out, c_in, c_noise = precond.coefficients(sigma)
    return _b(c_skip, x) * x + _b(c_out, x) * model_output_fn(_b(c_in, x) * x, c_noise)


def denoiser_fn(precond, model_fn: Callable) -> Partial:
    """``D(x, sigma)`` as a `Partial` (so ``jit`` traces the network's parameters)."""
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable as model_fn(x, t); got {model_fn!r}.")
    if not isinstance(model_fn, Partial):
        model_fn = Partial(model_fn)
    return Partial(denoise, precond, model_fn)


def training_sigmas(precond, key, batch: int, *, P_mean: float = -1.2, P_std: float = 1.2):
    """Per-example training noise levels (B,) of `training/loss.py` (see module docstring)."""
    normal_key, uniform_key = jax.random.split(key)
    u_normal = jax.random.normal(normal_key, (batch,), jnp.float32)
    u_uniform = jax.random.uniform(uniform_key, (batch,), jnp.float32)
    return precond.training_sigma(u_normal, u_uniform, P_mean=P_mean, P_std=P_std)


def edm_loss(
    precond,
    model_fn: Callable,
    y,
    *,
    key,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    reduce_mean: bool = True,
) -> dict:
    """lambda(sigma) ||D(y + n; sigma) - y||^2 per example (Eq. 8; `training/loss.py`).

    Args:
      model_fn: the raw network F, ``model_fn(x_in, c_noise)``.
      y: clean data (B, ...). key: draws sigma (`training_sigmas`) and n.
      P_mean, P_std: the log-normal of `EDMPrecond`'s sigma (others ignore them).
      reduce_mean: mean over each example's elements (else the sum, as NVlabs).

    Returns:
      dict: ``loss`` (B,), ``sigma`` (B,), ``mse`` (B,) (unweighted, mean over elements).
    """
    _check_positive("P_std", P_std)
    sigma_key, noise_key = jax.random.split(key)
    sigma = training_sigmas(precond, sigma_key, y.shape[0], P_mean=P_mean, P_std=P_std)
    noise = jax.random.normal(noise_key, y.shape, y.dtype) * _b(sigma, y)
    squares = jnp.square(denoise(precond, model_fn, y + noise, sigma) - y)
    axes = tuple(range(1, y.ndim))
    reduced = jnp.mean(squares, axes) if reduce_mean else jnp.sum(squares, axes)
    return {"loss": precond.loss_weight(sigma) * reduced, "sigma": sigma,
            "mse": jnp.mean(squares, axes)}


def _check_range(sigma_min, sigma_max):
    _check_positive("sigma_min", sigma_min)
    _check_positive("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max; got {sigma_min} >= {sigma_max}.")


def round_sigma(sigma, grid: Sequence[float] | None = None):
    """EDM's ``net.round_sigma``: the identity (EDM, VP, VE), or the nearest value of a
    discrete ``grid`` of noise levels (iDDPMPrecond: a model trained on fixed steps)."""
    if grid is None:
        return sigma
    grid = np.asarray(grid, np.float64)
    sigma = np.asarray(sigma, np.float64)
    return grid[np.argmin(np.abs(sigma[..., None] - grid), axis=-1)]


def sigma_steps(
    num_steps: int = 18,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    grid: Sequence[float] | None = None,
) -> np.ndarray:
    """The time steps of Eq. 5 with sigma_N = 0 appended: float64 NumPy array (N + 1,).

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i < N, rounded by `round_sigma` (``grid``), then 0 (``generate.py``).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (sigma_max ... sigma_min); got {num_steps!r}.")
    _check_range(sigma_min, sigma_max)
    _check_positive("rho", rho)
    i = np.arange(num_steps, dtype=np.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return np.concatenate([round_sigma(sigmas, grid), np.zeros(1)])


def step_gammas(sigmas: np.ndarray, *, S_churn=0.0, S_min=0.0, S_max=math.inf) -> np.ndarray:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0
    (Algorithm 2), float64 (N,) for the grid ``sigmas`` (N + 1,)."""
    for name, value in (("S_churn", S_churn), ("S_min", S_min)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0; got {value!r}.")
    if not (isinstance(S_max, (int, float)) and S_max >= S_min):
        raise ValueError(f"S_max must be a number >= S_min = {S_min}; got {S_max!r}.")
    num = len(sigmas) - 1
    gamma = min(S_churn / num, math.sqrt(2.0) - 1.0)
    cur = np.asarray(sigmas[:-1], np.float64)
    return np.where((cur >= S_min) & (cur <= S_max), gamma, 0.0)
