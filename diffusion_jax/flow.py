"""Flow matching (Lipman et al. 2023) and rectified flow (Liu et al. 2023) on affine paths.

Time convention (facebookresearch/flow_matching's): t in [0, 1], NOISE at t = 0 and DATA
at t = 1. With x_1 ~ data and x_0 ~ N(0, I) (x_0 is DDPM's eps),

  x_t = alpha_t x_1 + sigma_t x_0,   u_t = d alpha_t x_1 + d sigma_t x_0   (Lipman et al.
  2024, "Flow Matching Guide and Code", Eq. 4.4 / 4.5 with their scheduler naming),

and the marginal velocity v(x, t) = E[u_t | x_t = x] carries N(0, I) at t = 0 to the data at
t = 1 (dx/dt = v). score_sde runs the other way (data at s = 0, noise at s = 1): s = 1 - t
(`to_score_sde_time`), and the `VPPath` at t has the marginal coefficients of score_sde's
VP SDE at s = 1 - t (alpha = e^{-B(s)/2}, std = sqrt(1 - e^{-B(s)}); tested against
`sde.VPSDE`). A velocity in score_sde's time is minus this one: dx/ds = -dx/dt.

Paths (`PATHS`): ``'cond_ot'`` (alpha = t, sigma = 1 - t: the conditional OT path, rectified
flow), ``'cosine'`` (alpha = sin(pi t / 2), sigma = cos(pi t / 2)), ``'vp'`` (beta_min 0.1,
beta_max 20; flow_matching's ``VPScheduler``; alpha_0 = e^{-5.03}, not exactly noise).

A network's output is one of `PARAMETERIZATIONS`, converted in one place (`convert`):
``'velocity'`` (u), ``'data'`` (E[x_1 | x_t], DDPM's x0 prediction), ``'noise'``
(E[x_0 | x_t], DDPM's eps) and ``'score'`` (grad log p_t = -noise / sigma_t). Given x_t, the
pair (data, noise) determines the rest: x_t = alpha data + sigma noise, u = d alpha data +
d sigma noise.

Sampling integrates the velocity ODE and the exact log-likelihood integrates the
instantaneous change of variables (Chen et al. 2018, Eq. 2; Grathwohl et al. 2019) with the
shared integrator and divergences of `diffusion_jax.ode`: `sampling.flow.sample_ode`,
`log_likelihood`.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from diffusion_jax import ode
from diffusion_jax.gaussian import check_choice

__all__ = [
    "CondOTPath",
    "CosinePath",
    "PARAMETERIZATIONS",
    "PATHS",
    "VPPath",
    "convert",
    "get_path",
    "log_likelihood",
    "path_sample",
    "to_score_sde_time",
    "velocity_drift",
    "velocity_loss",
]

PARAMETERIZATIONS = ("velocity", "data", "noise", "score")
DIVERGENCES = ("exact", "hutchinson")


def _b(c, x):
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (jnp.ndim(x) - c.ndim))


def _sum_flat(x):
    return jnp.sum(x, axis=tuple(range(1, jnp.ndim(x))))


@flax.struct.dataclass
class CondOTPath:
    """alpha_t = t, sigma_t = 1 - t (Lipman et al. 2023, Eq. 20-23; Liu et al. 2023)."""

    def coeffs(self, t):
        """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt), each of t's shape."""
        t = jnp.asarray(t, jnp.float32)
        return t, 1.0 - t, jnp.ones_like(t), -jnp.ones_like(t)


@flax.struct.dataclass
class CosinePath:
    """alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (flow_matching ``CosineScheduler``)."""

    def coeffs(self, t):
        a = 0.5 * math.pi * jnp.asarray(t, jnp.float32)
        return jnp.sin(a), jnp.cos(a), 0.5 * math.pi * jnp.cos(a), -0.5 * math.pi * jnp.sin(a)


@flax.struct.dataclass
class VPPath:
    """score_sde's VP SDE run forward in flow time (flow_matching ``VPScheduler``):
    B = (1 - t)^2 (beta_max - beta_min) / 2 + (1 - t) beta_min, alpha = e^{-B/2},
    sigma = sqrt(1 - e^{-B})."""

    beta_min: float = flax.struct.field(pytree_node=False, default=0.1)
    beta_max: float = flax.struct.field(pytree_node=False, default=20.0)

    def coeffs(self, t):
        s = 1.0 - jnp.asarray(t, jnp.float32)
        big_b = 0.5 * jnp.square(s) * (self.beta_max - self.beta_min) + s * self.beta_min
        d_big_b = -s * (self.beta_max - self.beta_min) - self.beta_min  # dB/dt
        alpha = jnp.exp(-0.5 * big_b)
        sigma = jnp.sqrt(-jnp.expm1(-big_b))
        return alpha, sigma, -0.5 * d_big_b * alpha, 0.5 * d_big_b * jnp.exp(-big_b) / sigma


PATHS = {"cond_ot": CondOTPath, "cosine": CosinePath, "vp": VPPath}


def get_path(name: str, **kwargs):
    """A path by name (`PATHS`); ``kwargs`` set a VP path's beta_min / beta_max."""
    check_choice("path", name, tuple(PATHS))
    if name == "vp":
        lo, hi = kwargs.get("beta_min", 0.1), kwargs.get("beta_max", 20.0)
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"The VP path needs 0 < beta_min < beta_max; got {lo}, {hi}.")
    elif kwargs:
        raise ValueError(f"Path {name!r} takes no parameters; got {sorted(kwargs)}.")
    return PATHS[name](**kwargs)


def to_score_sde_time(t):
    """s = 1 - t: flow time (noise 0, data 1) to score_sde's (data 0, noise 1); its own inverse."""
    return 1.0 - t


def path_sample(path, x1, t, noise):
    """x_t = alpha_t x_1 + sigma_t x_0 and the conditional velocity u_t = alpha'_t x_1 +
    sigma'_t x_0 (the regression target), each of x1's shape.

    Args:
      x1: data (B, ...). t: (B,) in [0, 1]. noise: x_0 ~ N(0, I), x1's shape.
    """
    alpha, sigma, d_alpha, d_sigma = (_b(c, x1) for c in path.coeffs(t))
    return alpha * x1 + sigma * noise, d_alpha * x1 + d_sigma * noise


def _to_data_noise(path, output, x_t, t, source):
    alpha, sigma, d_alpha, d_sigma = (_b(c, x_t) for c in path.coeffs(t))
    if source == "velocity":  # solve [alpha sigma; d_alpha d_sigma] (data, noise) = (x_t, v)
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * x_t - sigma * output) / det, (alpha * output - d_alpha * x_t) / det
    if source == "data":
        return output, (x_t - alpha * output) / sigma
    noise = output if source == "noise" else -sigma * output
    return (x_t - sigma * noise) / alpha, noise


def convert(path, output, x_t, t, *, source: str, target: str):
    """A model output of parameterisation ``source`` as ``target`` (both `PARAMETERIZATIONS`).

    Through the pair (data, noise) at (x_t, t): from velocity, data = (sigma' x_t - sigma v)
    / (alpha sigma' - sigma alpha'), noise = (alpha v - alpha' x_t) / (alpha sigma' - sigma
    alpha'); from data, noise = (x_t - alpha data) / sigma; from noise (or score = -noise /
    sigma), data = (x_t - sigma noise) / alpha. Divisions by alpha (t = 0) or sigma (t = 1)
    are the caller's to avoid.

    Args:
      output, x_t: (B, ...). t: (B,).
    """
    check_choice("parameterization", source, PARAMETERIZATIONS)
    check_choice("parameterization", target, PARAMETERIZATIONS)
    if source == target:
        return output
    data, noise = _to_data_noise(path, output, x_t, t, source)
    alpha, sigma, d_alpha, d_sigma = (_b(c, x_t) for c in path.coeffs(t))
    if target == "velocity":
        return d_alpha * data + d_sigma * noise
    if target == "data":
        return data
    return noise if target == "noise" else -noise / sigma


def velocity_loss(path, model_fn: Callable, x1, *, key=None, t=None, noise=None) -> dict:
    """Conditional flow matching: ||v_theta(x_t, t) - u_t||^2, mean over each example's
    elements (Lipman et al. 2023, Eq. 9; flow_matching's examples: t ~ U[0, 1]).

    Args:
      model_fn: ``model_fn(x_t, t) -> velocity`` with t (B,) in [0, 1].
      x1: data (B, ...). key: draws t and x_0 ~ N(0, I) when they are not given.

    Returns:
      dict: ``loss`` (B,) and ``t`` (B,).
    """
    if key is None and (t is None or noise is None):
        raise ValueError("velocity_loss needs `key` unless both `t` and `noise` are given.")
    t_key, noise_key = jax.random.split(key) if key is not None else (None, None)
    if t is None:
        t = jax.random.uniform(t_key, (x1.shape[0],), jnp.float32)
    if noise is None:
        noise = jax.random.normal(noise_key, x1.shape, x1.dtype)
    x_t, target = path_sample(path, x1, t, noise)
    err = jnp.square(model_fn(x_t, t) - target)
    return {"loss": jnp.mean(err, axis=tuple(range(1, x1.ndim))), "t": t}


def _velocity_drift(velocity_fn, x, t):
    return velocity_fn(x, jnp.full((x.shape[0],), t, x.dtype))


def velocity_drift(velocity_fn) -> Partial:
    """``drift(x, t)`` for `ode.solve_ode` (scalar t) from ``v(x, t)`` (t of shape (B,))."""
    return Partial(_velocity_drift, _as_partial(velocity_fn))


def _as_partial(fn):
    if not callable(fn):
        raise ValueError(f"velocity_fn must be callable as v(x, t); got {fn!r}.")
    return fn if isinstance(fn, Partial) else Partial(fn)


def _likelihood_drift(velocity_fn, probes, state, t):
    """(v, div v) at (x, t): exact divergence when ``probes`` is None, else Hutchinson's."""
    x = state[0]

    def fn(y):
        return _velocity_drift(velocity_fn, y, t)

    if probes is None:
        return fn(x), ode.divergence_exact(fn, x)
    return fn(x), ode.divergence_hutchinson(fn, x, probes)


def log_likelihood(
    velocity_fn: Callable,
    x1,
    *,
    divergence: str = "exact",
    key=None,
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: str = "tsit5",
    num_steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    t0: float = 0.0,
    t1: float = 1.0,
) -> dict:
    """log p_1(x1) under the flow, in nats per example: log N(x_0; 0, I) - int_0^1 div v dt.

    Integrates (x, z) from t1 back to t0 with dx/dt = v and dz/dt = div v (z(t1) = 0), so
    log p_1(x_1) = log N(x(t0); 0, I) + z(t0) (Chen et al. 2018, Theorem 1). The divergence
    is exact (`ode.divergence_exact`: low-dimensional data) or Hutchinson's estimate with
    ``num_probes`` probes drawn once from ``key`` and held fixed over the solve (FFJORD).
    No dequantization: for discrete data add its offset yourself.

    Returns:
      dict: ``log_likelihood`` (B,), ``bpd`` (B,: -log p / (D ln 2)), ``x0`` (B, ...),
      ``nfe``, ``success`` (False if an adaptive solve ran out of steps; outside ``jit``
      that raises `ode.ODEBudgetExhaustedError` instead).
    """
    check_choice("divergence", divergence, DIVERGENCES)
    x1 = jnp.asarray(x1, jnp.float32)
    probes = None
    if divergence == "hutchinson":
        if key is None:
            raise ValueError("divergence='hutchinson' needs `key` to draw its probes.")
        probes = ode.draw_probes(key, (num_probes,) + x1.shape, probe)
    drift = Partial(_likelihood_drift, _as_partial(velocity_fn), probes)
    state0 = (x1, jnp.zeros((x1.shape[0],), jnp.float32))
    out = ode.solve_ode(drift, state0, t1, t0, solver=solver, num_steps=num_steps, rtol=rtol,
                        atol=atol, max_steps=max_steps)
    x0, delta = out["y"]
    dims = math.prod(x1.shape[1:])
    prior = -0.5 * dims * math.log(2.0 * math.pi) - 0.5 * _sum_flat(jnp.square(x0))
    logp = prior + delta
    return {"log_likelihood": logp, "bpd": -logp / (dims * math.log(2.0)), "x0": x0,
            "nfe": out["nfe"], "success": out["success"]}
