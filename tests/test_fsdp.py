"""FSDP on a (data, fsdp) mesh of 8 fake CPU devices: equal results on every mesh shape,
the sharding rule on the arrays, bytes per device, portable checkpoints, bad input."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from diffusion_jax import data
from diffusion_jax.training import checkpoint, mesh as mesh_lib, objectives, train
from diffusion_jax.training import sharding as sharding_lib
from diffusion_jax.training import step as step_lib
from diffusion_jax.training.state import TrainState, make_optimizer

from helpers import ROOT, TOY, launch, load_config, restore_tree, toy_config

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
MIN_SIZE = 256  # small enough that the tiny DiT has sharded and replicated arrays


def _dit_config():
    config = load_config(ROOT / "configs" / "dit_digits.py", "tiny")
    config.model.dit.update(dict(hidden_size=32, depth=1, num_heads=2))
    config.mesh.min_shard_size = MIN_SIZE
    config.train.batch_size = 16
    config.train.sample_every = 0
    return config


@pytest.fixture(scope="module")
def toy_setup():
    """The toy MLP (kernels of 128 x 128, 128 x 32, 32 x 32, 2 x 32 and biases): cheap
    to compile five times, with arrays on both sides of MIN_SIZE."""
    config = toy_config()
    info = data.dataset_info(config.data)
    objective = objectives.create_objective(config, info)
    optimizer = make_optimizer(config.optim)
    params = jax.jit(objective.init)(jax.random.key(0))
    batch = next(data.create_data_iterator(config.data, per_process_batch=16, seed=0,
                                           start_step=0, process_index=0, process_count=1))
    step_fn = step_lib.make_train_step(loss_fn=objective.loss, optimizer=optimizer,
                                       root_key=jax.random.key(1), ema_decay=0.9)
    return params, optimizer, batch, step_fn


def _run_step(toy_setup, mesh):
    params, optimizer, batch, step_fn = toy_setup
    state = TrainState.create(params, optimizer)
    shardings = sharding_lib.state_shardings(state, mesh, min_size=MIN_SIZE)
    state = jax.device_put(state, shardings)
    batch_sharding = mesh_lib.data_sharded(mesh)
    fn = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)))
    new_state, metrics = fn(state, mesh_lib.global_batch(batch, batch_sharding))
    return new_state, jax.device_get(metrics)


def test_sharding_rule():
    spec = sharding_lib.fsdp_partition_spec
    assert spec((64, 192), 4, min_size=256) == PartitionSpec(None, "fsdp")  # largest dim
    assert spec((192, 64), 4, min_size=256) == PartitionSpec("fsdp")
    assert spec((96, 96), 4, min_size=256) == PartitionSpec(None, "fsdp")  # ties: last
    assert spec((30, 100), 8, min_size=256) == PartitionSpec()  # no divisible dim
    assert spec((3, 3, 64, 40), 8, min_size=256) == PartitionSpec(None, None, "fsdp")
    assert spec((128,), 4, min_size=256) == PartitionSpec()  # small: replicated
    assert spec((), 4, min_size=256) == PartitionSpec()
    assert spec((64, 192), 1, min_size=256) == PartitionSpec()  # fsdp = 1: data parallel


def test_every_mesh_shape_gives_the_one_device_step(toy_setup):
    """One step on meshes 8x1, 4x2, 2x4, 1x8 against one device. Tolerances: the loss is
    a batch mean summed in another order (rtol 1e-5); parameters after one Adam step
    (~lr-sized moves of a sign-like update) to 1e-6 absolute."""
    single = mesh_lib.make_mesh(devices=jax.devices()[:1])
    ref_state, ref_metrics = _run_step(toy_setup, single)
    ref_params = jax.device_get(ref_state.params)
    for shape in MESHES:
        mesh = mesh_lib.make_mesh(data=shape[0], fsdp=shape[1])
        state, metrics = _run_step(toy_setup, mesh)
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                        jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=str(shape))
        _check_shardings_and_bytes(state, mesh)


def _check_shardings_and_bytes(state, mesh):
    """Each array of params, EMA and Adam state is placed as the rule says; a sharded
    array's shard on a device is 1/fsdp of it, a replicated one whole."""
    fsdp = mesh.shape["fsdp"]
    sharded = replicated = 0
    adam = state.opt_state[-1][0]  # chain(clip, adam) -> adam's (ScaleByAdamState, ...)
    for tree in (state.params, state.ema_params, adam.mu, adam.nu):
        for leaf in jax.tree.leaves(tree):
            want = sharding_lib.fsdp_partition_spec(leaf.shape, fsdp, min_size=MIN_SIZE)
            assert leaf.sharding.spec == want, (leaf.shape, leaf.sharding.spec, want)
            shard_bytes = leaf.addressable_shards[0].data.nbytes
            if want == PartitionSpec():
                assert shard_bytes == leaf.nbytes
                replicated += 1
            else:
                assert shard_bytes * fsdp == leaf.nbytes
                sharded += 1
    assert replicated > 0 and (sharded > 0 or fsdp == 1)
    # Whole-state bytes per device: the sharded part falls by the fsdp factor.
    whole = sum(x.nbytes for x in jax.tree.leaves(state.params))
    small = sum(x.nbytes for x in jax.tree.leaves(state.params)
                if sharding_lib.fsdp_partition_spec(x.shape, 8, min_size=MIN_SIZE) == PartitionSpec())
    if fsdp == 8:
        assert sharding_lib.per_device_bytes(state.params) == small + (whole - small) // 8


def test_per_device_bytes_of_abstract_shardings():
    mesh = mesh_lib.make_mesh(data=2, fsdp=4)
    tree = {"w": jax.ShapeDtypeStruct((64, 128), jnp.float32), "b": jnp.zeros((128,))}
    shardings = sharding_lib.state_shardings(tree, mesh, min_size=MIN_SIZE)
    assert sharding_lib.per_device_bytes(tree, shardings) == 64 * 128 * 4 // 4 + 128 * 4


def test_checkpoint_saved_on_4x2_restores_on_other_meshes(toy_setup, tmp_path):
    """Orbax restores into the target shardings, bit for bit in value."""
    params, optimizer, _, _ = toy_setup
    state = TrainState.create(jax.tree.map(lambda p: p + 0.5, params), optimizer)
    mesh42 = mesh_lib.make_mesh(data=4, fsdp=2)
    saved = jax.device_put(state, sharding_lib.state_shardings(state, mesh42, min_size=MIN_SIZE))
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(7, saved, force=True)
    ckpt.wait()
    want = jax.tree.map(np.asarray, jax.device_get(saved))
    targets = [mesh_lib.make_mesh(data=2, fsdp=4), mesh_lib.make_mesh(data=8, fsdp=1),
               mesh_lib.make_mesh(devices=jax.devices()[:1])]
    for mesh in targets:
        shardings = sharding_lib.state_shardings(state, mesh, min_size=MIN_SIZE)
        template = jax.device_put(TrainState.create(params, optimizer), shardings)
        restored = ckpt.restore(template, step=7)
        for got, exp, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(want),
                                jax.tree.leaves(shardings)):
            assert got.sharding == sh
            np.testing.assert_array_equal(np.asarray(got), exp)
    ckpt.close()


def test_fsdp_run_3_plus_3_equals_6_and_resumes_on_another_mesh(tmp_path):
    """train_and_evaluate on a 4x2 mesh: 3 steps + resume to 6 equals 6 steps bit for bit;
    resuming the 3-step checkpoint on 2x4 gives the same 6 steps up to reduction order."""
    config = toy_config()
    config.mesh.fsdp, config.mesh.min_shard_size = 2, MIN_SIZE
    whole = train.train_and_evaluate(config, tmp_path / "whole")
    config.train.num_steps = 3
    train.train_and_evaluate(config, tmp_path / "split")
    config.train.num_steps = 6
    resumed = train.train_and_evaluate(config, tmp_path / "split")
    for a, b in zip(jax.tree.leaves(jax.device_get(whole)), jax.tree.leaves(jax.device_get(resumed))):
        np.testing.assert_array_equal(a, b)
    adam = resumed.opt_state[-1][0]
    leaf = max(jax.tree.leaves(adam.mu), key=lambda x: x.size)
    assert leaf.sharding.spec == sharding_lib.fsdp_partition_spec(leaf.shape, 2, min_size=MIN_SIZE)
    assert leaf.sharding.spec != PartitionSpec()

    # Continue the 4x2 run's step-3 checkpoint on 2x4 (tolerance: float32 reduction order).
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "split" / "checkpoints" / "3", other / "checkpoints" / "3")
    config.mesh.fsdp = 4
    moved = train.train_and_evaluate(config, other)
    assert int(moved.step) == 6
    for a, b in zip(jax.tree.leaves(jax.device_get(whole.params)),
                    jax.tree.leaves(jax.device_get(moved.params))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bad_mesh_and_batch(tmp_path):
    with pytest.raises(ValueError, match=r"mesh.data x mesh.fsdp = 3 x 2 = 6 is not the device count 8"):
        mesh_lib.make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match=r"mesh.fsdp = 3 does not divide the device count 8; valid sizes: \[1, 2, 4, 8\]"):
        mesh_lib.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="mesh.fsdp must be a positive int; got 0"):
        mesh_lib.make_mesh(fsdp=0)
    config = _dit_config()
    config.mesh.fsdp, config.train.batch_size = 2, 12
    with pytest.raises(ValueError, match=r"batch_size .* = 12 must be a positive multiple of the device count 8 \(mesh data x fsdp = 4 x 2"):
        train.train_and_evaluate(config, tmp_path)


def test_two_processes_with_fsdp_spanning_both_match_one_process(tmp_path):
    """2 processes x 2 devices with fsdp = 4 (each parameter split over both processes)
    train like one process x 4 devices without fsdp. Tolerance: reduction order, 1e-6."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    common = [f"--config={TOY}", "--config.train.batch_size=8", "--config.train.num_steps=4",
              "--config.mesh.min_shard_size=64"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), *common, "--config.mesh.fsdp=4",
             f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    launch(*common, f"--workdir={tmp_path / 'single'}", devices=4)
    multi, single = restore_tree(tmp_path / "multi", 4)["params"], restore_tree(tmp_path / "single", 4)["params"]
    assert len(jax.tree.leaves(multi)) == len(jax.tree.leaves(single)) > 0
    for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
