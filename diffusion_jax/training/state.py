"""The train state and the optimizer.

Everything a run needs to resume exactly is in `TrainState`: the step (which also fixes
the data position and every random stream, all functions of (seed, step)), parameters,
their EMA, the optimizer state and the count of skipped non-finite updates.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "ema_update", "make_optimizer", "learning_rate_schedule"]


@flax.struct.dataclass
class TrainState:
    """A pytree of arrays: ``step`` (int32 scalar), ``params``, ``ema_params``,
    ``opt_state`` and ``skipped_steps`` (int32 scalar: updates dropped by the
    ``nan_policy='skip'`` option)."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    skipped_steps: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=optimizer.init(params),
            skipped_steps=jnp.zeros((), jnp.int32),
        )


def learning_rate_schedule(optim_config) -> optax.Schedule:
    """The learning rate per step: DDPM's linear warmup to ``lr``, then constant.

    ``lr_schedule='cosine'`` (optional field; default 'constant') decays it after the
    warmup along a half cosine to ``lr * final_lr_fraction`` at step ``decay_steps`` and
    holds it there. Fields checked by `setup.validate_config`.
    """
    lr, warmup = float(optim_config.lr), int(optim_config.warmup_steps)
    kind = optim_config.get("lr_schedule", "constant")
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(
            lr, int(optim_config.decay_steps) - warmup, float(optim_config.final_lr_fraction)
        )
    else:
        decay = optax.constant_schedule(lr)
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(optim_config) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then Adam with linear warmup (DDPM, Appendix B).

    Config fields: ``lr``, ``warmup_steps``, ``grad_clip`` (<= 0 disables it), ``beta1``,
    ``beta2``, ``eps``, ``weight_decay`` (0 = Adam; > 0 = AdamW).
    """
    parts = []
    if optim_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
    schedule = learning_rate_schedule(optim_config)
    kwargs = dict(b1=optim_config.beta1, b2=optim_config.beta2, eps=optim_config.eps)
    if optim_config.weight_decay > 0:
        parts.append(optax.adamw(schedule, weight_decay=optim_config.weight_decay, **kwargs))
    else:
        parts.append(optax.adam(schedule, **kwargs))
    return optax.chain(*parts)


def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
