"""Sampling with a subset of the steps (improved DDPM, Nichol & Dhariwal 2021, Sec. 4).

A model trained on T steps can sample with any increasing subsequence S of its steps: the
respaced chain keeps the alpha-bars of S and recomputes its betas from them,
beta_i = 1 - abar_{S_i} / abar_{S_{i-1}} (abar before the first kept step is 1), so the
marginals q(x_{S_i} | x_0) are unchanged. The network is still called with the ORIGINAL
step labels, through ``timestep_map``.

    spaced_schedule, spaced_model = respace(schedule, model_fn, "50")
    out = ddim_sample_loop(spaced_schedule, spaced_model, shape, key=key, ...)
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.likelihood import as_model_fn
from diffusion_jax.schedules import Schedule

__all__ = ["respace", "respace_schedule", "respaced_model_fn", "space_timesteps"]

_SPEC_FORMS = (
    "'N' (N evenly spaced steps, e.g. '250'), 'N1,N2,...' (the steps cut into equal "
    "sections, N_i evenly spaced steps in section i, e.g. '10,15,20'), or 'ddimN' (DDIM's "
    "integer stride 0, s, 2s, ... with exactly N steps, e.g. 'ddim50')"
)


def space_timesteps(num_timesteps: int, spec: str | Sequence[int]) -> tuple[int, ...]:
    """The steps to keep, as improved DDPM's ``space_timesteps`` (its Sec. 4, and code).

    Args:
      num_timesteps: T of the original schedule.
      spec: a string ``'N'``, ``'N1,N2,...'`` or ``'ddimN'``, or a sequence of section
        counts. The T steps are cut into len(counts) sections of equal size (the first
        T % len(counts) one step longer); section i keeps counts[i] steps evenly spaced
        from its first to its last step (rounded). ``'ddimN'`` keeps range(0, T, s) for
        the smallest integer stride s giving exactly N steps (DDIM's "uniform" schedule).
        E.g. T = 300 and '10,15,20': 10 steps from the first 100, 15 from the next 100,
        20 from the last 100.

    Returns:
      sorted tuple of distinct 0-based steps in [0, T).

    Raises:
      ValueError: an unknown spec (listing the valid forms), more steps than a section
        (or T) holds, no integer stride for 'ddimN', or counts that are negative or
        all zero.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps}.")
    if isinstance(spec, str) and spec.startswith("ddim"):
        return _ddim_stride(num_timesteps, spec)
    counts = _section_counts(spec)
    if sum(counts) > num_timesteps:
        raise ValueError(
            f"Cannot take {sum(counts)} steps (spec {spec!r}) from a schedule of "
            f"{num_timesteps} steps."
        )
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"Section {i} of spec {spec!r} has {size} of the {num_timesteps} steps; "
                f"it cannot hold {count}."
            )
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            # Accumulated, not j * stride, and Python's round: improved DDPM's exact steps.
            steps.append(start + round(position))
            position += stride
        start += size
    return tuple(sorted(set(steps)))


def _section_counts(spec) -> list[int]:
    if isinstance(spec, str):
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"Unknown respacing spec {spec!r}; valid forms are {_SPEC_FORMS}."
            ) from None
    else:
        try:
            counts = [int(c) for c in spec]
        except (TypeError, ValueError):
            raise ValueError(
                f"Unknown respacing spec {spec!r}; valid forms are {_SPEC_FORMS}, or a "
                "sequence of ints."
            ) from None
    if not counts or min(counts) < 0 or sum(counts) == 0:
        raise ValueError(
            f"Respacing spec {spec!r} must give non-negative section counts with a "
            "positive total."
        )
    return counts


def _ddim_stride(num_timesteps: int, spec: str) -> tuple[int, ...]:
    try:
        count = int(spec[len("ddim"):])
    except ValueError:
        raise ValueError(
            f"Unknown respacing spec {spec!r}; valid forms are {_SPEC_FORMS}."
        ) from None
    if not 1 <= count <= num_timesteps:
        raise ValueError(
            f"Spec {spec!r} asks for {count} steps; a schedule of {num_timesteps} steps "
            f"allows 1 to {num_timesteps}."
        )
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == count:
            return tuple(range(0, num_timesteps, stride))
    raise ValueError(
        f"No integer stride gives exactly {count} steps out of {num_timesteps} (spec "
        f"{spec!r}); use the spec '{count}' (evenly spaced, rounded) instead."
    )


def respace_schedule(
    schedule: Schedule, use_timesteps: Iterable[int]
) -> tuple[Schedule, jax.Array]:
    """The schedule of a subset of the steps (improved DDPM, Sec. 4; its ``SpacedDiffusion``).

    beta_i = 1 - abar_{S_i} / abar_{S_{i-1}} for the kept steps S (sorted), with
    abar_{S_{-1}} = 1; computed in float64 from the schedule's betas, so the kept
    alpha-bars are those of the original schedule. Needs a concrete schedule (not traced).

    Args:
      schedule: the original schedule (T steps).
      use_timesteps: distinct 0-based steps in [0, T) (e.g. from `space_timesteps`).

    Returns:
      ``(spaced_schedule, timestep_map)``: a `Schedule` of len(S) steps, and an int32
      array (len(S),) with timestep_map[i] = S_i, the original label of new step i.
    """
    if isinstance(schedule.betas, jax.core.Tracer):
        raise ValueError("respace_schedule needs a concrete schedule, not one traced by jit.")
    num_timesteps = schedule.num_timesteps
    steps = sorted(int(s) for s in use_timesteps)
    if not steps or len(set(steps)) != len(steps) or steps[0] < 0 or steps[-1] >= num_timesteps:
        raise ValueError(
            f"use_timesteps must be distinct steps in [0, {num_timesteps}), at least one; "
            f"got {steps}."
        )
    betas = np.asarray(schedule.betas, np.float64)
    log_abar = np.cumsum(np.log1p(-betas))
    kept = log_abar[steps]
    log_ratio = kept - np.concatenate([[0.0], kept[:-1]])
    new_betas = -np.expm1(log_ratio)
    return Schedule.from_betas(new_betas), jnp.asarray(steps, jnp.int32)


def _call_spaced(model_fn, timestep_map, x_t, t):
    return model_fn(x_t, timestep_map[t])


def respaced_model_fn(model_fn: Callable, timestep_map) -> Partial:
    """``model_fn`` called with the original step labels: ``model_fn(x_t, timestep_map[t])``.

    A `jax.tree_util.Partial` (its parameters and the map stay traced under ``jit``).
    """
    return Partial(_call_spaced, as_model_fn(model_fn), jnp.asarray(timestep_map, jnp.int32))


def respace(
    schedule: Schedule, model_fn: Callable, spec: str | Sequence[int]
) -> tuple[Schedule, Partial]:
    """`space_timesteps` + `respace_schedule` + `respaced_model_fn` in one call.

    Returns:
      ``(spaced_schedule, spaced_model_fn)``, to pass to any sampler.
    """
    steps = space_timesteps(schedule.num_timesteps, spec)
    spaced_schedule, timestep_map = respace_schedule(schedule, steps)
    return spaced_schedule, respaced_model_fn(model_fn, timestep_map)
