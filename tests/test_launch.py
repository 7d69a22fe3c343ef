"""launch.py end to end, in subprocesses: train, resume, two hosts on localhost, bad flags."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax.training import evaluate

from helpers import ONE_LEVEL_FLAGS, ROOT, TOY, launch, one_level_cifar_config, restore_tree


def restore_params(workdir, step):
    return restore_tree(workdir, step)["params"]


def test_tiny_cifar_on_mocked_data_trains_writes_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    args = [f"--config={ROOT / 'configs' / 'ddpm_cifar.py'}:tiny", "--config.data.mock=True",
            *ONE_LEVEL_FLAGS, f"--workdir={workdir}"]
    launch(*args, "--config.train.num_steps=3")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    assert (workdir / "samples" / "ema_samples_00000003.png").exists()
    assert list((workdir / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 3]
    assert {"loss", "mse", "vb", "grad_norm", "steps_per_sec", "images_per_sec", "eta_hours"} <= set(lines[0])
    assert json.loads((workdir / "config.json").read_text())["data"]["name"] == "cifar10"

    proc = launch(*args, "--config.train.num_steps=6")
    assert "Resumed from step 3" in proc.stderr
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 3, 4, 6]
    assert (workdir / "samples" / "ema_samples_00000006.png").exists()

    # --mode=sample: EMA samples of the latest checkpoint, as .npz + PNG, never overwritten.
    sample_flags = ["--config.sample.sampler=ddim", "--config.sample.num_steps=10",
                    "--config.sample.num_samples=12"]
    launch(*args, "--mode=sample", *sample_flags)
    # A second draw (here in-process, to save a start-up) goes to a new file.
    config = one_level_cifar_config()
    config.sample.sampler, config.sample.num_steps, config.sample.num_samples = "ddim", 10, 12
    evaluate.sample_from_checkpoint(config, workdir)
    first = np.load(workdir / "samples" / "ddim_10_step6.npz")
    assert first["samples"].shape == (12, 32, 32, 3) and first["images"].dtype == np.uint8
    assert np.abs(first["samples"]).max() <= 1.0
    second = np.load(workdir / "samples" / "ddim_10_step6_1.npz")
    np.testing.assert_array_equal(first["samples"], second["samples"])  # same key, same draw
    assert (workdir / "samples" / "ddim_10_step6.png").exists()

    # --mode=eval: test-set bits/dim with a standard error, appended to metrics.jsonl.
    # (The importance-weighted estimate is tested in test_likelihood_iw.py.)
    launch(*args, "--mode=eval")
    result = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 6 and result["eval/num_examples"] == 16
    assert 0 < result["eval/total_bpd"] < 20 and result["eval/total_bpd_stderr"] > 0
    assert "eval/iw_bpd" not in result


def test_sample_and_eval_need_a_checkpoint(tmp_path):
    for mode in ("sample", "eval"):
        proc = launch(f"--config={TOY}", f"--workdir={tmp_path}", f"--mode={mode}", check=False)
        assert proc.returncode != 0
        assert "No checkpoint in" in proc.stderr and "Train first with --mode=train" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """Two processes x 2 CPU devices train like one process x 4 devices on the same global
    batch; only process 0 writes logs. Tolerance: all-reduce order, 1e-6 absolute."""
    port = _free_port()
    common = [f"--config={TOY}", "--config.train.batch_size=8", "--config.train.num_steps=4"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), *common, f"--workdir={tmp_path / 'multi'}",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "Process 1 of 2" in outs[1][1]
    launch(*common, f"--workdir={tmp_path / 'single'}", devices=4)

    multi, single = restore_params(tmp_path / "multi", 4), restore_params(tmp_path / "single", 4)
    for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # One writer: each logged step appears once, one TensorBoard event file.
    steps = [json.loads(x)["step"] for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert len(list((tmp_path / "multi" / "tensorboard").iterdir())) == 1


CIFAR_TINY = f"--config={ROOT / 'configs' / 'ddpm_cifar.py'}:tiny"


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--config.optim.lrr=0.1"], 'Did you mean "lr"'),
        (["--config.train.batch_size=abc"], "batch_size=abc: invalid literal for int"),
        (["--config.train.batch_size=12"], "multiple of the device count 8"),
        (["--config.diffusion.loss_type=l1"], "loss_type 'l1'"),
        (["--config.diffusion.var_type=learned"], "'mse' cannot train var_type 'learned'"),
        (["--config.sample.sampler=ddim", "--config.sample.num_steps=50"],
         "sample.num_steps must be an int in [1, diffusion.num_timesteps = 20]"),
        (["--mode=serve"], "--mode=serve: value should be one of <train|sample|eval|fid_stats|fid>"),
        (["--coordinator_address=localhost:1234"], "needs --num_processes and --process_id"),
        ([CIFAR_TINY.replace(":tiny", ":huge")], "Unknown config variant 'huge'"),
        ([CIFAR_TINY, "--config.data.data_dir={tmp}/tfds"], "'cifar10' is not prepared"),
        (["--workdir={tmp}/a_file/run"], "is not writable"),
    ],
)
def test_bad_flags_exit_nonzero_with_a_message(flags, match, tmp_path):
    (tmp_path / "a_file").write_text("a file, not a directory")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    config = [] if any(f.startswith("--config=") for f in flags) else [f"--config={TOY}"]
    workdir = [] if any(f.startswith("--workdir=") for f in flags) else [f"--workdir={tmp_path / 'w'}"]
    proc = launch(*config, *workdir, *flags, check=False)
    assert proc.returncode != 0
    assert match in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "w" / "checkpoints").exists()
