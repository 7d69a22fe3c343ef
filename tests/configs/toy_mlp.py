"""A toy config for tests: an MLP on a 2-D Gaussian mixture, compiled in seconds."""

from diffusion_jax.training.config import default_config


def get_config(variant=None):
    del variant
    c = default_config()
    c.data.name = "gaussian_mixture"
    c.data.prefetch = 2
    c.model.name = "mlp"
    c.model.features = (32, 32)
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 20
    c.diffusion.decoder_type = "gaussian"
    c.diffusion.var_type = "fixed_small"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.batch_size = 16
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 0
    c.sample.num_steps = 20
    return c
