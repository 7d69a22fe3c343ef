"""Training: train state, the pure train step, mesh and shardings, checkpoints, the loop.

Importing this package imports Flax, Optax, Orbax and the data pipelines; the math
modules of `diffusion_jax` do not depend on it.
"""

from diffusion_jax.training.checkpoint import Checkpointer, IncompatibleCheckpointError
from diffusion_jax.training.objectives import Objective, create_objective
from diffusion_jax.training.state import TrainState, make_optimizer
from diffusion_jax.training.step import make_train_step
from diffusion_jax.training.train import NonFiniteLossError, train_and_evaluate

__all__ = [
    "Checkpointer",
    "IncompatibleCheckpointError",
    "NonFiniteLossError",
    "Objective",
    "TrainState",
    "create_objective",
    "make_optimizer",
    "make_train_step",
    "train_and_evaluate",
]
