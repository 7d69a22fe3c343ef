"""Stopping a run: Ctrl-C saves and says so; SIGTERM during setup exits 0; SIGTERM on one
of two processes makes both save the same step (JAX's preemption sync point, no
collective in the loop)."""

import json
import pathlib
import signal
import socket
import subprocess
import time

from helpers import ROOT, TOY, launch_cmd, launch_env

FLAGS = [f"--config={TOY}", "--config.model.features=(256,256)",
         "--config.train.num_steps=100000", "--config.train.log_every=5",
         "--config.train.checkpoint_every=100000"]


def _start(workdir, *extra, devices=1):
    return subprocess.Popen(
        launch_cmd(*FLAGS, f"--workdir={workdir}", *extra), cwd=ROOT,
        env=launch_env(devices), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_step(workdir, step, proc, timeout=180):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        lines = path.read_text().splitlines() if path.exists() else []
        if lines and json.loads(lines[-1])["step"] >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def _complete_steps(workdir):
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())


def test_ctrl_c_saves_the_current_step_and_exits_non_zero_with_a_message(tmp_path):
    proc = _start(tmp_path)
    _wait_for_step(tmp_path, 20, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("interrupted: ")]
    assert line and "Interrupted (Ctrl-C) at step" in line[0], err[-3000:]
    step = int(line[0].split("at step ")[1].split(";")[0])
    assert f"saved checkpoint {step}. Run the same command to resume" in line[0]
    assert step >= 20 and _complete_steps(tmp_path) == [step]
    assert "Traceback" not in err


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    proc = _start(tmp_path)
    _wait_for_step(tmp_path, 10, proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0


def test_sigterm_during_setup_exits_0(tmp_path):
    proc = _start(tmp_path)
    for line in proc.stderr:  # setup: the model is built, the train step not yet compiled
        if "Objective ddpm" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in err
    # Nothing, or the few steps done before the signal arrived, was saved.
    assert not (tmp_path / "checkpoints").exists() or max(_complete_steps(tmp_path) or [0]) <= 5


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sigterm_on_one_of_two_processes_saves_the_same_step_on_both(tmp_path):
    port = _free_port()
    procs = [_start(tmp_path, "--config.train.batch_size=8",
                    f"--coordinator_address=localhost:{port}", "--num_processes=2",
                    f"--process_id={i}", "--heartbeat_timeout_seconds=30") for i in range(2)]
    try:
        _wait_for_step(tmp_path, 20, procs[0])
        procs[1].send_signal(signal.SIGTERM)  # only the second process gets the notice
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    saved = []
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
        line = [x for x in err.splitlines() if "after SIGTERM" in x]
        assert line, err[-3000:]
        saved.append(int(line[0].split("Saved step ")[1].split()[0]))
    assert saved[0] == saved[1] >= 20
    assert _complete_steps(tmp_path) == [saved[0]]
