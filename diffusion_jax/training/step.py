"""The pure train step: ``train_step(state, batch) -> (state, metrics)``.

Randomness comes from ``fold_in(root_key, step)`` and is drawn for the global batch, so
the result does not depend on how the batch is split across devices or processes.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffusion_jax import losses
from diffusion_jax.schedules import Schedule
from diffusion_jax.training.state import TrainState, ema_update

__all__ = ["NAN_POLICIES", "data_key", "make_train_step", "model_fn_for"]

NAN_POLICIES = ("stop", "skip")


def data_key(batch: dict) -> str:
    """The name of the data array in a batch: ``image`` (NHWC) or ``x`` (B, D)."""
    for name in ("image", "x"):
        if name in batch:
            return name
    raise ValueError(f"A batch must hold 'image' or 'x'; got keys {sorted(batch)}.")


def model_fn_for(
    model: nn.Module, params, *, labels=None, train: bool = False, dropout_key=None
) -> Callable:
    """``model_fn(x_t, t)`` for the math functions, from a Flax module and its params."""
    rngs = {"dropout": dropout_key} if train else None

    def model_fn(x_t, t):
        args = (x_t, t) if labels is None else (x_t, t, labels)
        return model.apply({"params": params}, *args, train=train, rngs=rngs)

    return model_fn


def make_train_step(
    *,
    model: nn.Module,
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    root_key: jax.Array,
    mean_type: str,
    var_type: str,
    loss_type: str,
    ema_decay: float,
    ema_warmup: bool = False,
    class_conditional: bool = False,
    nan_policy: str = "stop",
    decoder_type: str = "discretized",
) -> Callable[[TrainState, dict], tuple[TrainState, dict[str, Any]]]:
    """Builds the pure train step for `jax.jit`.

    One step: t ~ U{0..T-1} and the noise from ``fold_in(root_key, step)``, the loss of
    `losses.training_losses` averaged over the batch, its gradient, the optimizer update
    and the EMA of the parameters (decay ``ema_decay``, or min(decay, (1+n)/(10+n)) with
    ``ema_warmup``). With ``nan_policy='skip'`` a step whose loss or gradient is not
    finite leaves the state unchanged but for ``step`` and ``skipped_steps``.

    Metrics (device scalars): ``loss``, ``mse``, ``vb`` (bits/dim) and ``grad_norm``,
    batch means; ``finite`` is 1.0 when the loss and the gradient norm were finite.
    """
    losses.check_loss_config(mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"Unknown nan_policy {nan_policy!r}; valid values are {list(NAN_POLICIES)}.")
    num_timesteps = schedule.num_timesteps

    def train_step(state: TrainState, batch: dict):
        x_start = batch[data_key(batch)]
        labels = batch.get("label") if class_conditional else None
        key = jax.random.fold_in(root_key, state.step)
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        t = jax.random.randint(t_key, (x_start.shape[0],), 0, num_timesteps, dtype=jnp.int32)

        def loss_fn(params):
            model_fn = model_fn_for(
                model, params, labels=labels, train=True, dropout_key=dropout_key
            )
            terms = losses.training_losses(
                schedule, model_fn, x_start, t, key=noise_key, mean_type=mean_type,
                var_type=var_type, loss_type=loss_type, decoder_type=decoder_type,
            )
            return jnp.mean(terms["loss"]), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
        metrics = {
            "loss": loss,
            "mse": jnp.mean(terms["mse"]),
            "vb": jnp.mean(terms["vb"]),
            "grad_norm": grad_norm,
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    return train_step
