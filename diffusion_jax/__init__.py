"""diffusion_jax: diffusion probabilistic models in JAX.

The math modules (``schedules``, ``gaussian``, ``losses``, ``likelihood``, ``sampling``,
``dpm2015``, ``binomial``) are pure functions of arrays and import neither models,
training code nor data pipelines, so other JAX projects can use them alone::

    import diffusion_jax as dj
    schedule = dj.schedules.get_schedule("linear", 1000)
    x_t = dj.gaussian.q_sample(schedule, x_start, t, key=key)
"""

from diffusion_jax import binomial, dpm2015, gaussian, likelihood, losses, sampling, schedules
from diffusion_jax.schedules import Schedule

__all__ = [
    "Schedule", "binomial", "dpm2015", "gaussian", "likelihood", "losses", "sampling", "schedules",
]
__version__ = "0.1.0"
