"""``--mode=sample`` and ``--mode=eval``: use the EMA parameters of a workdir's checkpoint.

Both restore the latest checkpoint read-only, split their batches over every device of
every process, log progress with an ETA, and never overwrite an earlier output.
"""

from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import data
from diffusion_jax.training import checkpoint, mesh as mesh_lib, objectives, writer
from diffusion_jax.training.setup import validate_config
from diffusion_jax.training.state import TrainState, make_optimizer

__all__ = ["evaluate_checkpoint", "restore_for_inference", "sample_from_checkpoint"]


def restore_for_inference(config: ml_collections.ConfigDict, workdir):
    """(state, objective, info, mesh) from the latest checkpoint in ``workdir``.

    Raises:
      FileNotFoundError: no checkpoint in ``workdir/checkpoints``.
      IncompatibleCheckpointError: the checkpoint's shapes do not match the config.
    """
    validate_config(config)
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if not ckpt_dir.exists():
        raise FileNotFoundError(
            f"No checkpoint in {ckpt_dir}: --mode=sample and --mode=eval use the latest "
            "checkpoint of a trained workdir. Train first with --mode=train, or pass the "
            "--workdir of a trained run."
        )
    mesh = mesh_lib.make_mesh()
    replicated = mesh_lib.replicated(mesh)
    info = data.dataset_info(config.data)
    objective = objectives.create_objective(config, info)
    optimizer = make_optimizer(config.optim)
    template = jax.jit(
        lambda key: TrainState.create(objective.init(key), optimizer), out_shardings=replicated
    )(jax.random.key(config.seed))
    ckpt = checkpoint.Checkpointer(ckpt_dir, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"No complete checkpoint in {ckpt_dir}. Train first with --mode=train."
            )
        state = ckpt.restore(template)
    finally:
        ckpt.close()
    logging.info("Restored step %d from %s.", int(state.step), ckpt_dir)
    return state, objective, info, mesh


def _unused_path(path: epath.Path) -> epath.Path:
    """``path``, or ``name_1.ext``, ``name_2.ext``... if it exists: nothing is overwritten."""
    if not path.exists():
        return path
    for i in range(1, 10_000):
        candidate = path.parent / f"{path.stem}_{i}{path.suffix}"
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"Too many outputs named like {path}.")


class _Progress:
    def __init__(self, what: str, total: int):
        self.what, self.total, self.start = what, total, time.time()

    def update(self, done: int):
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        logging.info("%s: %d/%d (%.1f/s, ETA %.0f s)", self.what, done, self.total,
                     done / max(elapsed, 1e-9), eta)


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir) -> epath.Path | None:
    """Draws ``config.sample.num_samples`` samples from the EMA parameters.

    Sampler and steps come from ``config.sample`` (``sampler``, ``num_steps``); batches of
    ``config.sample.batch_size`` are split over the devices. Process 0 writes
    ``samples/{sampler}_{steps}_step{step}.npz`` (uint8-rounded images in ``images`` and the
    raw floats in ``samples``) and a PNG grid beside it. Returns the .npz path (process 0).
    """
    state, objective, info, mesh = restore_for_inference(config, workdir)
    if objective.sample is None:
        raise ValueError(f"Objective {config.objective!r} has no sampler for {info.kind} data.")
    sharding = mesh_lib.data_sharded(mesh)
    total = config.sample.num_samples
    batch = -(-min(config.sample.batch_size, total) // mesh.size) * mesh.size
    draw = jax.jit(lambda params, key: objective.sample(params, key, batch), out_shardings=sharding)
    key = jax.random.fold_in(jax.random.key(config.seed), int(state.step))
    progress = _Progress("sampling", total)
    chunks, done = [], 0
    while done < total:
        images = draw(state.ema_params, jax.random.fold_in(key, len(chunks)))
        chunks.append(np.asarray(multihost_utils.process_allgather(images, tiled=True)))
        done = min(total, done + batch)
        progress.update(done)
    samples = np.concatenate(chunks)[:total]
    if jax.process_index() != 0:
        return None
    out_dir = epath.Path(workdir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = config.sample.num_steps if config.sample.sampler != "ancestral" else "all"
    stem = f"{config.sample.sampler}_{steps}_step{int(state.step)}"
    if config.sample.get("guidance", 0.0):  # classifier-free guidance: its w in the name
        stem += f"_guidance{config.sample.guidance:g}"
    npz_path = _unused_path(out_dir / f"{stem}.npz")
    payload = {"samples": samples.astype(np.float32)}
    if info.kind == "image":
        payload["images"] = np.clip(np.round((samples + 1.0) * 127.5), 0, 255).astype(np.uint8)
    with npz_path.open("wb") as f:
        np.savez(f, **payload)
    if info.kind == "image":
        grid = writer.image_grid(samples[:256], upscale=config.sample.grid_upscale)
        from PIL import Image

        with _unused_path(npz_path.parent / f"{npz_path.stem}.png").open("wb") as f:
            Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format="PNG")
    logging.info("Wrote %d samples to %s.", total, npz_path)
    return npz_path


def _eval_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.split = config.eval.split
    data_config.random_flip = False
    return data_config


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir) -> dict:
    """Test-set bits/dim (and, with ``eval.iw_samples`` > 0, the importance-weighted
    estimate) of the EMA parameters, with standard errors over examples.

    Reads ``eval.num_examples`` examples (rounded down to whole global batches of
    ``eval.batch_size``) from ``eval.split``, each once (the first epoch of the data
    order), without flips. Appends one line to ``metrics.jsonl`` (keys ``eval/...``) and
    returns the dict.
    """
    state, objective, info, mesh = restore_for_inference(config, workdir)
    if objective.evaluate is None:
        raise ValueError(f"Objective {config.objective!r} has no evaluation.")
    global_batch = config.eval.batch_size
    per_process_batch = mesh_lib.check_batch_size(
        global_batch, device_count=jax.device_count(), process_count=jax.process_count()
    )
    data_config = _eval_data_config(config)
    eval_info = data.dataset_info(data_config)
    available = eval_info.num_examples or config.eval.num_examples
    num_batches = min(config.eval.num_examples, available) // global_batch
    if num_batches < 1:
        raise ValueError(
            f"eval.num_examples = {config.eval.num_examples} (split {config.eval.split!r} has "
            f"{available}) is less than one global batch of eval.batch_size = {global_batch}."
        )
    sharding = mesh_lib.data_sharded(mesh)
    batch_fn = data.make_batch_fn(
        data_config, per_process_batch=per_process_batch, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    evaluate = jax.jit(objective.evaluate, out_shardings=sharding)
    key = jax.random.fold_in(jax.random.key(config.seed), 1_000_003)
    progress = _Progress("evaluating", num_batches * global_batch)
    values: dict[str, list] = {}
    for i in range(num_batches):
        batch = mesh_lib.global_batch(batch_fn(i), sharding)
        out = evaluate(state.ema_params, batch, jax.random.fold_in(key, i))
        for k, v in out.items():
            values.setdefault(k, []).append(np.asarray(multihost_utils.process_allgather(v, tiled=True)))
        progress.update((i + 1) * global_batch)
    results = {"step": int(state.step), "eval/num_examples": num_batches * global_batch}
    for k, chunks in values.items():
        v = np.concatenate(chunks).astype(np.float64)
        results[f"eval/{k}"] = float(v.mean())
        results[f"eval/{k}_stderr"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    logging.info("Evaluation: %s", ", ".join(f"{k}={v:.5g}" for k, v in results.items()))
    if jax.process_index() == 0:
        with (epath.Path(workdir) / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(results) + "\n")
    return results
