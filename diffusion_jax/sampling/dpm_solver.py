"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2): a multistep second-order solver of the
diffusion ODE in its data-prediction form.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the half log-SNR
lambda_t = log(alpha_t / sigma_t), one step from t to t' (h = lambda_t' - lambda_t > 0) is

    x_t' = (sigma_t' / sigma_t) x_t - alpha_t' (exp(-h) - 1) D,

with D = x0_pred(x_t, t) (first order, the first step; equal to DDIM) or, given the
previous step's prediction at t_prev (h_prev = lambda_t - lambda_t_prev, r = h_prev / h),
D = (1 + 1/(2r)) x0_pred(x_t, t) - 1/(2r) x0_pred(x_t_prev, t_prev) (second order).

Time grid (discrete-time schedule): N model evaluations. The first N - 1 steps go
through N points t_0 = T-1 > t_1 > ... > t_{N-1} = 0 of the schedule's own steps, evenly
spaced in lambda (``spacing='logsnr'``, the paper's recommendation for low-resolution
data), in t (``'time_uniform'``) or in sqrt(t) (``'time_quadratic'``, the grid the
DPM-Solver code offers for discrete-time models: t_i = (sqrt(T-1) (1 - i/(N-1)))^2, more
points near the data), rounded to integer steps and kept strictly decreasing, with lambda
read from the discrete alphas_cumprod. The last step goes from step 0 to the data (abar = 1,
sigma = 0, lambda = +inf): the update with h = inf is the first-order one and returns
x0_pred(x, 0), i.e. the final step denoises (DPM-Solver's ``denoise_to_zero``).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from diffusion_jax import gaussian
from diffusion_jax.gaussian import extract
from diffusion_jax.sampling import _common
from diffusion_jax.schedules import Schedule

__all__ = [
    "SPACINGS",
    "dpm_solver_pp_sample_loop",
    "dpm_solver_pp_step",
    "dpm_solver_timesteps",
]

SPACINGS = ("logsnr", "time_uniform", "time_quadratic")


def _log_snr_coefficients(schedule: Schedule):
    """alpha, sigma, lambda for steps -1 (the data) .. T-1, shape (T + 1,), index t + 1."""
    one = jnp.ones((1,), schedule.alphas_cumprod.dtype)
    lam = jnp.log(schedule.sqrt_alphas_cumprod) - 0.5 * schedule.log_one_minus_alphas_cumprod
    alpha = jnp.concatenate([one, schedule.sqrt_alphas_cumprod])
    sigma = jnp.concatenate([0.0 * one, schedule.sqrt_one_minus_alphas_cumprod])
    return alpha, sigma, jnp.concatenate([jnp.inf * one, lam])


def dpm_solver_timesteps(schedule: Schedule, num_steps: int, *, spacing: str = "logsnr"):
    """The N grid points t_0 = T-1 > ... > t_{N-1} = 0 (0-based steps; see module doc).

    ``logsnr``: evenly spaced in lambda = log(sqrt(abar) / sqrt(1 - abar)) between
    lambda(T-1) and lambda(0) (the step-size schedule DPM-Solver recommends), rounded to steps;
    ``time_uniform``: evenly spaced in t; ``time_quadratic``: evenly spaced in sqrt(t),
    which puts more points near t = 0, where a sharp data distribution needs them. Points
    that round to the same step are pushed apart so the grid is strictly decreasing. Works
    on traced schedules.

    Args:
      num_steps: N, 1 <= N <= T (N = 1 gives [T-1]).

    Returns:
      int32 array (N,).
    """
    gaussian.check_choice("spacing", spacing, SPACINGS)
    _check_num_steps(num_steps, schedule.num_timesteps)
    return _timesteps(schedule, num_steps=num_steps, spacing=spacing)


@partial(jax.jit, static_argnames=("num_steps", "spacing"))
def _timesteps(schedule, *, num_steps, spacing):
    num_timesteps = schedule.num_timesteps
    steps = jnp.arange(num_timesteps, dtype=jnp.float32)
    if spacing == "logsnr":
        _, _, lam = _log_snr_coefficients(schedule)
        lam = lam[1:]  # lambda of steps 0..T-1, decreasing in t
        targets = jnp.linspace(lam[-1], lam[0], num_steps)
        # interp needs increasing abscissae: lambda reversed maps to t reversed.
        continuous = jnp.interp(targets, lam[::-1], steps[::-1])
    elif spacing == "time_quadratic":
        continuous = jnp.linspace(jnp.sqrt(num_timesteps - 1.0), 0.0, num_steps) ** 2
    else:
        continuous = jnp.linspace(num_timesteps - 1.0, 0.0, num_steps)
    rounded = jnp.round(continuous).astype(jnp.int32)
    index = jnp.arange(num_steps, dtype=jnp.int32)
    # t_i = max(rounded_i, t_{i+1} + 1) for every i at once: a reverse cumulative max of
    # rounded_j + j; then t_i <= T-1-i. Both keep the grid strictly decreasing.
    pushed = jax.lax.cummax(rounded + index, reverse=True) - index
    grid = jnp.minimum(pushed, num_timesteps - 1 - index)
    grid = grid.at[0].set(num_timesteps - 1)
    return grid.at[-1].set(0) if num_steps > 1 else grid


def _check_num_steps(num_steps, num_timesteps: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}.")
    if num_steps > num_timesteps:
        raise ValueError(
            f"num_steps = {num_steps} exceeds the schedule's {num_timesteps} steps; "
            f"use at most {num_timesteps}."
        )
    return num_steps


def dpm_solver_pp_step(
    schedule: Schedule,
    x_t,
    t,
    t_next,
    pred_xstart,
    *,
    prev_pred_xstart=None,
    t_prev=None,
) -> jax.Array:
    """One DPM-Solver++ update x_t -> x_{t_next} (Lu et al. 2022, Algorithm 2).

    First order (DPM-Solver++1, the same as DDIM with eta = 0) without
    ``prev_pred_xstart``; second order (the multistep 2M update) with it, except where
    t_next = -1 (the data, lambda = +inf), where only the first-order update is defined
    and it returns ``pred_xstart``. Formulas in the module docstring.

    Args:
      x_t: shape (B, ..., C), at noise level alphas_cumprod[t].
      t: int array (B,), steps in [0, T). t_next: int array (B,), t_next < t, in [-1, T)
        (-1: the data). Their values are the caller's duty.
      pred_xstart: x_0 prediction at (x_t, t), x_t's shape.
      prev_pred_xstart, t_prev: the x_0 prediction of the previous step and its step
        (t_prev > t), for the second-order update; both or neither.

    Returns:
      x_{t_next}, x_t's shape.
    """
    if (prev_pred_xstart is None) != (t_prev is None):
        raise ValueError("Pass both `prev_pred_xstart` and `t_prev`, or neither.")
    if prev_pred_xstart is None:
        return _update(schedule, x_t, t, t_next, pred_xstart, pred_xstart, t, False)
    return _update(schedule, x_t, t, t_next, pred_xstart, prev_pred_xstart, t_prev, True)


def _update(schedule, x, t, t_next, x0, x0_prev, t_prev, second_order):
    shape = jnp.shape(x)
    alpha, sigma, lam = _log_snr_coefficients(schedule)

    def at(coef, step):
        return extract(coef, jnp.asarray(step) + 1, shape)

    h = at(lam, t_next) - at(lam, t)
    second = jnp.logical_and(second_order, jnp.asarray(t_next) >= 0)
    second = second.reshape((-1,) + (1,) * (len(shape) - 1))
    h_prev = jnp.where(second, at(lam, t) - at(lam, t_prev), 1.0)
    # 1 / (2 r) = h / (2 h_prev); 0 where the update is first order (h may be inf there).
    half_inv_ratio = jnp.where(second, jnp.where(second, h, 0.0) / (2.0 * h_prev), 0.0)
    d = x0 + half_inv_ratio * (x0 - x0_prev)
    return (at(sigma, t_next) / at(sigma, t)) * x + at(alpha, t_next) * -jnp.expm1(-h) * d


def dpm_solver_pp_sample_loop(
    schedule: Schedule,
    model_fn: Callable,
    shape: Sequence[int],
    *,
    num_steps: int,
    key=None,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
    spacing: str = "logsnr",
    x_T=None,
) -> dict:
    """DPM-Solver++(2M) sampling with N model evaluations (Lu et al. 2022, Algorithm 2).

    Deterministic given x_T. The network's output is turned into an x_0 prediction by
    `gaussian.p_mean_variance` (mean_type eps, xstart, v or xprev; ``clip_denoised``
    clips it to [-1, 1], the simplest of the paper's thresholding methods). Grid and the
    final denoising step: module docstring. One ``lax.scan`` under one ``jit``.

    Args:
      schedule: the discrete-time schedule (or a respaced one with its model).
      model_fn: ``model_fn(x_t, t) -> output``, preferably a `jax.tree_util.Partial`.
      shape: sample shape (B, ..., C).
      num_steps: N model evaluations, 1 <= N <= T.
      key: PRNG key drawing x_T from ``fold_in(key, T)``; not needed when x_T is given.
      spacing: ``'logsnr'``, ``'time_uniform'`` or ``'time_quadratic'``
        (`dpm_solver_timesteps`).

    Returns:
      dict with ``sample`` (``shape``).
    """
    _common.check_types(mean_type, var_type)
    gaussian.check_choice("spacing", spacing, SPACINGS)
    _check_num_steps(num_steps, schedule.num_timesteps)
    shape, x_T, key = _common.initial_state(shape, x_T, key, key_needed=False)
    return _dpm_solver_pp_sample_loop(
        schedule, _common.as_model_fn(model_fn), x_T, key,
        shape=shape, num_steps=num_steps, spacing=spacing, mean_type=mean_type,
        var_type=var_type, clip_denoised=bool(clip_denoised),
    )


@partial(
    jax.jit,
    static_argnames=(
        "shape", "num_steps", "spacing", "mean_type", "var_type", "clip_denoised"
    ),
)
def _dpm_solver_pp_sample_loop(
    schedule, model_fn, x_T, key, *, shape, num_steps, spacing, mean_type, var_type,
    clip_denoised,
):
    batch = shape[0]
    x = _common.draw_x_T(x_T, key, shape, schedule.num_timesteps)
    grid = dpm_solver_timesteps(schedule, num_steps, spacing=spacing)
    minus_one = jnp.full((1,), -1, jnp.int32)
    t_next = jnp.concatenate([grid[1:], minus_one])
    t_prev = jnp.concatenate([grid[:1], grid[:-1]])  # unused at the first step
    second_order = jnp.arange(num_steps) > 0

    def step(carry, inputs):
        x, x0_prev = carry
        t_s, t_next_s, t_prev_s, second = inputs
        t = _common.full_t(t_s, batch)
        x0 = gaussian.p_mean_variance(
            schedule, model_fn(x, t), x, t,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        ).pred_xstart
        x = _update(
            schedule, x, t, _common.full_t(t_next_s, batch), x0, x0_prev,
            _common.full_t(t_prev_s, batch), second,
        )
        return (x, x0), None

    inputs = (grid, t_next, t_prev, second_order)
    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), inputs)
    return {"sample": x}
