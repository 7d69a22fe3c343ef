"""The training loop: config -> data + model + schedule -> jitted train step -> checkpoints.

`train_and_evaluate(config, workdir)` is what ``launch.py --mode=train`` calls. It runs
unchanged on one CPU, a multi-GPU host or a multi-host TPU pod: the batch is split over a
mesh of every device, parameters and optimizer state are replicated or (``mesh.fsdp``
> 1) split along the mesh's fsdp axis, and a workdir holding a checkpoint is
resumed from it, at the same step and with the same data order.
"""

from __future__ import annotations

import contextlib
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import data
from diffusion_jax.training import (
    accumulate, checkpoint, mesh as mesh_lib, objectives, preemption, provenance,
    sample_grid, sharding as sharding_lib, step as step_lib, workdir as workdir_lib, writer,
)
from diffusion_jax.training.setup import validate_config
from diffusion_jax.training.state import TrainState, make_optimizer

__all__ = ["NonFiniteLossError", "prepare_workdir", "train_and_evaluate"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN/Inf; the run stopped before saving it."""


def prepare_workdir(workdir) -> epath.Path:
    """Resolves ``workdir`` to an absolute path (local) and checks that it can be written
    (see `workdir.prepare_workdir`)."""
    return workdir_lib.prepare_workdir(workdir, process_index=jax.process_index())


def _check_finite(acc) -> None:
    """Raises NonFiniteLossError naming the first bad step and its metrics."""
    bad = accumulate.first_nonfinite(acc)
    if bad is None:
        return
    bad_step, metrics = bad
    names = ["loss", "grad_norm"] + sorted(set(metrics) - {"loss", "grad_norm", "finite"})
    detail = ", ".join(f"{k}={metrics[k]:.4g}" for k in names)
    raise NonFiniteLossError(
        f"Non-finite loss or gradient at step {bad_step + 1} ({detail}). The run "
        "stopped; the last checkpoint before it is intact. Lower optim.lr, check the "
        "data, or set train.nan_policy='skip' to drop such updates."
    )


def _resume(ckpt: checkpoint.Checkpointer, state: TrainState, config) -> TrainState:
    """The state of the newest readable checkpoint, or ``state`` when there is none.

    Damaged checkpoints are skipped and moved to ``checkpoints_damaged/`` (logged, never
    deleted). If none can be read the run stops, unless train.restart_if_unreadable.
    Every process must arrive at the same step.
    """
    if ckpt.all_steps():
        try:
            state = ckpt.restore(state)
            logging.info("Resumed from step %d.", int(state.step))
        except checkpoint.NoUsableCheckpointError:
            if not config.train.restart_if_unreadable:
                raise
            logging.warning("No checkpoint can be read; starting from step 0 as "
                            "train.restart_if_unreadable allows.")
        if ckpt.damaged_steps:
            ckpt.set_aside(ckpt.damaged_steps)
    if jax.process_count() > 1:
        multihost_utils.assert_equal(
            np.asarray(int(state.step), np.int64),
            "The processes would resume from different steps; check that every process "
            "sees the same checkpoint directory.",
        )
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> TrainState:
    """Trains (or resumes) the model of ``config`` in ``workdir``; returns the final state.

    Writes ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``samples/``,
    ``config.json`` and ``config_history.jsonl`` under ``workdir`` (logs and images from
    process 0 only). A relative ``workdir`` is taken from the current directory.

    Raises:
      ValueError: a bad config or workdir, or a workdir in use by another run.
      checkpoint.CheckpointWriteError: a checkpoint could not be written (the run stops at
        the step after the save that failed).
      NonFiniteLossError: a non-finite loss with ``train.nan_policy='stop'``.
      preemption.Interrupted: Ctrl-C; the current step was saved first.
    """
    validate_config(config)
    workdir = prepare_workdir(workdir)
    with contextlib.ExitStack() as stack:
        # Every close runs, in reverse order, whatever raised: Orbax's and TensorBoard's
        # non-daemon threads must not keep a failed process alive.
        signals = stack.enter_context(preemption.StopSignals())
        stack.enter_context(workdir_lib.lock_workdir(workdir, enabled=jax.process_index() == 0))
        return _train(config, workdir, stack, signals)


def _train(config, workdir, stack: contextlib.ExitStack, signals) -> TrainState:
    process_index, process_count = jax.process_index(), jax.process_count()
    mesh = mesh_lib.mesh_from_config(config)
    replicated, data_sharding = mesh_lib.replicated(mesh), mesh_lib.data_sharded(mesh)
    per_process_batch = mesh_lib.check_batch_size(
        config.train.batch_size, device_count=jax.device_count(), process_count=process_count,
        mesh=mesh,
    )
    info = data.dataset_info(config.data)
    objective = objectives.create_objective(config, info)
    optimizer = make_optimizer(config.optim)
    root_key = jax.random.key(config.seed)
    init_key, train_key, sample_key = jax.random.split(root_key, 3)

    create_state = lambda key: TrainState.create(objective.init(key), optimizer)  # noqa: E731
    # Parameters, EMA and optimizer state split along the mesh's fsdp axis (sharding.py).
    state_sharding = sharding_lib.state_shardings(
        jax.eval_shape(create_state, init_key), mesh, min_size=config.mesh.min_shard_size)
    state = jax.jit(create_state, out_shardings=state_sharding)(init_key)
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints
    )
    stack.callback(ckpt.close)
    state = _resume(ckpt, state, config)
    start_step = int(state.step)
    history = provenance.ConfigHistory(workdir, config, start_step, enabled=process_index == 0)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("Objective %s, model %s with %d parameters; %d devices, %d processes.",
                 config.objective, config.model.name, num_params, jax.device_count(),
                 process_count)

    train_step = jax.jit(
        step_lib.make_train_step(
            loss_fn=objective.loss, optimizer=optimizer, root_key=train_key,
            ema_decay=config.optim.ema_decay, ema_warmup=config.optim.ema_warmup,
            nan_policy=config.train.nan_policy,
        ),
        in_shardings=(state_sharding, data_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
    )
    metric_writer = writer.MetricWriter(workdir, enabled=process_index == 0)
    stack.callback(metric_writer.close)
    grids = None
    if objective.sample is not None and config.train.sample_every:
        grids = sample_grid.SampleGrid(objective, config, sample_key, data_sharding)
    num_steps = config.train.num_steps
    if start_step >= num_steps:
        logging.info("Already at step %d of %d: nothing to train.", start_step, num_steps)
    if signals.reason == "SIGTERM":
        logging.warning("SIGTERM before the first step: nothing new to save; exiting.")
        return state
    if signals.reason == "SIGINT":
        raise preemption.Interrupted(
            f"Interrupted (Ctrl-C) before the first step; nothing was trained or changed "
            f"(the workdir is at step {start_step})."
        )
    data_iter = data.create_data_iterator(
        config.data, per_process_batch=per_process_batch, seed=config.seed,
        start_step=start_step, process_index=process_index, process_count=process_count,
    )
    acc = None
    last_log_time, last_log_step = time.time(), start_step
    data_wait = 0.0  # seconds blocked in next(data_iter) since the last log step
    saved_step = ckpt.latest_step()
    stop_on_nan = config.train.nan_policy == "stop"
    stop, done = None, start_step
    for step in range(start_step, num_steps):
        wait_start = time.perf_counter()
        local_batch = next(data_iter)
        data_wait += time.perf_counter() - wait_start
        batch = mesh_lib.global_batch(local_batch, data_sharding)
        state, metrics = train_step(state, batch)
        if acc is None:
            acc = accumulate.init_accumulator(metrics)
        acc = accumulate.accumulate(acc, metrics, step)
        if ckpt.pending_step is not None:
            # The save started after the previous step: its outcome, now, while the
            # device computes the step just dispatched. A failure stops the run here.
            ckpt.wait()
            history.trained_to(saved_step)
        done = step + 1
        is_last = done == num_steps
        stop = signals.requested(done)
        if done % config.train.log_every == 0 or is_last or stop:
            if stop_on_nan:
                _check_finite(acc)
            now = time.time()
            steps_per_sec = (done - last_log_step) / max(now - last_log_time, 1e-9)
            scalars = accumulate.read_means(acc) | {
                "steps_per_sec": steps_per_sec,
                "images_per_sec": steps_per_sec * config.train.batch_size,
                "eta_hours": (num_steps - done) / max(steps_per_sec, 1e-9) / 3600,
                # Share of the wall time the loop sat waiting for input: the
                # prefetching pipeline should keep this near 0.
                "data_wait_fraction": data_wait / max(now - last_log_time, 1e-9),
                "skipped_steps": int(jax.device_get(state.skipped_steps)),
            }
            metric_writer.write_scalars(done, scalars)
            acc = None
            last_log_time, last_log_step, data_wait = now, done, 0.0
        if done % config.train.checkpoint_every == 0 or is_last or stop:
            if stop_on_nan and acc is not None:
                _check_finite(acc)
            ckpt.save(done, state, force=True)
            saved_step = done
        if grids is not None and (done % config.train.sample_every == 0 or is_last):
            grids.write(state.ema_params, done, metric_writer)
        if stop:
            break
    ckpt.wait()  # the last save: committed, or CheckpointWriteError naming it
    history.trained_to(saved_step)
    if stop == "SIGTERM":
        logging.warning("Saved step %d after SIGTERM; exiting.", done)
    elif stop == "SIGINT":
        raise preemption.Interrupted(
            f"Interrupted (Ctrl-C) at step {done}; saved checkpoint {saved_step}. Run the "
            "same command to resume from it."
        )
    logging.info("Finished at step %d (last checkpoint: %s).", int(state.step), saved_step)
    return state
