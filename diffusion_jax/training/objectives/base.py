"""What an objective is: the `Objective` bundle and helpers every family shares.

An `Objective` bundles pure functions built from the config:

- ``init(key) -> params``: the trainable parameters (any pytree);
- ``loss(params, batch, key) -> (loss, metrics)``: the scalar to minimise for one batch
  and a dict of scalar metrics (batch means), with all randomness drawn from ``key``;
- ``sample(params, key, num) -> samples`` (optional): ``num`` samples for the grids;
- ``evaluate(params, batch, key) -> dict`` (optional): per-example evaluation values of
  shape (B,) for ``--mode=eval`` (bits/dim of the bound, importance-weighted estimates).

The train step (`step.make_train_step`) only sees these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

__all__ = ["Objective", "data_key", "model_fn_for"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """See the module docstring."""

    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
    sample: Callable[[Any, jax.Array, int], jax.Array] | None = None
    evaluate: Callable[[Any, dict, jax.Array], dict] | None = None


def data_key(batch: dict) -> str:
    """The name of the data array in a batch: ``image`` (NHWC) or ``x`` (B, D)."""
    for name in ("image", "x"):
        if name in batch:
            return name
    raise ValueError(f"A batch must hold 'image' or 'x'; got keys {sorted(batch)}.")


def model_fn_for(model, params, *, labels=None, train: bool = False, dropout_key=None):
    """``model_fn(x_t, t)`` for the math functions, from a Flax module and its params."""
    rngs = {"dropout": dropout_key} if train else None

    def model_fn(x_t, t):
        args = (x_t, t) if labels is None else (x_t, t, labels)
        return model.apply({"params": params}, *args, train=train, rngs=rngs)

    return model_fn
