r"""EDM (Karras et al. 2022) on scikit-learn's embedded digits: minutes on a CPU.

Run:
  python launch.py --config=configs/edm_digits.py --workdir=runs/edm_digits
  python launch.py --config=configs/edm_digits.py --workdir=runs/edm_digits --mode=sample \
      --config.sample.num_steps=18 --config.sample.S_churn=10   # Algorithm 2
  python launch.py --config=configs/edm_digits.py --workdir=runs/edm_digits --mode=eval

Model: the small U-Net of configs/digits.py (ch 32, ch_mult (1, 2), attention at 4x4) as
F inside EDM's preconditioning (sigma_data 0.5, the paper's; the digits in [-1, 1] have a
pixel std of about 0.6), log-normal training sigma (P_mean -1.2, P_std 1.2), Adam 1e-3,
EMA 0.999, batch 64, 2,500 steps; Heun sampling, 18 steps (35 evaluations), sigma in
[0.002, 80], rho 7. ``:tiny`` is a smoke run (seconds).

Expected: about the training time of configs/digits.py (6 minutes on a quiet 2-core CPU;
not measured for this config); recognisable digits in runs/edm_digits/samples/.
"""

from diffusion_jax.training.config import default_config, digits_fields, shrink
from diffusion_jax.training.objectives.edm import add_edm_fields


def get_config(variant: str | None = None):
    config = digits_fields(add_edm_fields(default_config()))
    config.eval.num_examples, config.eval.batch_size = 256, 64
    if variant == "tiny":
        shrink(config)  # grids of 8, evaluation of 16
        config.sample.num_steps = 4
    elif variant:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'tiny' (or none).")
    return config
