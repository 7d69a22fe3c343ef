"""Test setup: 8 fake CPU devices and strict rank promotion, before JAX is imported."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A compilation cache shared by this session and the launch.py processes its tests start:
# the same tiny models are compiled many times, and only the first compile should cost.
# The session's own cache is removed when the session ends; one set from outside is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dj_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# The oneDNN handlers (diffusion_jax.models.onednn) are built into a cache of the session.
if "DIFFUSION_JAX_CACHE" not in os.environ:
    os.environ["DIFFUSION_JAX_CACHE"] = tempfile.mkdtemp(prefix="dj_build_cache_")
    atexit.register(shutil.rmtree, os.environ["DIFFUSION_JAX_CACHE"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core, at most MAX_WORKERS. Compiling
    is mostly single-threaded and most tests are compile-bound, so two workers on two cores
    take about 60 % of one's time; each worker holds its own JAX runtime (about 1-2 GB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, cores or 1))


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def _contain_tempfiles(tmp_path_factory):
    """Temporary files of the session (and of the processes it starts) under pytest's own
    base temp, which pytest prunes: TFDS leaves an empty ``tmp*tfds`` directory in the
    system temp dir each time a builder of an unprepared data set is made offline."""
    root = str(tmp_path_factory.mktemp("tempfile"))
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = root, root
    yield
    tempfile.tempdir = saved_dir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
