r"""A VP score SDE on CIFAR-10 with score_sde's DDPM++-style settings, as far as the U-Net here
allows. For a GPU box (days on one GPU; not a CPU job).

Run:
  python launch.py --config=configs/sde_cifar.py --workdir=runs/sde_cifar
  python launch.py --config=configs/sde_cifar.py --workdir=runs/sde_cifar --mode=eval

Settings from Song et al. 2021 (arXiv:2011.13456), Appendix H and score_sde's
``configs/vp/cifar10_ddpmpp_continuous.py``: VP SDE, beta in [0.1, 20], N = 1000,
continuous training with t ~ U(1e-5, 1) and reduce_mean, eps outputs (score_sde divides
its network output by std: the same), Adam lr 2e-4 with 5000 warm-up steps, grad clip 1,
EMA 0.9999, batch 128, 1.3M steps (here 800k, DDPM's schedule length), random flips,
dropout 0.1; sampling with the Euler-Maruyama predictor and no corrector (their VP
default); likelihood with Hutchinson probes, rtol = atol = 1e-5, eps = 1e-5.

Deviations: the network is this project's DDPM U-Net (ch 128, ch_mult (1, 2, 2, 2), two
residual blocks, attention at 16x16; 35.7M parameters), not NCSN++/DDPM++ (no
BigGAN-style up/down sampling, no skip rescaling, 2 rather than 4 residual blocks); it
sees t (N - 1) through DDPM's sinusoidal embedding, as score_sde's DDPM++ does.

Expected (from the paper, not reproduced here): DDPM++ cont. (VP) FID 3.01 (PC) and
2.99 bits/dim with the ODE likelihood (Table 2 / 3; 2.92 with the deep variant at
likelihood weighting: Song, Durkan, Murray, Ermon 2021, Table 2). With this smaller
U-Net, expect DDPM's own figures as the reference: FID about 3.2, ODE bits/dim near 3.0.
"""

from diffusion_jax.training.config import default_config, shrink
from diffusion_jax.training.objectives.sde import add_sde_fields


def get_config(variant: str | None = None):
    config = add_sde_fields(default_config())
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.sde.name = "vpsde"
    config.sde.beta_min, config.sde.beta_max, config.sde.num_scales = 0.1, 20.0, 1000
    config.sde.parameterization = "eps"
    config.sde.reduce_mean = True
    config.sample.sampler = "euler_maruyama"
    config.sample.corrector = "none"
    config.eval.ode_divergence = "hutchinson"
    if variant == "tiny":
        shrink(config)
        config.sde.num_scales = 50
        config.sample.num_samples = 8
    elif variant:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'tiny' (or none).")
    return config
