"""Flow-matching samplers: the velocity ODE from noise (t = 0) to data (t = 1).

One integrator for every ODE sampler: `diffusion_jax.ode.solve_ode` (Euler and Heun in one
``lax.scan``, Tsit5 / Dopri5 with a PID controller in one ``lax.while_loop``). The time
convention and the conversions of other parameterisations to a velocity: `diffusion_jax.flow`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import flow, ode

__all__ = ["sample_ode"]


def sample_ode(
    velocity_fn: Callable,
    shape: Sequence[int] | None = None,
    *,
    key=None,
    x0=None,
    solver: str = "heun",
    num_steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    t0: float = 0.0,
    t1: float = 1.0,
) -> dict:
    """Samples by integrating dx/dt = v(x, t) from t0 (noise) to t1 (data), `ode.solve_ode`.

    Args:
      velocity_fn: ``v(x, t)`` with t (B,); a `Partial` reuses the compiled solve.
      shape: (B, ...), with ``key`` drawing x_0 ~ N(0, I); or ``x0`` itself.
      solver: `ode.SOLVERS`: 'euler' (num_steps evaluations), 'heun' (2 num_steps: the
        explicit trapezoid / Heun's second-order method), 'tsit5' / 'dopri5' (adaptive).

    Returns:
      dict: ``sample`` (B, ...), ``nfe`` (int32 scalar), ``success``.
    """
    if x0 is None:
        if key is None or shape is None:
            raise ValueError("sample_ode needs `x0`, or `shape` and `key` to draw it.")
        x0 = jax.random.normal(key, tuple(shape), jnp.float32)
    out = ode.solve_ode(flow.velocity_drift(velocity_fn), jnp.asarray(x0, jnp.float32), t0, t1,
                        solver=solver, num_steps=num_steps, rtol=rtol, atol=atol,
                        max_steps=max_steps)
    return {"sample": out["y"], "nfe": out["nfe"], "success": out["success"]}
