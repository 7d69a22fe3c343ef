"""Samplers: ancestral, DDIM, respacing, DPM-Solver++ and the 2015 multiplying distributions.

Every loop is one ``lax.scan`` under one ``jit`` and takes ``model_fn(x_t, t) -> output``
(the contract of `likelihood.calc_bpd_loop`: pass a `jax.tree_util.Partial` so the
parameters are traced and new parameters reuse the compiled loop), a `Schedule`, the
sample ``shape`` and a ``key`` (keyword). One-step functions take the model OUTPUT.

- `ancestral`: `p_sample`, `p_sample_loop` (DDPM Algorithm 2), with inpainting (``mask``,
  ``known``) and a smooth r(x) (``log_r_fn``) from Sohl-Dickstein et al. 2015, Sec. 2.5.
- `ddim`: `ddim_sample`, `ddim_sample_loop`, `ddim_reverse_sample`,
  `ddim_reverse_sample_loop` (Song et al. 2021).
- `respace`: `space_timesteps`, `respace_schedule`, `respaced_model_fn`, `respace`
  (improved DDPM, Sec. 4): sample with a subset of the steps.
- `dpm_solver`: `dpm_solver_pp_sample_loop` (DPM-Solver++(2M), Lu et al. 2022).
- `pc`: `pc_sample` (predictor-corrector, Song et al. 2021), `ode_sample` (the
  probability-flow ODE), `predictor_step`, `corrector_step`, for score SDEs.
- `sample`: one entry point choosing the sampler and the number of steps by name.
"""

from __future__ import annotations

from typing import Callable, Sequence

from diffusion_jax.gaussian import check_choice
from diffusion_jax.sampling.ancestral import p_sample, p_sample_loop
from diffusion_jax.sampling.ddim import (
    ddim_reverse_sample,
    ddim_reverse_sample_loop,
    ddim_sample,
    ddim_sample_loop,
)
from diffusion_jax.sampling.dpm_solver import (
    SPACINGS,
    dpm_solver_pp_sample_loop,
    dpm_solver_pp_step,
    dpm_solver_timesteps,
)
from diffusion_jax.sampling.pc import (
    CORRECTORS,
    PREDICTORS,
    corrector_step,
    ode_sample,
    pc_sample,
    predictor_step,
)
from diffusion_jax.sampling.respace import (
    respace,
    respace_schedule,
    respaced_model_fn,
    space_timesteps,
)
from diffusion_jax.schedules import Schedule

__all__ = [
    "CORRECTORS",
    "PREDICTORS",
    "SAMPLERS",
    "corrector_step",
    "ode_sample",
    "pc_sample",
    "predictor_step",
    "SPACINGS",
    "ddim_reverse_sample",
    "ddim_reverse_sample_loop",
    "ddim_sample",
    "ddim_sample_loop",
    "dpm_solver_pp_sample_loop",
    "dpm_solver_pp_step",
    "dpm_solver_timesteps",
    "p_sample",
    "p_sample_loop",
    "respace",
    "respace_schedule",
    "respaced_model_fn",
    "sample",
    "space_timesteps",
]

SAMPLERS = ("ancestral", "ddim", "dpm_solver++")


def sample(
    schedule: Schedule,
    model_fn: Callable,
    shape: Sequence[int],
    *,
    sampler: str,
    key,
    num_steps: int | str | None = None,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
    eta: float = 0.0,
    spacing: str = "logsnr",
) -> dict:
    """Samples x_0 of ``shape`` with a named sampler; returns the samples, an array (shape).

    Args:
      sampler: ``'ancestral'`` (DDPM Algorithm 2), ``'ddim'`` (Song et al. 2021, with
        ``eta``) or ``'dpm_solver++'`` (Lu et al. 2022, 2M).
      num_steps: model evaluations. None: every step of the schedule (ancestral, DDIM;
        required for DPM-Solver++). For ancestral / DDIM, an int N or a respacing spec
        string (`space_timesteps`: 'N', 'N1,N2,...', 'ddimN') respaces the schedule.
      spacing: DPM-Solver++'s grid (`dpm_solver_timesteps`: 'logsnr', 'time_uniform' or
        'time_quadratic'); only with sampler 'dpm_solver++'.
      Other arguments: see the loop of each sampler.
    """
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("spacing", spacing, SPACINGS)
    kw = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised, key=key)
    if sampler == "dpm_solver++":
        if not isinstance(num_steps, int) or isinstance(num_steps, bool):
            raise ValueError(
                f"sampler 'dpm_solver++' needs num_steps, a positive int; got {num_steps!r}."
            )
        out = dpm_solver_pp_sample_loop(
            schedule, model_fn, shape, num_steps=num_steps, spacing=spacing, **kw
        )
        return out["sample"]
    if num_steps is not None:
        steps = space_timesteps(schedule.num_timesteps, str(num_steps))
        if len(steps) < schedule.num_timesteps:  # every step kept: nothing to respace
            schedule, timestep_map = respace_schedule(schedule, steps)
            model_fn = respaced_model_fn(model_fn, timestep_map)
    if sampler == "ddim":
        return ddim_sample_loop(schedule, model_fn, shape, eta=eta, **kw)["sample"]
    return p_sample_loop(schedule, model_fn, shape, **kw)["sample"]
