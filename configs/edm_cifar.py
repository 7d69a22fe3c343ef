r"""EDM on CIFAR-10 with the paper's settings that this U-Net can express (Karras et al.
2022, Table 1 and Appendix F.1 / Table 7, "config F" for CIFAR-10 at 32x32).

Run:
  python launch.py --config=configs/edm_cifar.py --workdir=runs/edm_cifar
Smoke run on mocked data (seconds):
  python launch.py --config=configs/edm_cifar.py:tiny --config.data.mock=True \
      --workdir=/tmp/edm_cifar_tiny

Taken from the paper: the EDM preconditioning (sigma_data 0.5), log-normal sigma (P_mean
-1.2, P_std 1.2) and lambda(sigma); Adam lr 1e-3 (beta 0.9, 0.999, eps 1e-8) with a
linear warm-up over 10M images (19,531 steps here) and no decay; batch 512; 200M
training images (390,625 steps); dropout 0.13; EMA of half-life 0.5M images (per step
0.5 ** (512 / 5e5) = 0.99929); horizontal flips; Heun sampling with 18 steps (35
evaluations), sigma in [0.002, 80], rho 7.

Not expressible here (documented differences): the network is DDPM's U-Net (ch 128,
ch_mult (1, 2, 2, 2), 2 blocks, attention at 16x16; 35.7M parameters) rather than
DDPM++ (56M, 4 blocks per level, its own embedding and skip scaling); no non-leaking
augmentation (the paper's p = 0.12 with augmentation labels); no gradient clipping in
the paper (this config keeps the library's 1.0 off: grad_clip 0).

Expected (the paper, Table 2, with DDPM++ and augmentation): FID 1.97 unconditional at
35 evaluations. With this U-Net and no augmentation expect a worse FID; not run here
(months of CPU time; see the README's Performance section for step times).
"""

from diffusion_jax.training.config import default_config, shrink
from diffusion_jax.training.objectives.edm import add_edm_fields


def get_config(variant: str | None = None):
    config = add_edm_fields(default_config())
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.model.dropout = 0.13
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 19_531
    config.optim.grad_clip = 0.0
    config.optim.ema_decay = 0.99929
    config.train.batch_size = 512
    config.train.num_steps = 390_625
    if variant == "tiny":
        shrink(config)
        config.sample.num_steps = 4
    elif variant:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'tiny' (or none).")
    return config
