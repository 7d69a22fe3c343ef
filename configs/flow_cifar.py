r"""Flow matching with the conditional OT path on CIFAR-10 (Lipman et al. 2023, Sec. 6.1
and Appendix E, Table 3), with the settings this U-Net can express.

Run:
  python launch.py --config=configs/flow_cifar.py --workdir=runs/flow_cifar
Smoke run on mocked data (seconds):
  python launch.py --config=configs/flow_cifar.py:tiny --config.data.mock=True \
      --workdir=/tmp/flow_cifar_tiny

Taken from the paper (as its Table 3 lists them): U-Net channels 256, channel multiples
(1, 2, 2, 2), 2 residual blocks, attention at 16x16, dropout 0; batch 256; lr 5e-4 with
45,000 warm-up steps; 391k iterations; sampling with an adaptive Dormand-Prince solve
(dopri5, rtol = atol = 1e-5). The paper decays the rate polynomially; this config decays
it by a cosine to 0 at the last step (the library's schedules are constant or cosine).
The U-Net is DDPM's (one attention head; the paper's has 4 heads of 64 channels).

Expected (the paper, Table 1, FM w/ OT): FID 6.35, NLL 2.99 bits/dim, 142 evaluations;
not run here (months of CPU time).
"""

from diffusion_jax.training.config import default_config, shrink
from diffusion_jax.training.objectives.flow import add_flow_fields


def get_config(variant: str | None = None):
    config = add_flow_fields(default_config())
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.model.ch = 256
    config.model.dropout = 0.0
    config.optim.lr = 5e-4
    config.optim.warmup_steps = 45_000
    config.optim.lr_schedule = "cosine"
    config.optim.decay_steps = 391_000
    config.train.batch_size = 256
    config.train.num_steps = 391_000
    config.sample.sampler = "dopri5"
    if variant == "tiny":
        shrink(config)
        config.model.ch = 32
        config.optim.decay_steps = 6
        config.sample.sampler, config.sample.num_steps = "heun", 2
        config.eval.flow_rtol = config.eval.flow_atol = 1e-3
    elif variant:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'tiny' (or none).")
    return config
