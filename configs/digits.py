r"""DDPM on scikit-learn's embedded digits: real data, no download, minutes on a CPU.

Run (the README's main job):
  python launch.py --config=configs/digits.py --workdir=runs/digits

Data: the 1,797 8x8 handwritten digits that ship with scikit-learn (17 grey levels),
first 1,500 for training; kept at their native 8x8 (see diffusion_jax/data/embedded.py).
Model: a small U-Net (ch 32, ch_mult (1, 2), 1 residual block, attention at 4x4), eps
prediction with L_simple, cosine schedule with T = 1000, Adam 1e-3 with warmup,
EMA 0.999 (with warm-up), batch 64, 2,500 steps.

Expected: on a 2-core CPU about 6 minutes of training; the sample grid
(runs/digits/samples/ema_samples_*.png, enlarged 4x) shows recognisable digits 0-9,
and the log ends with the digits FID of 500 final samples (fid.num_samples; the grid
shows the first 100) against a random half of the training digits, next to its floor
(500 digits of the other half); see the README for figures.
Sample quality later: --mode=fid_stats (held-out digits), then --mode=fid.
"""

from diffusion_jax.training.config import default_config, digits_fields, shrink


def get_config(variant: str | None = None):
    config = digits_fields(default_config())
    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 1000
    config.diffusion.var_type = "fixed_large"
    if variant == "tiny":
        shrink(config)
        config.model.ch_mult = (1, 2)
        config.model.attn_resolutions = (4,)
    elif variant:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'tiny' (or none).")
    return config
