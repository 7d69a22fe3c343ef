"""The training loop: config -> data + model + schedule -> jitted train step -> checkpoints.

`train_and_evaluate(config, workdir)` is what ``launch.py --mode=train`` calls. It runs
unchanged on one CPU, a multi-GPU host or a multi-host TPU pod: the batch is split over a
mesh of every device, parameters and optimizer state are replicated or (``mesh.fsdp``
> 1) split along the mesh's fsdp axis, and a workdir holding a checkpoint is
resumed from it, at the same step and with the same data order.
"""

from __future__ import annotations

import logging
import signal
import time
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from diffusion_jax import data
from diffusion_jax.training import checkpoint, mesh as mesh_lib, objectives, step as step_lib, writer
from diffusion_jax.training import sharding as sharding_lib
from diffusion_jax.training.setup import validate_config
from diffusion_jax.training import sample_quality
from diffusion_jax.training.state import TrainState, make_optimizer

__all__ = ["NonFiniteLossError", "prepare_workdir", "train_and_evaluate"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN/Inf; the run stopped before saving it."""


def prepare_workdir(workdir) -> epath.Path:
    """Creates ``workdir`` and checks that it can be written to (local or gs://)."""
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"The workdir {str(path)!r} is not writable ({type(e).__name__}: {e}). Pass a "
            "--workdir this user can create and write to."
        ) from e
    return path


def _record_config(workdir: epath.Path, config: ml_collections.ConfigDict, start_step: int):
    """Writes config.json; a resumed run with another config keeps both files."""
    if jax.process_index() != 0:
        return
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    path = workdir / "config.json"
    if path.exists() and path.read_text() != text:
        path = workdir / f"config_from_step_{start_step}.json"
        logging.warning("The config differs from the one in %s; saved it as %s.", workdir, path)
    if not path.exists():
        path.write_text(text)


_SYNC_EVERY = 10


class _Preemption:
    """Records SIGTERM (sent before preemption) so the loop can save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handler(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process_requested(self, step: int) -> bool:
        """Whether any process got SIGTERM. Across processes this is a collective, so it
        runs every ``_SYNC_EVERY`` steps only (all processes agree on which)."""
        if jax.process_count() == 1:
            return self.requested
        if step % _SYNC_EVERY:
            return False
        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.max(flags))


class _MetricAccumulator:
    """Sums metrics on device between log steps and remembers the first non-finite step,
    so nothing leaves the device until a log or checkpoint step."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.count = None, 0
        self.first_bad = None  # (step, metrics) on device

    def add(self, step: int, metrics: dict):
        ok = metrics["finite"]
        # Means are over finite steps only (with nan_policy='skip' the others are dropped).
        kept = {k: jnp.where(ok > 0, v, 0.0) for k, v in metrics.items()}
        self.sums = kept if self.sums is None else jax.tree.map(jnp.add, self.sums, kept)
        self.count += 1
        bad_now = ok < 1.0
        if self.first_bad is None:
            self.first_bad = (jnp.where(bad_now, step, -1), metrics)
        else:
            prev_step, prev_metrics = self.first_bad
            take = bad_now & (prev_step < 0)
            self.first_bad = (
                jnp.where(take, step, prev_step),
                jax.tree.map(lambda new, old: jnp.where(take, new, old), metrics, prev_metrics),
            )

    def check_finite(self):
        """Raises NonFiniteLossError naming the first bad step and its metrics."""
        if self.first_bad is None:
            return
        bad_step, metrics = jax.device_get(self.first_bad)
        if bad_step >= 0:
            names = ["loss", "grad_norm"] + sorted(set(metrics) - {"loss", "grad_norm", "finite"})
            detail = ", ".join(f"{k}={float(metrics[k]):.4g}" for k in names)
            raise NonFiniteLossError(
                f"Non-finite loss or gradient at step {int(bad_step) + 1} ({detail}). The run "
                "stopped; the last checkpoint before it is intact. Lower optim.lr, check the "
                "data, or set train.nan_policy='skip' to drop such updates."
            )

    def means(self) -> dict[str, float]:
        sums = jax.device_get(self.sums)
        finite_steps = float(sums["finite"])
        out = {k: float(v) / max(finite_steps, 1.0) for k, v in sums.items() if k != "finite"}
        out["nonfinite_steps"] = self.count - finite_steps
        return out


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

    Writes ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``samples/`` and
    ``config.json`` under ``workdir`` (logs and images from process 0 only).
    """
    validate_config(config)
    workdir = prepare_workdir(workdir)
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
    try:
        state = _resume(ckpt, state, config)
    except BaseException:
        ckpt.close()  # release Orbax's background threads before the error propagates
        raise
    start_step = int(state.step)
    _record_config(workdir, config, start_step)
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
    num_steps = config.train.num_steps
    if start_step >= num_steps:
        logging.info("Already at step %d of %d: nothing to train.", start_step, num_steps)
    data_iter = data.create_data_iterator(
        config.data, per_process_batch=per_process_batch, seed=config.seed,
        start_step=start_step, process_index=process_index, process_count=process_count,
    )
    acc = _MetricAccumulator()
    last_log_time, last_log_step = time.time(), start_step
    data_wait = 0.0  # seconds blocked in next(data_iter) since the last log step
    saved_step = ckpt.latest_step()
    try:
        with _Preemption() as preemption:
            for step in range(start_step, num_steps):
                wait_start = time.perf_counter()
                local_batch = next(data_iter)
                data_wait += time.perf_counter() - wait_start
                batch = mesh_lib.global_batch(local_batch, data_sharding)
                state, metrics = train_step(state, batch)
                acc.add(step, metrics)
                done = step + 1
                is_last = done == num_steps
                preempted = preemption.any_process_requested(done)
                stop_on_nan = config.train.nan_policy == "stop"
                if done % config.train.log_every == 0 or is_last or preempted:
                    if stop_on_nan:
                        acc.check_finite()
                    now = time.time()
                    steps_per_sec = (done - last_log_step) / max(now - last_log_time, 1e-9)
                    scalars = acc.means() | {
                        "steps_per_sec": steps_per_sec,
                        "images_per_sec": steps_per_sec * config.train.batch_size,
                        "eta_hours": (num_steps - done) / max(steps_per_sec, 1e-9) / 3600,
                        # Share of the wall time the loop sat waiting for input: the
                        # prefetching pipeline should keep this near 0.
                        "data_wait_fraction": data_wait / max(now - last_log_time, 1e-9),
                        "skipped_steps": int(jax.device_get(state.skipped_steps)),
                    }
                    metric_writer.write_scalars(done, scalars)
                    acc.reset()
                    last_log_time, last_log_step, data_wait = now, done, 0.0
                if done % config.train.checkpoint_every == 0 or is_last or preempted:
                    if stop_on_nan:
                        acc.check_finite()
                    ckpt.save(done, state, force=True)
                    saved_step = done
                if objective.sample is not None and config.train.sample_every and (
                    done % config.train.sample_every == 0 or is_last
                ):
                    _write_samples(objective, state, config, sample_key, done, metric_writer,
                                   data_sharding)
                if preempted:
                    logging.warning("Saved step %d after SIGTERM; exiting.", done)
                    break
    finally:
        ckpt.wait()
        ckpt.close()
        metric_writer.close()
    logging.info("Finished at step %d (last checkpoint: %s).", int(state.step), saved_step)
    return state


def _write_samples(objective, state, config, key, step, metric_writer, sharding):
    num = config.sample.num_samples
    padded = -(-num // sharding.mesh.size) * sharding.mesh.size  # even split, trim after
    # Sharding the samples over the mesh splits the work; replicated inputs alone would
    # make every device compute the whole chain.
    draw = jax.jit(lambda params, key: objective.sample(params, key, padded), out_shardings=sharding)
    images = draw(state.ema_params, jax.random.fold_in(key, step))
    images = multihost_utils.process_allgather(images, tiled=True)[:num]
    grid = writer.image_grid(images, upscale=config.sample.grid_upscale)
    path = metric_writer.write_image(step, "ema_samples", grid)
    if path is not None:
        logging.info("Wrote %s.", path)
    if config.data.name == "digits":
        sample_quality.log_digits_fid(images, step, metric_writer)
