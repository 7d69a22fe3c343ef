r"""A real DiT train step on whatever accelerator JAX finds: the check an accelerator run
should include for the transformer backbone.

  python experiments/dit_step.py                       # DiT-B/2, batch 32, 5 steps
  python experiments/dit_step.py --size=DiT-XL/2 --fsdp=8 --batch=64

Materialises DiT-``--size`` in the paper's 256x256 setting (32x32x4 latents, 1000
classes, learned sigma, bfloat16 compute with float32 parameters), shards it over a
(data, fsdp) mesh of every local device, and runs ``--steps`` DDPM train steps (the
hybrid loss of improved DDPM, as the paper) on fixed random latents. Prints one JSON
object: the device, compile seconds, the median step seconds and images/s, the losses
(checked finite), the device's peak bytes in use where the backend reports them (GPU,
TPU) and XLA's memory analysis of the step. Exits 1 if a loss is not finite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax.data.pipeline import DataInfo  # noqa: E402
from diffusion_jax.models.dit import dit_size_kwargs  # noqa: E402
from diffusion_jax.training import mesh as mesh_lib, objectives  # noqa: E402
from diffusion_jax.training import sharding as sharding_lib  # noqa: E402
from diffusion_jax.training import step as step_lib  # noqa: E402
from diffusion_jax.training.config import default_config  # noqa: E402
from diffusion_jax.training.state import TrainState, make_optimizer  # noqa: E402


def dit_latent_config(size: str, *, fsdp: int = 1, dit_overrides: dict | None = None):
    """(config, DataInfo) of DiT-``size`` on 32x32x4 latents with 1000 classes."""
    config = default_config()
    config.model.name, config.model.dtype, config.model.num_classes = "dit", "bfloat16", 1000
    config.model.dit.update(dit_size_kwargs(size) | (dit_overrides or {}))
    config.diffusion.var_type, config.diffusion.loss_type = "learned_range", "hybrid"
    config.optim.lr, config.optim.warmup_steps, config.optim.grad_clip = 1e-4, 0, 0.0
    config.mesh.fsdp = fsdp
    return config, DataInfo("latents_256", "image", (32, 32, 4), None, 1000)


def run(config, info, *, global_batch: int, steps: int) -> dict:
    """Runs ``steps`` train steps; returns the report of the module docstring."""
    mesh = mesh_lib.mesh_from_config(config)
    mesh_lib.check_batch_size(global_batch, device_count=mesh.size, process_count=1, mesh=mesh)
    objective = objectives.create_objective(config, info)
    optimizer = make_optimizer(config.optim)
    create = lambda key: TrainState.create(objective.init(key), optimizer)  # noqa: E731
    shardings = sharding_lib.state_shardings(jax.eval_shape(create, jax.random.key(0)), mesh,
                                             min_size=config.mesh.min_shard_size)
    state = jax.jit(create, out_shardings=shardings)(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch_sharding = mesh_lib.data_sharded(mesh)
    batch = mesh_lib.global_batch({
        "image": rng.standard_normal((global_batch, *info.shape), np.float32),
        "label": rng.integers(0, 1000, global_batch).astype(np.int32),
    }, batch_sharding)
    step = jax.jit(step_lib.make_train_step(loss_fn=objective.loss, optimizer=optimizer,
                                            root_key=jax.random.key(1), ema_decay=0.9999),
                   in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # blocks until the step is done
        times.append(time.perf_counter() - start)
    stats = compiled.memory_analysis()
    device_stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)() or {}
    step_s = statistics.median(times[1:] or times)
    return {
        "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "mesh": dict(mesh.shape), "global_batch": global_batch,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "compile_s": round(compile_s, 2), "step_s": step_s,
        "images_per_s": global_batch / step_s, "losses": losses,
        "finite": bool(np.all(np.isfinite(losses))),
        "peak_bytes_in_use": device_stats.get("peak_bytes_in_use"),
        "xla_temp_bytes": None if stats is None else int(stats.temp_size_in_bytes),
        "xla_argument_bytes": None if stats is None else int(stats.argument_size_in_bytes),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="DiT-B/2")
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        config, info = dit_latent_config(args.size, fsdp=args.fsdp)
    except ValueError as e:
        parser.error(str(e))
    report = run(config, info, global_batch=args.batch, steps=args.steps)
    print(json.dumps(report, indent=2))
    return 0 if report["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
