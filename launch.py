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

import sys

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax.training import mesh

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
    """Drops INFO records from Orbax (tens of lines per checkpoint); warnings still show."""

    def filter(self, record):
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
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
        run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError, FloatingPointError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
