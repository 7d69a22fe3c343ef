"""Checkpoint writes that fail where the real world fails them: inside Orbax's background
thread (TensorStore's serialization raising, as on a full disk), on a real full
filesystem and on a read-only one. Each run must stop within one step of the failed
save, exit non-zero promptly with the documented message, and leave the last complete
checkpoint intact, bit for bit.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, TOY, launch, launch_env, restore_tree

# Checkpoints every 3 steps, all kept; a metrics line every step.
FLAGS = [f"--config={TOY}", "--config.train.checkpoint_every=3",
         "--config.train.keep_checkpoints=10", "--config.train.log_every=1"]
FAULT = str(ROOT / "tests" / "fault_launch.py")
PROMPT = 120  # seconds: a failed run that has not exited by then hangs


def _faulty(workdir, fail_step, *extra, wait=True):
    cmd = [sys.executable, "-u", FAULT, str(fail_step), *FLAGS, f"--workdir={workdir}", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    _, err = proc.communicate(timeout=PROMPT)  # a process kept alive by a thread fails here
    return proc.returncode, err


def _logged_steps(workdir):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def _assert_same(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An unfaulted 12-step run: checkpoints 3, 6, 9, 12."""
    workdir = tmp_path_factory.mktemp("reference")
    launch(*FLAGS, f"--workdir={workdir}", "--config.train.num_steps=12", devices=1)
    return workdir


def test_a_save_failing_in_orbaxs_thread_stops_the_run_at_the_next_step(tmp_path, reference):
    rc, err = _faulty(tmp_path, 6, "--config.train.num_steps=12")
    assert "fault injected in thread" in err and "in thread 'MainThread'" not in err
    assert rc == 1, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert message and "Could not write checkpoint 6 under" in message[0], err[-3000:]
    assert "RESOURCE_EXHAUSTED" in message[0] and "last complete checkpoint (3)" in message[0]
    # Stopped within one step: step 7 was computed while the save was checked, never logged.
    assert _logged_steps(tmp_path)[-1] == 6
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["3"]
    assert not (ckpts / "6").exists()  # the half-written directory is not a checkpoint
    _assert_same(restore_tree(tmp_path, 3), restore_tree(reference, 3))

    # Rerun without the fault: resumes from 3 and ends where the unfaulted run ended.
    proc = launch(*FLAGS, f"--workdir={tmp_path}", "--config.train.num_steps=12", devices=1)
    assert "Resumed from step 3" in proc.stderr
    _assert_same(restore_tree(tmp_path, 12), restore_tree(reference, 12))


def test_the_final_save_failing_is_an_error(tmp_path):
    rc, err = _faulty(tmp_path, 6, "--config.train.num_steps=6")
    assert rc == 1
    assert "error: Could not write checkpoint 6 under" in err and "checkpoint (3)" in err


def test_the_sigterm_save_failing_is_an_error(tmp_path):
    proc = _faulty(tmp_path, -1, "--config.train.num_steps=100000",
                   "--config.train.checkpoint_every=100000", wait=False)
    deadline = time.time() + PROMPT
    while len(_logged_steps(tmp_path)) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=PROMPT)
    assert proc.returncode == 1, err[-3000:]
    assert "error: Could not write checkpoint" in err and "(none yet)" in err, err[-3000:]


def _mount_tmpfs(path, options):
    """Mounts a tmpfs at ``path``; the reason it cannot be done here, or None."""
    if not sys.platform.startswith("linux"):
        return "tmpfs mounts need Linux"
    if os.geteuid() != 0:
        return "mounting a small filesystem needs root"
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"mount -t tmpfs failed here: {proc.stderr.strip()}"
    return None


@pytest.fixture
def mounts():
    mounted = []

    def mount(path, options):
        reason = _mount_tmpfs(path, options)
        if reason:
            pytest.skip(reason)
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_real_full_disk_stops_with_the_message(tmp_path, reference, mounts):
    """A tmpfs holding two checkpoints and a little more: TensorStore's own error (a
    ValueError RESOURCE_EXHAUSTED from its writer threads) becomes the documented message."""
    size = sum(f.stat().st_size for f in (reference / "checkpoints" / "3").rglob("*")
               if f.is_file())
    workdir = tmp_path / "small"
    mounts(workdir, f"size={int(2.5 * size) + 64 * 1024}")
    rc, err = _faulty(workdir, 10**9, "--config.train.num_steps=30")  # no injected fault
    assert rc == 1, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert message and "Could not write checkpoint" in message[0], err[-3000:]
    failed = int(message[0].split("Could not write checkpoint ")[1].split()[0])
    last = int(message[0].split("last complete checkpoint (")[1].split(")")[0])
    assert failed % 3 == 0 and last == failed - 3 and last >= 3
    assert max(_logged_steps(workdir)) <= failed + 1
    assert len(err.splitlines()) < 400, "the log is flooded"
    _assert_same(restore_tree(workdir, last), restore_tree(reference, last))


def test_a_read_only_checkpoint_directory_exits_promptly(tmp_path, mounts):
    mounts(tmp_path / "checkpoints", "ro,size=1m")
    t0 = time.time()
    proc = launch(*FLAGS, f"--workdir={tmp_path}", devices=1, timeout=PROMPT, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: Could not write checkpoint" in proc.stderr
    assert "Read-only file system" in proc.stderr
    assert time.time() - t0 < PROMPT


def test_a_checkpoints_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    proc = launch(*FLAGS, f"--workdir={tmp_path}", devices=1, timeout=PROMPT, check=False)
    assert proc.returncode == 1
    assert "it is a file, not a directory" in proc.stderr
    assert (tmp_path / "checkpoints").read_text() == "not a directory"


def test_sample_and_eval_on_a_read_only_workdir_fail_before_any_work(tmp_path, mounts):
    from diffusion_jax.training import evaluate, train

    from helpers import toy_config

    mounts(tmp_path / "ro", "size=4m")
    config = toy_config()
    config.train.num_steps = 3
    train.train_and_evaluate(config, tmp_path / "ro")
    subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")], check=True)
    for run in (evaluate.sample_from_checkpoint, evaluate.evaluate_checkpoint):
        with pytest.raises(ValueError, match=r"The workdir .* is not writable \(OSError: \[Errno 30\]"):
            run(config, tmp_path / "ro")
