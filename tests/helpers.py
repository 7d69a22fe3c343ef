"""Shared helpers of the training tests: configs, launch.py in a subprocess, checkpoints."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOY = str(ROOT / "tests" / "configs" / "toy_mlp.py")


def load_config(path, variant=None):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def toy_config():
    return load_config(TOY)


def tiny_cifar_config():
    config = load_config(ROOT / "configs" / "ddpm_cifar.py", "tiny")
    config.data.mock = True
    config.train.sample_every = 0
    return config


# launch.py flags giving tiny_cifar_config's U-Net one level and no attention, for tests
# whose subject (data parallelism, resume, a run's files) does not depend on the U-Net's
# depth: compile time does.
ONE_LEVEL_FLAGS = ("--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()")


def one_level_cifar_config():
    config = tiny_cifar_config()
    config.model.ch_mult, config.model.attn_resolutions = (1,), ()
    return config


def launch_env(devices=8, **extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


def launch_cmd(*args):
    return [sys.executable, "-u", str(ROOT / "launch.py"), *args]


def launch(*args, devices=8, timeout=600, check=True):
    """Runs launch.py to completion; returns the CompletedProcess."""
    proc = subprocess.run(
        launch_cmd(*args), cwd=ROOT, env=launch_env(devices), capture_output=True, text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def restore_tree(workdir, step):
    """The whole saved train state of ``step`` as NumPy arrays (any device layout)."""
    manager = ocp.CheckpointManager(
        pathlib.Path(workdir) / "checkpoints", item_handlers=ocp.StandardCheckpointHandler()
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        manager.item_metadata(step).tree,
    )
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    manager.close()
    return jax.tree.map(np.asarray, restored)


def onednn_skip_reason():
    """Why the oneDNN convolutions cannot be tested here, or None. Skipped only where
    oneDNN cannot be installed (not x86_64 Linux), no C++ compiler exists, or the onednn
    extra is not installed; otherwise a failure to build is a test failure."""
    import platform
    import shutil

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "the oneDNN wheels are installed on x86_64 Linux only"
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        return "no C++ compiler: the oneDNN handlers are compiled on first use"
    import importlib.metadata

    try:
        importlib.metadata.version("onednn-devel-cpu-gomp")
    except importlib.metadata.PackageNotFoundError:
        return 'the onednn extra is not installed (pip install -e ".[onednn]")'
    return None
