r"""Entry point: train, sample or evaluate a diffusion model from a config file.

  python launch.py --config=configs/digits.py --workdir=runs/digits
  python launch.py --config=configs/ddpm_cifar.py --workdir=DIR --config.optim.lr=1e-4
  python launch.py --config=configs/digits.py --workdir=runs/digits --mode=sample \
      --config.sample.sampler=ddim --config.sample.num_steps=50
  python launch.py --config=configs/digits.py --workdir=runs/digits --mode=eval
  python launch.py --config=configs/ddpm_cifar.py --workdir=DIR --mode=fid_stats
  python launch.py --config=configs/ddpm_cifar.py --workdir=DIR --mode=fid \
      --config.sample.sampler=ddim --config.sample.num_steps=100

Multi-host (each process runs the same command with its own --process_id):
  python launch.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
On Cloud TPU pods and SLURM clusters, --distributed lets JAX find the cluster itself.
"""

import os
import sys
import threading
import time
import traceback

import logging as py_logging

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from diffusion_jax.training import mesh, preemption

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file; `path:variant` picks a variant (e.g. `:tiny`).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "sample", "eval", "fid_stats", "fid"],
    "train: train or resume; sample: draw config.sample.num_samples samples from the latest "
    "checkpoint's EMA parameters; eval: test-set bits/dim of the latest checkpoint; "
    "fid_stats: feature statistics of config.fid.split; fid: FID, KID, IS and "
    "precision/recall of config.fid.num_samples samples against them.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() and let JAX find the cluster."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100,
    "Multi-process: a process silent this long is declared dead; the others stop with an "
    "error instead of hanging.",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
    """Drops INFO records from Orbax (tens of lines per checkpoint); its warnings and
    errors still show, without their tracebacks (a failed save is reported once, by the
    training loop, with its cause)."""

    def filter(self, record):
        if "/orbax/" not in record.pathname:
            return True
        if record.levelno >= py_logging.ERROR and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return record.levelno >= py_logging.WARNING


def _parse_flags(argv):
    """absl's flag parsing, with a config file that cannot be loaded (a syntax error, no
    ``get_config``, an error inside it) reported in one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - filtered to errors of the config file below
        where = _config_path(argv)
        frames = [os.path.abspath(f.filename) for f in traceback.extract_tb(e.__traceback__)]
        in_file = isinstance(e, SyntaxError) or os.path.abspath(where) in frames or (
            isinstance(e, AttributeError) and "get_config" in str(e))
        if not in_file:
            raise
        print(f"error: the config file {where} could not be loaded: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


def _config_path(argv) -> str:
    value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
    return value.split(":", 1)[0]


def main(argv):
    if _MODE.value == "train":
        preemption.record_early_signals()
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if not isinstance(config, ml_collections.ConfigDict):
        error = getattr(config, "__dict__", {}).get("_error")  # ml_collections' stand-in for a failed load
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        print(f"error: get_config() in {_config_path(sys.argv)} must return an "
              f"ml_collections.ConfigDict; it returned {type(config).__name__}.",
              file=sys.stderr)
        sys.exit(1)
    mesh.initialize_distributed(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, auto=_DISTRIBUTED.value,
        heartbeat_timeout_seconds=_HEARTBEAT.value,
    )
    from diffusion_jax.training import evaluate, sample_quality, train

    run = {
        "train": train.train_and_evaluate,
        "sample": evaluate.sample_from_checkpoint,
        "eval": evaluate.evaluate_checkpoint,
        "fid_stats": sample_quality.compute_reference_statistics,
        "fid": sample_quality.fid_of_checkpoint,
    }[_MODE.value]
    try:
        run(config, _WORKDIR.value)
    except (ValueError, OSError, FloatingPointError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        print(f"error: {e}", file=sys.stderr)
        _exit_promptly(1)
    except preemption.Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        _exit_promptly(130)


def _exit_promptly(code: int, grace_seconds: float = 5.0) -> None:
    """Exits with ``code`` even if a library thread still waits for something that will
    never come (Orbax's save threads wait up to minutes for a write that already
    failed): threads get ``grace_seconds`` to finish, then the process ends."""
    deadline = time.monotonic() + grace_seconds
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - some libraries' threads raise on a timeout
                pass
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    if stuck:
        logging.warning("Exiting without waiting for library threads %s.", stuck)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
