r"""The 2015 paper's binary heartbeat (Sohl-Dickstein et al. 2015, Appendix D.1.2, Table 1).

Run:
  python launch.py --config=configs/heartbeat.py --workdir=runs/heartbeat
  python experiments/dpm2015/run.py          # trains both experiments, evaluates, plots

Data: sequences of 20 bins with a 1 in every 5th bin, the phase uniform over the first
five (`diffusion_jax.data.toy`): 5 equally likely sequences, so the true log-likelihood is
log2(1/5) = -2.322 bits per sequence.
Model: binomial diffusion with T = 2000 steps toward Bernoulli(0.2) (the data's mean
activity), the schedule beta_t = 1 / (T - t + 1); reverse rates f_b from an MLP with three
hidden layers of 50 sigmoid units shared over time and a readout per step, each readout a
combination of 64 basis readouts smooth in t (`models.mlp.temporal_basis`, the "temporal
basis" of the paper's published code), so every example also trains the readouts of its
neighbouring steps. The sigmoid units are centred: each passes on sigmoid(a) - 1/2
(`models.mlp.centered_sigmoid`), which computes exactly the functions plain sigmoid units
do (the next layer's bias absorbs the 1/2) but which Adam trains far faster. Every one of
the T - 1 KL terms of Eq. 14 is evaluated for every example of a batch (the network runs on
(T - 1) x 16 rows per step); Adam at 3e-2 with a cosine decay.

Evaluate (K and K - L_null in bits with standard errors, on sequences no training batch
used; appended to metrics.jsonl):
  python launch.py --config=configs/heartbeat.py --workdir=runs/heartbeat --mode=eval

Paper: K = -2.414 bits per sequence on held-out data (K - L_null 12.024 bits). Measured
here (20,000 steps, 25 min on a 2-core CPU): K = -2.388 +- 0.002 bits per sequence,
K - L_null = 12.051; a perfect network with these factorized kernels would score -2.361. See
experiments/dpm2015/results.md. ``:sigmoid`` is the same training with plain (uncentred)
sigmoid units: K = -2.589 +- 0.003 in 24 minutes. ``:free`` has plain sigmoid units and
a free readout matrix per step (1999 of them), which needs the smaller learning rate 3e-3:
K = -2.79 in 25 minutes.
``:tiny`` is a smoke test (seconds).
"""

from diffusion_jax.training.config import default_config


def get_config(variant: str | None = None):
    c = default_config()
    c.objective = "dpm2015_binomial"
    c.data.name = "heartbeat"
    c.data.prefetch = 2
    c.model.name = "mlp"
    c.model.features = (50, 50, 50)
    # Sigmoid units, centred (sigmoid(x) - 1/2, `models.mlp.centered_sigmoid`): the same
    # functions as plain sigmoid units, far faster for Adam to train (``:sigmoid``).
    c.model.activation = "centered_sigmoid"
    c.diffusion.num_timesteps = 2000
    c.dpm2015.prior_prob = 0.2
    c.dpm2015.kl_estimator = "all"
    # The readout of step t is sum_k phi_k(t) V_k over 64 basis readouts (the paper's
    # published code's temporal basis) instead of a free matrix per step.
    c.dpm2015.readout_basis = 64
    c.optim.lr = 3e-2
    c.optim.warmup_steps = 100
    c.optim.lr_schedule = "cosine"
    c.optim.final_lr_fraction = 0.05
    c.optim.grad_clip = 1.0
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True
    c.train.batch_size = 16
    c.train.num_steps = 20_000
    c.train.log_every = 500
    c.train.checkpoint_every = 2500
    c.train.sample_every = 0
    # --mode=eval: K and K - L_null with standard errors on 2000 test-split sequences.
    c.eval.num_examples = 2000
    c.eval.batch_size = 400
    if variant == "sigmoid":
        # Plain (uncentred) sigmoid units, everything else as the default.
        c.model.activation = "sigmoid"
    elif variant == "free":
        # Plain sigmoid units and a free readout matrix per step (1999 of them), at the
        # learning rate they tolerate.
        c.model.activation = "sigmoid"
        c.dpm2015.readout_basis = 0
        c.optim.lr = 3e-3
    elif variant == "tiny":
        c.dpm2015.readout_basis = 0
        c.model.features = (16, 16)
        c.diffusion.num_timesteps = 20
        c.optim.lr = 1e-2
        c.optim.warmup_steps = 0
        c.train.batch_size = 64
        c.train.num_steps = 200
        c.train.log_every = 50
        c.train.checkpoint_every = 100
    elif variant:
        raise ValueError(
            f"Unknown config variant {variant!r}; valid: 'sigmoid', 'free', 'tiny' (or none).")
    c.optim.decay_steps = c.train.num_steps
    return c
