"""Training objectives: one module per family and a registry of them by name.

- `ddpm`: ``ddpm`` (Ho et al. 2020 and improved DDPM's mean / variance / loss types);
- `dpm2015`: ``dpm2015_gaussian``, ``dpm2015_binomial`` (Sohl-Dickstein et al. 2015);
- `sde`: ``sde`` (continuous-time score matching, Song et al. 2021);
- `edm`: ``edm`` (Karras et al. 2022); `flow`: ``flow`` (flow matching, Lipman et al. 2023).

`conditioning` holds the class labels and classifier-free guidance shared by the families.

Each factory takes ``(config, info)`` and returns an `Objective` (see `base`). Only this
registry imports the families; the training system imports only the registry, so the
families may import the math, the models and the training helpers without a cycle.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from diffusion_jax.gaussian import check_choice
from diffusion_jax.training.objectives import ddpm, dpm2015, edm, flow, sde
from diffusion_jax.training.objectives.base import Objective, data_key, model_fn_for
from diffusion_jax.training.objectives.ddpm import ddpm_objective

__all__ = ["OBJECTIVES", "Objective", "create_objective", "data_key", "ddpm_objective",
           "model_fn_for"]

OBJECTIVES: dict[str, Callable[[ml_collections.ConfigDict, Any], Objective]] = {
    "ddpm": ddpm.ddpm_objective,
    "dpm2015_gaussian": dpm2015.gaussian_objective,
    "dpm2015_binomial": dpm2015.binomial_objective,
    "sde": sde.sde_objective,
    "edm": edm.edm_objective,
    "flow": flow.flow_objective,
}


def create_objective(config: ml_collections.ConfigDict, info) -> Objective:
    """The objective named by ``config.objective`` (one of `OBJECTIVES`)."""
    check_choice("objective", config.objective, tuple(OBJECTIVES))
    return OBJECTIVES[config.objective](config, info)
