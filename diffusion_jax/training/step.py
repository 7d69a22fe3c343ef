"""The pure train step: ``train_step(state, batch) -> (state, metrics)``.

Randomness comes from ``fold_in(root_key, step)`` and is drawn for the global batch, so
the result does not depend on how the batch is split across devices or processes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.training.state import TrainState, ema_update

__all__ = ["NAN_POLICIES", "make_train_step"]

NAN_POLICIES = ("stop", "skip")


def make_train_step(
    *,
    loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]],
    optimizer: optax.GradientTransformation,
    root_key: jax.Array,
    ema_decay: float,
    ema_warmup: bool = False,
    nan_policy: str = "stop",
) -> Callable[[TrainState, dict], tuple[TrainState, dict[str, Any]]]:
    """Builds the pure train step for `jax.jit`.

    One step: the loss ``loss_fn(params, batch, fold_in(root_key, step))`` (see
    `objectives.Objective`), its gradient, the optimizer update and the EMA of the
    parameters (decay ``ema_decay``, or min(decay, (1+n)/(10+n)) with ``ema_warmup``).
    With ``nan_policy='skip'`` a step whose loss or gradient is not finite leaves the
    state unchanged but for ``step`` and ``skipped_steps``.

    Metrics (device scalars): ``loss``, ``grad_norm``, the objective's own metrics, and
    ``finite``, 1.0 when the loss and the gradient norm were finite.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(
            f"Unknown nan_policy {nan_policy!r}; valid values are {list(NAN_POLICIES)}."
        )

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(root_key, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, key
        )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay
        if ema_warmup:
            n = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        ema_params = ema_update(state.ema_params, params, decay)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        if nan_policy == "skip":
            kept = state.replace(step=state.step + 1, skipped_steps=state.skipped_steps + 1)
            new_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), new_state, kept
            )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        return new_state, metrics

    return train_step
