r"""A diffusion transformer (DiT-B/2, Peebles & Xie 2023) on CIFAR-10 pixels.

Run:
  python launch.py --config=configs/dit_cifar.py --workdir=runs/dit_cifar
Smoke run on mocked data (a 2-block DiT, seconds, any machine):
  python launch.py --config=configs/dit_cifar.py:tiny --config.data.mock=True \
      --workdir=/tmp/dit_cifar_tiny
Larger models or patches: --config.model.dit.patch_size=4 (64 tokens instead of 256),
or the fields of `diffusion_jax.models.dit.dit_size_kwargs('DiT-L/2')`. On several devices,
--config.mesh.fsdp=N shards parameters and optimizer state over N devices.

Settings: pixel space (the paper works on 32x32x4 VAE latents of 256x256 images; CIFAR's
32x32x3 pixels give the same 256 tokens with patch 2). DiT-B/2: 12 adaLN-Zero blocks,
hidden 768, 12 heads (about 130M parameters); class-conditional on the 10 labels with
label dropout 0.1 (a null class for classifier-free guidance); learned sigma
(var_type 'learned_range', improved DDPM's hybrid loss, as in the paper); linear betas,
T = 1000; AdamW lr 1e-4 without weight decay or warmup, batch 256, EMA 0.9999, random
flips; bfloat16 compute with float32 parameters.

Expected: the paper reports no CIFAR-10 figure; its ImageNet-256 DiT-B/2 reaches FID 43.5
(no guidance) after 400k steps. On CIFAR-10 expect recognisable class-conditional samples
after some 100k steps; no FID figure from this config has been measured yet.

Runtime: one step of batch 256 of DiT-B/2 is about 2.9 TFLOPs (forward and backward): a
fraction of a second on a current accelerator; on a 2-core CPU use only the smoke run.

Data: TFDS cifar10 in array_record format in --config.data.data_dir (see README).
"""

from diffusion_jax.training.config import default_config, shrink


def get_config(variant: str | None = None):
    config = default_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.model.name = "dit"
    config.model.dtype = "bfloat16"
    config.model.num_classes = 10
    config.model.dit.update(dict(patch_size=2, hidden_size=768, depth=12, num_heads=12,
                                 mlp_ratio=4.0))
    config.train.p_uncond = 0.1  # label dropout to the null class (classifier-free guidance)
    config.diffusion.schedule = "linear"
    config.diffusion.var_type = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0
    config.optim.ema_decay = 0.9999
    config.train.batch_size = 256
    config.train.num_steps = 400_000
    config.sample.sampler = "ddim"
    config.sample.num_steps = 250
    if variant == "tiny":
        shrink(config)
        config.model.dit.update(dict(hidden_size=64, depth=2, num_heads=4))
    elif variant:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'tiny' (or none).")
    return config
