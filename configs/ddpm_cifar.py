r"""DDPM on CIFAR-10 with the paper's settings (Ho et al. 2020, Sec. 4 and Appendix B).

Run:
  python launch.py --config=configs/ddpm_cifar.py --workdir=runs/ddpm_cifar
Smoke run on mocked data (seconds, any machine):
  python launch.py --config=configs/ddpm_cifar.py:tiny --config.data.mock=True \
      --workdir=/tmp/ddpm_cifar_tiny

Settings: T = 1000 linear betas 1e-4..0.02; eps prediction, L_simple, fixed variance
(sampling with beta_t, "fixedlarge", as the paper's CIFAR-10 samples); U-Net ch 128,
ch_mult (1, 2, 2, 2), 2 residual blocks, attention at 16x16, dropout 0.1 (35.7M
parameters); Adam lr 2e-4, 5000 warmup steps, gradient clipping at 1.0, batch 128,
EMA 0.9999, random horizontal flips, 800k steps.

Expected results (paper, Table 1): FID 3.17, Inception score 9.46, NLL <= 3.75 bits/dim
(test set; 3.70 train).

Runtime: the paper trained at 21 steps/s on a TPU v3-8, 800k steps in about 10.6 hours.
On a 2-core CPU one step of batch 128 takes tens of seconds (months for the full run): use
it only for the smoke run. See the README's Performance section for measured figures.

Data: TFDS cifar10 in array_record format in --config.data.data_dir (see README).
"""

from diffusion_jax.training.config import default_config, shrink


def get_config(variant: str | None = None):
    config = default_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    if variant == "tiny":
        shrink(config)
    elif variant:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'tiny' (or none).")
    return config
