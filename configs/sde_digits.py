r"""A score SDE on scikit-learn's embedded digits: continuous-time DSM, minutes on a CPU.

Run:
  python launch.py --config=configs/sde_digits.py --workdir=runs/sde_digits
  python launch.py --config=configs/sde_digits.py --workdir=runs/sde_digits --mode=sample \
      --config.sample.sampler=ode          # or pc (default), euler_maruyama
  python launch.py --config=configs/sde_digits.py --workdir=runs/sde_digits --mode=eval

Model: the small U-Net of configs/digits.py (ch 32, ch_mult (1, 2), attention at 4x4)
predicting eps, trained by denoising score matching in continuous time (Song et al.
2021, Eq. 7; lambda = std^2, t ~ U(1e-5, 1)) on the VP SDE of DDPM's linear schedule with
T = 1000 (sde.name 'ddpm', `sde.DDPMVPSDE`: score_sde's VP SDE with beta in [0.1, 20] up
to O(1/N), exact at the DDPM steps). The network is then also a DDPM eps model, so
``--mode=eval`` reports the three likelihoods of one model: the DDPM bound
(``total_bpd``, `likelihood.calc_bpd_loop`), the importance-weighted estimate (``iw_bpd``,
K = eval.iw_samples) and the ODE bits/dim (``ode_bpd``, Hutchinson divergence, K =
eval.ode_dequant dequantization draws; a density, not a bound).

Expected (measured on a loaded 2-core CPU, experiments/likelihood_digits): see the README
section "Continuous time". ``:tiny`` is a smoke run (seconds).
"""

from diffusion_jax.training.config import default_config, digits_fields, shrink
from diffusion_jax.training.objectives.sde import add_sde_fields


def get_config(variant: str | None = None):
    config = digits_fields(add_sde_fields(default_config()))
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.sde.name = "ddpm"
    config.sde.parameterization = "eps"
    config.sample.snr = 0.01  # score_sde's VP setting for the Langevin corrector
    config.eval.num_examples = 256
    config.eval.batch_size = 64
    if variant == "tiny":
        shrink(config)
        config.model.attn_resolutions = (4,)
        config.diffusion.num_timesteps = 100
        config.sample.num_samples = 8
        config.eval.num_examples = 16
        config.eval.batch_size = 8
        config.eval.ode_rtol = config.eval.ode_atol = 1e-3
        config.sample.ode_rtol = config.sample.ode_atol = 1e-3
    elif variant:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'tiny' (or none).")
    return config
