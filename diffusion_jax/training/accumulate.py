"""Per-step metrics summed on the device by one compiled function, read at log steps.

The training loop calls `accumulate` once per step (one dispatch, no host sync) and
`read_means` / `first_nonfinite` only at log and checkpoint steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["accumulate", "first_nonfinite", "init_accumulator", "read_means"]


def init_accumulator(metrics_shapes: dict) -> dict:
    """Zero sums for metrics shaped like ``metrics_shapes`` (a dict of scalars), no step
    seen, and no non-finite step recorded (``bad_step`` = -1)."""
    # NumPy leaves: jit places them like any host input, on one process or many.
    zeros = {k: np.zeros((), np.float32) for k in metrics_shapes}
    return {"sums": zeros, "count": np.zeros((), np.int32),
            "bad_step": np.full((), -1, np.int32), "bad_metrics": dict(zeros)}


@jax.jit
def accumulate(acc: dict, metrics: dict, step) -> dict:
    """Adds one step's metrics: sums over finite steps only (``metrics['finite']`` = 1;
    with nan_policy='skip' the others are dropped) and the first non-finite step (0-based
    ``step``) with its metrics."""
    ok = metrics["finite"] > 0
    sums = {k: acc["sums"][k] + jnp.where(ok, metrics[k].astype(jnp.float32), 0.0)
            for k in acc["sums"]}
    take = (~ok) & (acc["bad_step"] < 0)
    bad_metrics = {k: jnp.where(take, metrics[k].astype(jnp.float32), acc["bad_metrics"][k])
                   for k in acc["bad_metrics"]}
    return {"sums": sums, "count": acc["count"] + 1,
            "bad_step": jnp.where(take, jnp.asarray(step, jnp.int32), acc["bad_step"]),
            "bad_metrics": bad_metrics}


def first_nonfinite(acc: dict) -> tuple[int, dict[str, float]] | None:
    """(0-based step, its metrics) of the first non-finite step since the reset, or None."""
    bad_step = int(jax.device_get(acc["bad_step"]))
    if bad_step < 0:
        return None
    return bad_step, {k: float(v) for k, v in jax.device_get(acc["bad_metrics"]).items()}


def read_means(acc: dict) -> dict[str, float]:
    """Means over the finite steps since the reset, and ``nonfinite_steps``."""
    host = jax.device_get({"sums": acc["sums"], "count": acc["count"]})
    finite_steps = float(host["sums"]["finite"])
    out = {k: float(v) / max(finite_steps, 1.0) for k, v in host["sums"].items()
           if k != "finite"}
    out["nonfinite_steps"] = float(host["count"]) - finite_steps
    return out
