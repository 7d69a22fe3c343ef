"""What a new user meets first: relative workdirs, a second run on a workdir in use, bad
configs and config files, a changed config on resume or at sampling time, restores that
fail for reasons outside the checkpoint, and which config produced which result."""

import json
import pathlib
import re
import signal
import subprocess
import time

import pytest

from diffusion_jax.sampling import SAMPLERS
from diffusion_jax.training import checkpoint, evaluate, setup, train, workdir as workdir_lib

from helpers import (ROOT, TOY, launch, launch_cmd, launch_env, one_level_cifar_config,
                     toy_config)


def test_local_workdirs_resolve_to_absolute_paths_and_remote_ones_are_left_alone(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert workdir_lib.resolve_workdir("runs/x") == str(tmp_path / "runs" / "x")
    assert workdir_lib.resolve_workdir("./runs/../y") == str(tmp_path / "y")
    assert workdir_lib.resolve_workdir("~/z") == str(tmp_path / "home" / "z")
    assert workdir_lib.resolve_workdir(tmp_path / "p") == str(tmp_path / "p")
    with pytest.raises(ValueError, match="--workdir is empty"):
        workdir_lib.resolve_workdir(" ")


def test_gs_workdir_without_gcsfs_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        assert workdir_lib.resolve_workdir("gs://bucket/run") == "gs://bucket/run"
        return
    with pytest.raises(ValueError, match=r"needs the 'gcsfs' package.*pip install -e \"\.\[gcs\]\""):
        workdir_lib.resolve_workdir("gs://bucket/run")
    assert "gcs = [" in (ROOT / "pyproject.toml").read_text()


def test_a_relative_workdir_trains_samples_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = one_level_cifar_config()  # T = 50
    config.train.num_steps = 3
    train.train_and_evaluate(config, "runs/tiny")
    run = tmp_path / "runs" / "tiny"
    assert (run / "checkpoints" / "3" / "commit_success.txt").exists()
    # The ancestral sampler respaced to 5 steps is named by its 5 steps.
    config.sample.num_steps, config.sample.num_samples = 5, 8
    path = evaluate.sample_from_checkpoint(config, "runs/tiny")
    assert pathlib.Path(path) == run / "samples" / "ancestral_5_step3.npz"
    evaluate.evaluate_checkpoint(config, "runs/tiny")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sample_line, eval_line = lines[-2], lines[-1]
    assert sample_line["mode"] == "sample" and sample_line["sampler"] == "ancestral"
    assert sample_line["sampler_steps"] == 5 and sample_line["step"] == 3
    assert eval_line["mode"] == "eval" and eval_line["eval/split"] == "test"
    for line in (sample_line, eval_line):
        saved = run / "configs" / f"{line['config_sha256']}.json"
        assert json.loads(saved.read_text())["sample"]["num_steps"] == 5


def test_sample_and_eval_refuse_a_config_that_defines_another_model(tmp_path):
    config = toy_config()
    config.train.num_steps = 3
    train.train_and_evaluate(config, tmp_path)
    config.diffusion.num_timesteps, config.diffusion.var_type = 40, "fixed_large"
    for run in (evaluate.sample_from_checkpoint, evaluate.evaluate_checkpoint):
        with pytest.raises(ValueError, match=r"defines the model: diffusion.num_timesteps: 20 "
                                             r"-> 40; diffusion.var_type: 'fixed_small' -> 'fixed_large'"):
            run(config, tmp_path)
    assert not (tmp_path / "samples").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # training's only


def test_every_config_that_trains_is_recorded_with_its_steps(tmp_path):
    config = toy_config()
    config.train.num_steps = 3
    train.train_and_evaluate(config, tmp_path)
    config.optim.lr, config.train.num_steps = 5e-4, 6
    train.train_and_evaluate(config, tmp_path)
    config.optim.lr = 2e-4  # trains nothing: already at step 6
    train.train_and_evaluate(config, tmp_path)
    config.train.num_steps = 9
    train.train_and_evaluate(config, tmp_path)
    history = [json.loads(x) for x in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [(h["first_step"], h["last_step"], h["config"]["optim"]["lr"]) for h in history] == [
        (1, 3, 1e-3), (4, 6, 5e-4), (7, 9, 2e-4)]
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_steps_are_checked_for_every_sampler(sampler):
    config = toy_config()  # T = 20
    config.sample.sampler = sampler
    for bad in (21, 0):
        config.sample.num_steps = bad
        with pytest.raises(ValueError, match=rf"sample.num_steps must be an int in \[1, "
                                             rf"diffusion.num_timesteps = 20\].*got {bad}"):
            setup.validate_config(config)


@pytest.mark.parametrize("field,value,message", [
    ("optim.lr", 0.0, "config.optim.lr must be a number > 0.0; got 0.0"),
    ("model.dropout", 1.0, r"config.model.dropout must be a number in \[0.0, 1.0\); got 1.0"),
    ("train.sample_every", -1, "config.train.sample_every must be an int >= 0; got -1"),
    ("sample.batch_size", 0, "config.sample.batch_size must be an int >= 1; got 0"),
    ("eval.iw_samples", -2, "config.eval.iw_samples must be an int >= 0; got -2"),
    ("model.features", (32, 0), r"config.model.features must be a non-empty tuple of ints >= 1"),
    ("optim.beta2", 1.0, r"config.optim.beta2 must be a number in \[0.0, 1.0\)"),
])
def test_config_values_outside_their_range_fail_before_anything_is_written(
        tmp_path, field, value, message):
    config = toy_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("text,message", [
    ("def get_config(:\n", "could not be loaded: SyntaxError"),
    ("x = 1\n", "could not be loaded: AttributeError: .* has no attribute 'get_config'"),
    ("def get_config():\n    return 3\n", r"get_config\(\) in .* must return an "
                                            r"ml_collections.ConfigDict; it returned int"),
])
def test_a_config_file_that_cannot_be_loaded_gets_one_line(tmp_path, text, message):
    path = tmp_path / "bad_config.py"
    path.write_text(text)
    proc = launch(f"--config={path}", f"--workdir={tmp_path / 'w'}", check=False, devices=1)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def test_a_second_run_on_a_workdir_in_use_is_refused_and_a_dead_ones_lock_is_not(tmp_path):
    first = subprocess.Popen(
        launch_cmd(f"--config={TOY}", f"--workdir={tmp_path}", "--config.train.num_steps=100000",
                   "--config.train.log_every=5"),
        cwd=ROOT, env=launch_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
            assert first.poll() is None
            time.sleep(0.1)
        config = toy_config()
        with pytest.raises(workdir_lib.WorkdirInUseError,
                           match=rf"in use by another run \(pid {first.pid} on host"):
            train.train_and_evaluate(config, tmp_path)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    config = toy_config()
    config.train.num_steps = 3
    train.train_and_evaluate(config, tmp_path)  # the dead run left no stuck lock


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_optimizer_change_on_resume_is_named_not_called_unreadable(tmp_path):
    config = toy_config()
    config.train.num_steps = 3
    train.train_and_evaluate(config, tmp_path)
    before = sorted(str(p) for p in (tmp_path / "checkpoints").rglob("*"))
    config.optim.grad_clip, config.train.num_steps = 0.0, 6
    config.train.restart_if_unreadable = True  # the old advice: must not set it aside
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match=r"another structure.*'opt_state/0/0/count'.*optim.grad_clip"):
        train.train_and_evaluate(config, tmp_path)
    assert sorted(str(p) for p in (tmp_path / "checkpoints").rglob("*")) == before
    assert not (tmp_path / "checkpoints_damaged").exists()


@pytest.fixture
def failing_reads(monkeypatch):
    """Makes TensorStore's reads (inside Orbax) fail with ``error`` the first ``times``
    times; records the retry delays instead of sleeping."""
    from orbax.checkpoint._src.serialization import serialization

    real = serialization.async_deserialize
    state = {"left": 0, "error": None, "calls": 0}
    delays = []

    async def deserialize(*args, **kwargs):
        state["calls"] += 1
        if state["left"] > 0:
            state["left"] -= 1
            raise state["error"]
        return await real(*args, **kwargs)

    monkeypatch.setattr(serialization, "async_deserialize", deserialize)
    monkeypatch.setattr(checkpoint.time, "sleep", delays.append)

    def arm(error, times):
        state.update(left=times, error=error)
        return delays

    return arm


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied"),
    ValueError("DEADLINE_EXCEEDED: reading gs://bucket/run/checkpoints/3 timed out"),
])
def test_an_environmental_read_error_is_retried_then_stops_moving_nothing(
        tmp_path, failing_reads, error):
    config = toy_config()
    config.train.num_steps = 3
    train.train_and_evaluate(config, tmp_path)
    before = sorted(str(p) for p in (tmp_path / "checkpoints").rglob("*"))
    config.train.num_steps = 6
    delays = failing_reads(error, 10**6)
    with pytest.raises(checkpoint.CheckpointReadError,
                       match=r"checkpoints/3 after 3 attempts.*nothing was moved"):
        train.train_and_evaluate(config, tmp_path)
    assert delays == [2.0, 4.0]
    assert sorted(str(p) for p in (tmp_path / "checkpoints").rglob("*")) == before
    assert not (tmp_path / "checkpoints_damaged").exists()
    # A read that fails once and then succeeds resumes.
    failing_reads(error, 1)
    assert int(train.train_and_evaluate(config, tmp_path).step) == 6


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_whose_metadata_is_missing_is_set_aside(tmp_path):
    config = toy_config()  # checkpoints 3 and 6
    train.train_and_evaluate(config, tmp_path)
    (tmp_path / "checkpoints" / "6" / "default" / "_METADATA").unlink()
    config.train.num_steps = 9
    assert int(train.train_and_evaluate(config, tmp_path).step) == 9
    assert (tmp_path / "checkpoints_damaged" / "6" / "default").exists()
