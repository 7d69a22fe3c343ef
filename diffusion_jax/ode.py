"""One ODE integrator and divergence estimators, shared by every ODE sampler and likelihood.

`solve_ode` integrates dy/dt = drift_fn(y, t) from t0 to t1 (either direction) on device:
fixed-step Euler or Heun in one ``lax.scan``, or an adaptive Runge-Kutta method of
``diffrax`` (Tsit5, Dopri5) with a PID step-size controller (rtol, atol) in one
``lax.while_loop``; no host callback inside the solve. ``y`` may be any pytree (the
likelihood integrates (x, log p) together). It knows nothing of SDEs: probability-flow
samplers, the ODE likelihood, flow matching and EDM all pass their own drift.

The number of function evaluations (NFE) is reported: Euler N, Heun 2 N, and for Tsit5 /
Dopri5 (7 stages, first-same-as-last) 6 per attempted step plus 1, the count diffrax
makes (checked in the tests by counting calls).

`divergence_exact` (D vector-Jacobian products: low-dimensional data) and
`divergence_hutchinson` (Hutchinson 1989: E[v^T J v] = tr J for probes with E[v v^T] = I;
Rademacher or Gaussian) compute div f for the instantaneous change of variables.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.gaussian import check_choice

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_SOLVERS",
    "ODEBudgetExhaustedError",
    "PROBES",
    "SOLVERS",
    "divergence_exact",
    "divergence_hutchinson",
    "draw_probes",
    "solve_ode",
]

FIXED_SOLVERS = ("euler", "heun")
ADAPTIVE_SOLVERS = ("tsit5", "dopri5")
SOLVERS = FIXED_SOLVERS + ADAPTIVE_SOLVERS
PROBES = ("rademacher", "gaussian")
_DIFFRAX = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}


class ODEBudgetExhaustedError(RuntimeError):
    """An adaptive solve used all of its ``max_steps`` before reaching t1."""


def _check_tolerance(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")


def solve_ode(
    drift_fn: Callable,
    y0,
    t0: float,
    t1: float,
    *,
    solver: str = "tsit5",
    num_steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    check: bool = True,
) -> dict:
    """Integrates dy/dt = drift_fn(y, t) from t0 to t1; see the module docstring.

    Args:
      drift_fn: ``drift_fn(y, t) -> dy/dt`` with scalar t; a `jax.tree_util.Partial`
        (so its parameters are traced and new ones of the same shapes reuse the code).
      y0: the state at t0, any pytree of float arrays.
      t0, t1: the interval (t1 < t0 integrates backwards).
      solver: one of `SOLVERS`. ``num_steps``: the fixed solvers' step count (required
        for them, not allowed for the adaptive ones).
      rtol, atol, max_steps: the adaptive solvers' tolerances and step budget.
      check: raise `ODEBudgetExhaustedError` if the budget ran out (a host sync after the
        solve; skipped when called under an outer ``jit``: read ``success`` then).

    Returns:
      dict: ``y`` (the state at t1), ``nfe`` (int32 scalar), ``num_steps`` (attempted
      steps), ``success`` (bool scalar: t1 reached).
    """
    check_choice("solver", solver, SOLVERS)
    if solver in FIXED_SOLVERS:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"solver {solver!r} needs num_steps, a positive int; got {num_steps!r}.")
    elif num_steps is not None:
        raise ValueError(f"solver {solver!r} is adaptive; pass rtol/atol, not num_steps.")
    _check_tolerance("rtol", rtol)
    _check_tolerance("atol", atol)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int; got {max_steps!r}.")
    if not callable(drift_fn):
        raise ValueError(f"drift_fn must be callable as drift_fn(y, t); got {drift_fn!r}.")
    if not isinstance(drift_fn, Partial):
        drift_fn = Partial(drift_fn)
    out = _solve(drift_fn, y0, jnp.asarray(t0, jnp.float32), jnp.asarray(t1, jnp.float32), solver=solver,
                 num_steps=num_steps, rtol=float(rtol), atol=float(atol), max_steps=max_steps)
    if check and not isinstance(out["success"], jax.core.Tracer):
        raise_if_exhausted(out["success"], max_steps)
    return out


def raise_if_exhausted(success, max_steps: int) -> None:
    """Raises `ODEBudgetExhaustedError` unless every ``success`` flag is true."""
    ok = np.asarray(success)
    if not ok.all():
        raise ODEBudgetExhaustedError(
            f"The adaptive ODE solve did not reach t1 within max_steps = {max_steps} steps "
            f"({int((~ok).sum())} of {ok.size} solves); raise max_steps or loosen rtol/atol. "
            "No partial result is returned."
        )


@partial(jax.jit, static_argnames=("solver", "num_steps", "rtol", "atol", "max_steps"))
def _solve(drift_fn, y0, t0, t1, *, solver, num_steps, rtol, atol, max_steps):
    if solver in FIXED_SOLVERS:
        return _solve_fixed(drift_fn, y0, t0, t1, solver, num_steps)
    term = diffrax.ODETerm(lambda t, y, args: drift_fn(y, t))
    sol = diffrax.diffeqsolve(
        term, _DIFFRAX[solver](), t0, t1, None, y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps, throw=False,
    )
    steps = sol.stats["num_steps"]
    return {
        "y": jax.tree.map(lambda leaf: leaf[-1], sol.ys),
        "nfe": (6 * steps + 1).astype(jnp.int32),
        "num_steps": steps.astype(jnp.int32),
        "success": sol.result == diffrax.RESULTS.successful,
    }


def _axpy(a, x, y):
    """y + a x over pytrees."""
    return jax.tree.map(lambda xi, yi: yi + a * xi, x, y)


def _solve_fixed(drift_fn, y0, t0, t1, solver, num_steps):
    times = jnp.linspace(t0, t1, num_steps + 1)

    def step(y, interval):
        t, t_next = interval[0], interval[1]
        h = t_next - t
        d0 = drift_fn(y, t)
        if solver == "euler":
            return _axpy(h, d0, y), None
        d1 = drift_fn(_axpy(h, d0, y), t_next)
        mean = jax.tree.map(lambda a, b: 0.5 * (a + b), d0, d1)
        return _axpy(h, mean, y), None

    intervals = jnp.stack([times[:-1], times[1:]], axis=1)
    y, _ = jax.lax.scan(step, y0, intervals)
    per_step = 1 if solver == "euler" else 2
    return {
        "y": y,
        "nfe": jnp.int32(per_step * num_steps),
        "num_steps": jnp.int32(num_steps),
        "success": jnp.bool_(True),
    }


def _sum_flat(x):
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def divergence_exact(fn: Callable, x):
    """div fn at x for each example, exactly: sum_i d fn(x)_i / d x_i, shape (B,).

    ``fn`` maps (B, ...) -> (B, ...) with examples independent. One linearisation and D
    vector-Jacobian products (reverse mode, so custom-VJP layers work): for D up to a few
    hundred.
    """
    batch, dims = x.shape[0], math.prod(x.shape[1:])
    _, vjp_fn = jax.vjp(fn, x)
    basis = jnp.eye(dims, dtype=x.dtype).reshape((dims, 1) + x.shape[1:])

    def diagonal_entry(e):
        (row,) = vjp_fn(jnp.broadcast_to(e, x.shape))
        return _sum_flat(row * e)

    return jnp.sum(jax.lax.map(diagonal_entry, basis), axis=0).reshape((batch,))


def divergence_hutchinson(fn: Callable, x, probes):
    """Hutchinson's estimate of div fn: mean over probes v of v^T (J^T v), shape (B,).

    Args:
      probes: shape x.shape (one probe per example) or (K, *x.shape) (K probes averaged).
    """
    probes = jnp.asarray(probes)
    if probes.shape == x.shape:
        probes = probes[None]
    if probes.shape[1:] != x.shape:
        raise ValueError(
            f"probes must have shape x.shape = {x.shape} or (K, *x.shape); got {probes.shape}."
        )
    _, vjp_fn = jax.vjp(fn, x)

    def estimate(v):
        (jtv,) = vjp_fn(v)
        return _sum_flat(jtv * v)

    return jnp.mean(jax.vmap(estimate)(probes), axis=0)


def draw_probes(key, shape, kind: str = "rademacher", dtype=jnp.float32):
    """Probes with E[v v^T] = I: Rademacher (+-1) or standard Gaussian, of ``shape``."""
    check_choice("probe", kind, PROBES)
    if kind == "rademacher":
        return jax.random.rademacher(key, tuple(shape), dtype)
    return jax.random.normal(key, tuple(shape), dtype)
