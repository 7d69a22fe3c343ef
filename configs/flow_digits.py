r"""Flow matching (conditional OT path) on scikit-learn's embedded digits; with ``:guided``
a class-conditional model with label dropout, sampled with classifier-free guidance.

Run:
  python launch.py --config=configs/flow_digits.py --workdir=runs/flow_digits
  python launch.py --config=configs/flow_digits.py:guided --workdir=runs/flow_digits_guided
  python launch.py --config=configs/flow_digits.py:guided --workdir=runs/flow_digits_guided \
      --mode=sample --config.sample.guidance=3      # w of Ho & Salimans (0: conditional)
  python launch.py --config=configs/flow_digits.py --workdir=runs/flow_digits --mode=eval

Model: the small U-Net of configs/digits.py regressing the velocity x_1 - x_0 (Lipman et
al. 2023, Eq. 23; noise at t = 0, data at t = 1), the network's time input 999 t; Adam 1e-3,
EMA 0.999, batch 64, 2,500 steps. Sampling: Heun, 25 steps (50 evaluations); ``--config.
sample.sampler=tsit5`` for the adaptive solve. ``--mode=eval``: the velocity loss and the
flow's bits/dim (Hutchinson divergence, uniform dequantization). ``:guided``: model.
num_classes 10, train.p_uncond 0.2 (Ho & Salimans 2022), sample.guidance 1.0. ``:tiny``,
``:guided_tiny``: smoke runs (seconds).

Expected: about the training time of configs/digits.py (not measured for this config);
for guidance's effect on digits see experiments/guidance_digits.py and the README.
"""

from diffusion_jax.training.config import default_config, digits_fields, shrink
from diffusion_jax.training.objectives.flow import add_flow_fields

VARIANTS = ("tiny", "guided", "guided_tiny")


def get_config(variant: str | None = None):
    config = digits_fields(add_flow_fields(default_config()))
    config.eval.num_examples, config.eval.batch_size = 256, 64
    if variant and variant not in VARIANTS:
        raise ValueError(f"Unknown config variant {variant!r}; valid: {list(VARIANTS)} (or none).")
    if variant in ("guided", "guided_tiny"):
        config.model.num_classes = 10
        config.train.p_uncond = 0.2
        config.sample.guidance = 1.0
    if variant in ("tiny", "guided_tiny"):
        shrink(config)  # grids of 8, evaluation of 16
        config.sample.num_steps = 2
        config.eval.flow_rtol = config.eval.flow_atol = 1e-3
    return config
