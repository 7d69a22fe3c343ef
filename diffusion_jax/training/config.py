"""The default config every experiment config starts from (``configs/*.py``).

Fields (``ml_collections.ConfigDict``; ``launch.py`` locks it, so a misspelt override
fails):

- ``objective``: what is trained ('ddpm'; see `objectives.OBJECTIVES`).
- ``seed``: the root of every random stream (init, t and noise per step, data order).
- ``data``: see `diffusion_jax.data.pipeline` (name, split, data_dir, random_flip,
  image_size, resize, mock, mock_num_examples, prefetch).
- ``model``: ``name`` ('unet' | 'mlp'); U-Net fields ch, ch_mult, num_res_blocks,
  attn_resolutions, dropout, num_classes, dtype ('float32' | 'bfloat16' compute),
  cpu_kernels ('none': XLA's convolutions, the default; opt-in float32 CPU kernels
  'dilated' or 'onednn', the latter from the install extra ``.[onednn]``, checked at
  config time, `diffusion_jax.models.conv`), dropout_rng ('hash' | 'jax': how dropout
  masks are drawn, `diffusion_jax.models.dropout`); MLP fields features, activation,
  per_step_readout; DiT fields under ``model.dit`` (patch_size, hidden_size, depth,
  num_heads, mlp_ratio, remat (recompute block activations in the
  backward pass); `diffusion_jax.models.dit`, model.name 'dit').
- ``diffusion``: schedule ('linear' | 'cosine' | 'sohl_dickstein'), num_timesteps,
  mean_type, var_type, loss_type, decoder_type.
- ``optim``: lr, warmup_steps, lr_schedule ('constant' | 'cosine': decay to
  lr * final_lr_fraction at step decay_steps), grad_clip, beta1, beta2, eps,
  weight_decay, ema_decay, ema_warmup.
- ``train``: batch_size (global, over all devices and processes), num_steps, log_every,
  checkpoint_every, keep_checkpoints, sample_every (0: no sample grids),
  nan_policy ('stop' | 'skip'), restart_if_unreadable (start from step 0 when every
  checkpoint is damaged; they are moved to checkpoints_damaged/, never deleted), p_uncond
  (label dropout of classifier-free guidance; `objectives.conditioning`).
- ``mesh``: data, fsdp: the device mesh's axis sizes (data = -1: the devices not in
  fsdp; fsdp = 1: data parallel), min_shard_size (arrays with fewer elements stay
  replicated); see `diffusion_jax.training.mesh` and `.sharding`.
- ``sample``: sampler ('ancestral' | 'ddim' | 'dpm_solver++'), num_steps, spacing (the
  DPM-Solver++ grid: 'logsnr' | 'time_uniform' | 'time_quadratic'), num_samples,
  clip_denoised, grid_upscale, batch_size (``--mode=sample``: samples per compiled call),
  guidance (w of classifier-free guidance) and guidance_convention ('ho_salimans' | 'lerp').
- ``dpm2015``: the 2015 paper's objectives (schedule, beta_1, baseline, mean_gain,
  prior_prob, kl_estimator, t_per_example, rbf_hidden, readout_basis); see
  `objectives.dpm2015`.
- ``eval`` (``--mode=eval``): split, num_examples (rounded down to whole global batches),
  batch_size (global), iw_samples (K of the importance-weighted estimate; 0 = off),
  clip_denoised.
- ``fid`` (``--mode=fid_stats`` / ``--mode=fid``, `sample_quality`): network
  ('inception' | 'digits'), weights (Inception .npz; default ``$DIFFUSION_JAX_INCEPTION``
  or ``~/.cache/diffusion_jax/pt_inception-2015-12-05.npz``), stats (the reference .npz;
  default ``workdir/fid_stats_{network}_{data}_{split}.npz``), split and num_examples (of
  the reference), num_samples (N), batch_size (feature batches), max_features (vectors
  kept for KID and precision/recall), kid_subsets, kid_subset_size.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "ddpm"

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"
    c.data.split = "train"
    c.data.data_dir = config_dict.placeholder(str)
    c.data.random_flip = False
    c.data.image_size = config_dict.placeholder(int)
    c.data.resize = "nearest"
    c.data.mock = False
    c.data.mock_num_examples = 128
    c.data.prefetch = 4

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1
    c.model.dropout_rng = "hash"
    c.model.cpu_kernels = "none"
    c.model.num_classes = config_dict.placeholder(int)
    c.model.dtype = "float32"
    c.model.features = (128, 128, 128)
    c.model.activation = "swish"
    c.model.per_step_readout = False
    c.model.dit = ml_collections.ConfigDict(dict(  # model.name 'dit': DiT-S/2 by default
        patch_size=2, hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0,
        remat=False))

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.mean_type = "eps"
    c.diffusion.var_type = "fixed_large"
    c.diffusion.loss_type = "mse"
    c.diffusion.decoder_type = "discretized"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.lr_schedule = "constant"  # or "cosine" (after the warmup)
    c.optim.decay_steps = 0  # cosine: the step where the decay ends (> warmup_steps)
    c.optim.final_lr_fraction = 0.0  # cosine: lr * this from decay_steps on
    c.optim.grad_clip = 1.0
    c.optim.beta1 = 0.9
    c.optim.beta2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.9999
    c.optim.ema_warmup = False

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    c.train.num_steps = 800_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 50_000
    c.train.nan_policy = "stop"
    c.train.restart_if_unreadable = False
    c.train.p_uncond = 0.0  # label dropout to the null class (classifier-free guidance)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2**14))

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ancestral"
    c.sample.num_steps = 1000
    c.sample.spacing = "logsnr"  # DPM-Solver++ grid: 'logsnr' | 'time_uniform' | 'time_quadratic'
    c.sample.num_samples = 64
    c.sample.clip_denoised = True
    c.sample.grid_upscale = 1
    c.sample.batch_size = 256
    c.sample.guidance = 0.0  # classifier-free guidance w (0: the conditional model)
    c.sample.guidance_convention = "ho_salimans"  # or 'lerp': guidance is s = 1 + w

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "test"
    c.eval.num_examples = 10_000
    c.eval.batch_size = 256
    c.eval.iw_samples = 0
    c.eval.clip_denoised = True

    c.fid = ml_collections.ConfigDict()
    c.fid.network = "inception"
    c.fid.weights = config_dict.placeholder(str)
    c.fid.stats = config_dict.placeholder(str)
    c.fid.split = "train"
    c.fid.num_examples = 50_000
    c.fid.num_samples = 50_000
    c.fid.batch_size = 200
    c.fid.max_features = 10_000
    c.fid.kid_subsets = 100
    c.fid.kid_subset_size = 1000

    # The 2015 paper's objectives (objective 'dpm2015_gaussian' | 'dpm2015_binomial'; see
    # training/objectives/dpm2015.py). T is diffusion.num_timesteps.
    c.dpm2015 = ml_collections.ConfigDict()
    c.dpm2015.schedule = "learned"  # Gaussian betas: 'learned' (Sec. 2.4.1) | 'fixed'
    c.dpm2015.beta_1 = 1e-3  # the fixed first Gaussian step's beta
    c.dpm2015.baseline = "sohl_dickstein"  # learned betas start here: or "geometric"
    c.dpm2015.mean_gain = False  # fixed per-step 1 / sqrt(1 - abar_{t-1}) on z_mu
    c.dpm2015.prior_prob = 0.5  # binomial prior B(p)
    c.dpm2015.kl_estimator = "all"  # 'all' KL terms per example | 'uniform' t ~ U[1, T)
    c.dpm2015.t_per_example = 1  # draws of t per example for 'uniform'
    c.dpm2015.rbf_hidden = 16  # units of the normalized RBF net (model.name 'rbf')
    c.dpm2015.readout_basis = 0  # MLP: 0 = free per-step readouts; K = K basis readouts
    return c


def digits_fields(c: ml_collections.ConfigDict, *, unet: bool = True
                  ) -> ml_collections.ConfigDict:
    """The settings every config on the embedded digits shares: the data, Adam 1e-3 with
    200 warm-up steps, EMA 0.999 (warmed up), batch 64, 2,500 steps, a 4x-enlarged grid
    of 100 samples at the end, and the offline digits FID (`diffusion_jax.metrics.digits`)
    of 500 samples; with ``unet``, the small U-Net of configs/digits.py (ch 32, ch_mult
    (1, 2), one residual block, attention at 4x4, no dropout)."""
    c.data.name = "digits"
    c.data.random_flip = False
    if unet:
        c.model.ch, c.model.ch_mult = 32, (1, 2)
        c.model.num_res_blocks, c.model.attn_resolutions = 1, (4,)
        c.model.dropout = 0.0
    c.optim.lr, c.optim.warmup_steps = 1e-3, 200
    c.optim.ema_decay, c.optim.ema_warmup = 0.999, True
    c.train.batch_size, c.train.num_steps = 64, 2500
    c.train.log_every, c.train.checkpoint_every = 100, 1000
    c.train.sample_every = 2500
    c.sample.num_samples, c.sample.grid_upscale = 100, 4
    c.fid.network, c.fid.split, c.fid.num_samples = "digits", "test", 500
    return c


def shrink(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``:tiny`` variant of any image config: a tiny U-Net, a few steps, tiny grids.

    For smoke runs (CI, a new machine): same code paths, minutes become seconds.
    """
    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.dropout = 0.0
    c.diffusion.num_timesteps = 50
    c.optim.warmup_steps = 2
    c.train.batch_size = 8
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.sample_every = 6
    c.sample.num_steps = 50
    c.sample.num_samples = 8
    c.sample.batch_size = 8
    c.eval.num_examples = 16
    c.eval.batch_size = 8
    c.data.mock_num_examples = 64
    c.fid.num_examples = 64
    c.fid.num_samples = 16
    c.fid.batch_size = 8
    return c
