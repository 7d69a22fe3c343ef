"""The training system in-process: data-parallel equivalence, exact resume, bad input."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax import data
from diffusion_jax.training import checkpoint, mesh as mesh_lib, objectives, setup, step as step_lib, train
from diffusion_jax.training import state as state_lib
from diffusion_jax.training.state import TrainState, make_optimizer

from helpers import one_level_cifar_config, tiny_cifar_config, toy_config


def _params(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_one_step_on_8_devices_equals_one_device():
    """The global batch split over 8 devices gives the loss and parameters of 1 device.

    Tolerance: the gradient's all-reduce sums in another order, so float32 agrees to
    ~1e-6 relative; parameters after one Adam step to 1e-6 absolute.
    """
    assert jax.device_count() == 8
    config = one_level_cifar_config()
    objective = objectives.create_objective(config, data.dataset_info(config.data))
    optimizer = make_optimizer(config.optim)
    params = jax.jit(objective.init)(jax.random.key(0))
    batch = next(data.create_data_iterator(
        config.data, per_process_batch=8, seed=0, start_step=0, process_index=0, process_count=1))
    step_fn = step_lib.make_train_step(
        loss_fn=objective.loss, optimizer=optimizer, root_key=jax.random.key(1), ema_decay=0.9
    )
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.asarray(devices), ("data",))
        repl = NamedSharding(mesh, PartitionSpec())
        sharded = NamedSharding(mesh, PartitionSpec("data"))
        state = jax.device_put(TrainState.create(params, optimizer), repl)
        fn = jax.jit(step_fn, in_shardings=(repl, sharded), out_shardings=(repl, repl))
        new_state, metrics = fn(state, mesh_lib.global_batch(batch, sharded))
        results.append((jax.device_get(metrics), _params(new_state)))
    (m1, p1), (m8, p8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make_config", [toy_config, one_level_cifar_config],
                         ids=["toy", "cifar_tiny"])
def test_run_split_3_plus_3_equals_6_steps(make_config, tmp_path):
    config = make_config()
    whole = train.train_and_evaluate(config, tmp_path / "whole")
    config.train.num_steps = 3
    first = train.train_and_evaluate(config, tmp_path / "split")
    assert int(first.step) == 3
    config.train.num_steps = 6
    resumed = train.train_and_evaluate(config, tmp_path / "split")
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(_params(whole)), jax.tree.leaves(_params(resumed))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(whole.ema_params)),
                    jax.tree.leaves(jax.device_get(resumed.ema_params))):
        np.testing.assert_array_equal(a, b)
    ckpts = checkpoint.Checkpointer(tmp_path / "split" / "checkpoints")
    assert ckpts.all_steps() == [3, 6]
    ckpts.close()


def test_batch_not_divisible_by_devices(tmp_path):
    config = toy_config()
    config.train.batch_size = 12
    with pytest.raises(ValueError, match=r"batch_size .* = 12 must be a positive multiple of the device count 8.*e\.g\. 8 or 16"):
        train.train_and_evaluate(config, tmp_path)


def test_unprepared_data_set_fails_fast_with_instructions(tmp_path):
    config = tiny_cifar_config()
    config.data.mock = False
    config.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match=r"(?s)'cifar10' is not prepared in data_dir=.*tfds.*tfds build cifar10"):
        train.train_and_evaluate(config, tmp_path / "work")


def test_incompatible_checkpoint_is_refused_and_left_untouched(tmp_path):
    config = toy_config()
    config.train.num_steps = 3
    train.train_and_evaluate(config, tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ckpt_dir.rglob("*")}
    config.model.features = (64, 32)
    config.train.num_steps = 6
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"different model: parameter 'hidden_0/bias' has shape \(32,\) there and \(64,\)"):
        train.train_and_evaluate(config, tmp_path)
    after = {p: p.stat().st_mtime_ns for p in ckpt_dir.rglob("*")}
    assert before == after


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"workdir .*a_file/run.* is not writable"):
        train.train_and_evaluate(toy_config(), blocker / "run")


@pytest.mark.parametrize(
    "section, field, value, match",
    [
        ("diffusion", "var_type", "learned", r"'mse' cannot train var_type 'learned'"),
        ("diffusion", "schedule", "quadratic", r"diffusion.schedule 'quadratic'.*'linear'"),
        ("model", "name", "resnet", r"model.name 'resnet'.*\['unet', 'mlp', 'dit'\]"),
        ("model", "dropout_rng", "philox", r"model.dropout_rng 'philox'.*\['hash', 'jax'\]"),
        (None, "objective", "gan", r"objective 'gan'.*\['ddpm'"),
        ("train", "nan_policy", "ignore", r"train.nan_policy 'ignore'.*\['stop', 'skip'\]"),
        ("train", "num_steps", 0, r"train.num_steps must be a positive int; got 0"),
        ("optim", "ema_decay", 1.0, r"optim.ema_decay must lie in \[0, 1\)"),
        ("optim", "lr_schedule", "step", r"optim.lr_schedule 'step'.*\['constant', 'cosine'\]"),
        ("sample", "spacing", "uniform", r"sample.spacing 'uniform'.*'time_quadratic'"),
    ],
)
def test_contradictory_or_invalid_settings(section, field, value, match, tmp_path):
    config = toy_config()
    (config[section] if section else config)[field] = value
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_cosine_learning_rate_schedule_and_its_bad_settings():
    config = toy_config()
    config.optim.update(lr=1.0, warmup_steps=10, lr_schedule="cosine", decay_steps=110,
                        final_lr_fraction=0.1)
    setup.validate_config(config)
    lr = state_lib.learning_rate_schedule(config.optim)
    # Warmup 0 -> 1 over 10 steps, half cosine to 0.1 over the next 100, then held.
    for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.55), (110, 0.1), (500, 0.1)]:
        assert float(lr(step)) == pytest.approx(want, abs=1e-6)
    config.optim.decay_steps = 10
    with pytest.raises(ValueError, match=r"optim.decay_steps must be an int > optim.warmup_steps = 10.*got 10"):
        setup.validate_config(config)
    config.optim.decay_steps = 110
    config.optim.final_lr_fraction = 2.0
    with pytest.raises(ValueError, match=r"optim.final_lr_fraction must be a number in \[0, 1\]; got 2.0"):
        setup.validate_config(config)


def test_sampler_steps_above_T():
    config = toy_config()
    config.sample.sampler = "ddim"
    config.sample.num_steps = 21
    with pytest.raises(ValueError, match=r"sample.num_steps must be an int in \[1, .* = 20\].*got 21"):
        setup.validate_config(config)


def test_model_data_mismatch():
    config = toy_config()
    config.model.name = "unet"
    with pytest.raises(ValueError, match=r"'unet' needs image data.*'gaussian_mixture'.*\(2,\)"):
        setup.create_model(config, data.dataset_info(config.data))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A NaN batch at step 5 (1-based) stops the run; checkpoint 3 stays as it was."""
    config = toy_config()
    real = data.create_data_iterator

    def poisoned(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs), start=kwargs["start_step"]):
            if i == 4:
                batch = {k: np.full_like(v, np.nan) for k, v in batch.items()}
            yield batch

    monkeypatch.setattr(data, "create_data_iterator", poisoned)
    with pytest.raises(train.NonFiniteLossError, match=r"at step 5 \(loss=nan"):
        train.train_and_evaluate(config, tmp_path)
    ckpts = checkpoint.Checkpointer(tmp_path / "checkpoints")
    assert ckpts.all_steps() == [3]
    ckpts.close()
    config.train.nan_policy = "skip"
    state = train.train_and_evaluate(config, tmp_path / "skip")
    assert int(state.step) == 6 and int(state.skipped_steps) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(state)))


def test_cpu_kernels_are_an_opt_in_checked_at_config_time():
    """The default is XLA's convolutions; an opt-in that cannot run (bfloat16 here) stops
    validation with the cause and the alternative; unknown names list the valid ones."""
    config = one_level_cifar_config()
    assert config.model.cpu_kernels == "none"
    model = setup.create_model(config, data.dataset_info(config.data))
    assert model.cpu_kernels == "none"
    config.model.update(cpu_kernels="dilated", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"model.cpu_kernels='dilated' computes in float32; "
                                         r"the model computes in bfloat16\. Use "
                                         r"model.cpu_kernels='none'"):
        setup.validate_config(config)
    config.model.dtype = "float32"
    setup.validate_config(config)
    assert setup.create_model(config, data.dataset_info(config.data)).cpu_kernels == "dilated"
    config.model.cpu_kernels = "mkl"
    with pytest.raises(ValueError, match=r"cpu_kernels.*'mkl'.*'none', 'dilated', 'onednn'"):
        setup.validate_config(config)
