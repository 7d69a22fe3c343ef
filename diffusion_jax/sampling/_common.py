"""Helpers shared by the samplers: argument checks, the initial state, recorded steps."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.gaussian import MEAN_TYPES, VAR_TYPES, check_choice
from diffusion_jax.likelihood import as_model_fn

__all__ = [
    "as_model_fn",
    "check_eta",
    "check_shape",
    "check_types",
    "full_t",
    "initial_state",
    "record",
    "record_slots",
    "wrap_fn",
]


def check_types(mean_type: str, var_type: str) -> None:
    """Raises ValueError for an unknown mean_type or var_type (listing the valid ones)."""
    check_choice("mean_type", mean_type, MEAN_TYPES)
    check_choice("var_type", var_type, VAR_TYPES)


def wrap_fn(name: str, fn: Callable | None) -> Partial | None:
    """None, or ``fn`` as a `jax.tree_util.Partial` (so ``jit`` can take it)."""
    if fn is None or isinstance(fn, Partial):
        return fn
    if not callable(fn):
        raise ValueError(f"{name} must be callable; got {fn!r}.")
    return Partial(fn)


def check_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints with a batch axis first."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of ints (B, ...); got {shape!r}.") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(
            f"shape must be (B, ..., C) with at least two positive sizes; got {shape}."
        )
    return shape


def initial_state(shape, x_T, key, *, key_needed: bool):
    """Checks ``x_T`` (or that a key can draw it) and returns (shape, x_T or None, key)."""
    shape = check_shape(shape)
    if x_T is not None:
        x_T = jnp.asarray(x_T)
        if x_T.shape != shape:
            raise ValueError(f"x_T must have shape {shape}; got x_T with shape {x_T.shape}.")
    if key is None and (x_T is None or key_needed):
        raise ValueError(
            "Pass `key` (a PRNG key): it draws x_T when x_T is not given, and the noise of "
            "every stochastic step."
        )
    return shape, x_T, key


def draw_x_T(x_T, key, shape, num_timesteps: int):
    """Inside jit: ``x_T`` if given, else N(0, I) drawn with ``fold_in(key, T)``.

    Steps t in [0, T) use ``fold_in(key, t)``; the start is "step T".
    """
    if x_T is not None:
        return x_T
    return jax.random.normal(jax.random.fold_in(key, num_timesteps), shape, jnp.float32)


def check_eta(eta) -> None:
    """eta (Song et al. 2021, Eq. 16) must be >= 0; checked when concrete."""
    if isinstance(eta, jax.core.Tracer):
        return
    value = float(np.asarray(eta))
    if not np.isfinite(value) or value < 0.0:
        raise ValueError(f"eta must be a finite number >= 0 (0: DDIM, 1: DDPM); got {value}.")


def record_slots(record_steps: Sequence[int] | None, num_timesteps: int):
    """A table step -> slot in the record buffer (``len(steps)`` = not recorded).

    Returns:
      ``(slots, num_records)``: int32 array (T,) and a Python int.
    """
    if record_steps is None:
        return jnp.zeros((num_timesteps,), jnp.int32), 0
    steps = [int(s) for s in record_steps]
    bad = [s for s in steps if not 0 <= s < num_timesteps]
    if bad or len(set(steps)) != len(steps) or not steps:
        raise ValueError(
            f"record_steps must be distinct steps in [0, {num_timesteps}) (0-based, the "
            f"schedule's own steps); got {steps}."
        )
    slots = np.full((num_timesteps,), len(steps), np.int32)
    slots[steps] = np.arange(len(steps), dtype=np.int32)
    return jnp.asarray(slots), len(steps)


def record(buffer, slot, value):
    """``buffer[slot] = value``; a slot past the end (a step not recorded) is dropped."""
    if buffer.shape[0] == 0:
        return buffer
    return buffer.at[slot].set(value.astype(buffer.dtype), mode="drop")


def full_t(t_scalar, batch: int):
    """The step ``t_scalar`` as an int32 array of shape (B,)."""
    return jnp.full((batch,), t_scalar, dtype=jnp.int32)
