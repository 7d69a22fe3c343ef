"""Samplers compared on a 2-D Gaussian mixture whose density is known.

Trains a time-conditioned MLP (4 blocks of width 256, 0.54M parameters) on a ring of 8
equal 2-D Gaussians (``--data``: 'ring8', FFJORD's "8gaussians" halved, radius sqrt 2 and
component std sqrt 2 / 8 = 0.177, about unit variance per coordinate; or 'ring8_sharp',
radius 1.4 and std 0.1, `diffusion_jax.data.toy`'s default mixture) with improved DDPM's
L_hybrid (eps prediction with L_simple, learned_range log-variances with
the bound term; linear schedule, T = 1000), then samples from the same x_T with

- ancestral sampling over all T = 1000 steps with the model's learned variances (the
  reference), and with DDPM's two fixed variances (beta-tilde and beta) on its eps alone,
- DDIM (eta = 0) on a respaced schedule of N evenly spaced steps (improved DDPM spec 'N'),
- DPM-Solver++(2M) with N model evaluations on its log-SNR grid and on its time-quadratic
  grid (`sampling.dpm_solver_timesteps`), final denoising step,

- EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1, rho = 7) on the same
  eps network through `edm.DDPMPrecond` (NVlabs' iDDPMPrecond: sigma rounded to the
  schedule's steps), N = 5, 10, 18, 25 Heun steps = 9, 19, 35, 49 evaluations,
- the flow-matching ODE (conditional OT path, `diffusion_jax.flow`) of a second MLP of the
  same size trained by velocity regression for the same number of steps: Euler and Heun at
  10, 20, 50 evaluations and Tsit5 (adaptive, rtol = atol = 1e-5), from the same x_T,

for N = 10, 20, 50 (and DPM-Solver++ at 200, the limit of the probability-flow ODE), and
the score-SDE samplers on the schedule's VP SDE (`sde.DDPMVPSDE`, the eps network called
at float steps): PC (reverse diffusion + Langevin, snr 0.01), Euler-Maruyama, the
probability-flow ODE with Heun (50 steps) and with adaptive Tsit5 (rtol = atol = 1e-5;
its NFE in the "model evals" column). A last table compares the ODE log-likelihood
(exact divergence) of 2000 held-out points with their true log-density. ``--rows=sde``
runs the reference chain and these rows only. The
same samplers also run on the EXACT noise prediction of the mixture (its marginals are
Gaussian mixtures in closed form; reference: beta-tilde variances) and its exact velocity
on the OT path, which separates the solvers' error from the network's.

For each: the average TRUE log-density of the samples (nats per example, +- its standard
error), its relative difference to the reference chain's (+- the standard error of the
difference), the difference to the data's own average (a sampler matching the data has 0;
higher than the data means samples concentrated on the modes, not better samples), the
median, the share of samples off the modes (farther than 4 component stds from every
centre; the mixture itself puts exp(-8) = 0.034 % there), and the sliced Wasserstein-1
distance to a fresh data sample of the same size (256 random directions; the data-vs-data
row is the Monte Carlo floor). Writes markdown tables, a JSON file and a scatter plot to
``--outdir`` (an earlier run's are replaced only with ``--overwrite``).
``--rows=reference_and_dpm`` runs only the reference chain and DPM-Solver++ (the seed
study in the results' README).

Command, from the repository root (or after ``pip install -e .``); about 30 minutes on
2 CPU cores (three 1000-step ancestral chains of 50,000 samples take 18 of them):

    PYTHONPATH=. python experiments/sampler_table.py --outdir=/tmp/sampler_table

Measured (CPU, 50,000 samples per row; tables, plots and the reading of them in
``experiments/sampler_results/README.md``): DPM-Solver++(2M) at 20 steps on its
time-quadratic grid against the 1000-step chain with learned variances, relative
difference of the mean true log p (and in nats; s.e. about 0.005 nats):

    data           seed 0            seed 1            seed 2
    ring8          -0.2 % (-0.003)   +0.9 % (+0.012)   -0.1 % (-0.001)    of -1.46 to -1.48
    ring8_sharp    -3.6 % (-0.011)   -2.3 % (-0.007)   -10.2 % (-0.034)   of -0.31 to -0.34

On the sharper ring the 5 % allowance is 0.015 nats, about the 20-step solver's own error
with the exact eps (0.014 nats), and one training seed of three misses it; there, samples
stranded between the modes (log p below -8 nats each) decide the mean.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from diffusion_jax import edm, flow, gaussian, likelihood, losses, sampling, schedules
from diffusion_jax import sde as sde_lib
from diffusion_jax import sde_losses
from diffusion_jax.data import toy
from diffusion_jax.sampling import edm as edm_sampling
from diffusion_jax.sampling import flow as flow_sampling

STEP_COUNTS = (10, 20, 50)
EDM_HEUN_STEPS = (5, 10, 18, 25)  # 2 N - 1 = 9, 19, 35, 49 evaluations
FLOW_PATH = flow.CondOTPath()
FLOW_TIME_SCALE = 999.0  # the MLP sees flow time t in [0, 1] as 999 t, like DDPM's steps
OFF_MODE_STDS = 4.0
OUTPUTS = ("sampler_table.md", "sampler_table.json", "samples.png")
# Equal-weight 2-D Gaussians on a circle: (components, radius, component std).
# 'ring8': FFJORD's "8gaussians" (radius 4 and std 0.5, divided by 1.414 there and by
# sqrt 2 here) halved, to about unit variance per coordinate; 'ring8_sharp': radius 1.4,
# std 0.1 (std / radius 1/14 against 1/8), diffusion_jax.data.toy's default mixture.
DATASETS = {
    "ring8": (8, math.sqrt(2.0), math.sqrt(2.0) / 8.0),
    "ring8_sharp": (8, 1.4, 0.1),
}


class TimeMLP(nn.Module):
    """(x_t, t) -> eps: a sinusoidal embedding of t added to every hidden layer (DDPM)."""

    num_timesteps: int
    hidden: int = 128
    depth: int = 3
    out_dim: int = 2

    @nn.compact
    def __call__(self, x, t):
        half = 32
        freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
        angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
        temb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
        temb = nn.swish(nn.Dense(self.hidden)(temb))
        h = nn.Dense(self.hidden)(x)
        for _ in range(self.depth):
            h = nn.swish(h + nn.Dense(self.hidden)(temb))
            h = nn.Dense(self.hidden)(h)
        return nn.Dense(self.out_dim)(nn.swish(h))


def train(args, schedule, mixture):
    """Adam + cosine decay on L_hybrid (improved DDPM: L_simple for eps, the bound term for
    the interpolated log-variance, Gaussian decoder at t = 0) with fresh mixture samples
    each step; returns the EMA model, output (B, 4) = [eps, v]."""
    model = TimeMLP(schedule.num_timesteps, hidden=args.hidden, depth=args.depth, out_dim=4)
    init_key, key = jax.random.split(jax.random.key(args.seed))
    params = model.init(init_key, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))["params"]
    lr = optax.cosine_decay_schedule(args.lr, args.train_steps, alpha=0.05)
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)
    ema = params

    def apply(p, x_t, t):
        return model.apply({"params": p}, x_t, t)

    @jax.jit
    def step(params, opt_state, ema, x0, key):
        t_key, noise_key = jax.random.split(key)
        t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)

        def loss_fn(p):
            out = losses.training_losses(
                schedule, Partial(apply, p), x0, t, key=noise_key,
                mean_type="eps", var_type="learned_range", loss_type="hybrid",
                decoder_type="gaussian",
            )
            return jnp.mean(out["loss"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: args.ema * e + (1 - args.ema) * p, ema, params)
        return params, opt_state, ema, loss

    rng = np.random.default_rng(args.seed)
    start, running = time.time(), []
    for i in range(args.train_steps):
        x0 = jnp.asarray(mixture.sample(rng, args.batch_size))
        params, opt_state, ema, loss = step(params, opt_state, ema, x0, jax.random.fold_in(key, i))
        running.append(loss)
        if (i + 1) % max(args.train_steps // 5, 1) == 0:
            print(f"step {i + 1}: L_hybrid {float(jnp.mean(jnp.stack(running))):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            running = []
    # One function object for every call: the samplers compile once per shape.
    return Partial(apply, ema)


def train_flow(args, mixture):
    """The same MLP (output: the velocity) trained by conditional flow matching on the OT
    path (`flow.velocity_loss`, t ~ U[0, 1]), Adam + cosine decay, EMA; returns v(x, t)."""
    model = TimeMLP(1000, hidden=args.hidden, depth=args.depth, out_dim=2)
    init_key, key = jax.random.split(jax.random.key(args.seed + 10))
    params = model.init(init_key, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.float32))["params"]
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.train_steps, alpha=0.05))
    opt_state, ema = optimizer.init(params), params

    def apply(p, x, t):
        return model.apply({"params": p}, x, t * FLOW_TIME_SCALE)

    @jax.jit
    def step(params, opt_state, ema, x1, key):
        def loss_fn(p):
            return jnp.mean(flow.velocity_loss(FLOW_PATH, Partial(apply, p), x1,
                                               key=key)["loss"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: args.ema * e + (1 - args.ema) * p, ema, params)
        return params, opt_state, ema, loss

    rng = np.random.default_rng(args.seed + 10)
    start, running = time.time(), []
    for i in range(args.train_steps):
        x1 = jnp.asarray(mixture.sample(rng, args.batch_size))
        params, opt_state, ema, loss = step(params, opt_state, ema, x1, jax.random.fold_in(key, i))
        running.append(loss)
        if (i + 1) % max(args.train_steps // 5, 1) == 0:
            print(f"flow step {i + 1}: velocity loss {float(jnp.mean(jnp.stack(running))):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            running = []
    return Partial(apply, ema)  # one function object: the samplers compile once per shape


def exact_mixture_velocity(means, std, x, t):
    """E[x_1 - x_0 | x_t = x] on the OT path for an isotropic mixture of equal weights:
    component k gives x_t ~ N(t m_k, (t^2 s^2 + (1 - t)^2) I) and the Gaussian velocity
    m_k + (t s^2 - (1 - t)) / var (x - t m_k); weighted by the components' posteriors."""
    tt = t[:, None, None]
    var = jnp.square(tt) * std**2 + jnp.square(1.0 - tt)  # (B, 1, 1)
    diff = x[:, None, :] - tt * means[None]  # (B, K, D)
    weights = jax.nn.softmax(-jnp.sum(diff**2, -1, keepdims=True) / (2.0 * var), axis=1)
    velocity = means[None] + (tt * std**2 - (1.0 - tt)) / var * diff
    return jnp.sum(weights * velocity, axis=1)


def edm_and_flow_runs(schedule, eps_fn, velocity_fn, shape, x_T):
    """EDM Heun on the eps network (`edm.DDPMPrecond`) and the flow ODE, as run rows."""
    precond = edm.DDPMPrecond.from_alphas_cumprod(schedule.alphas_cumprod)
    lo, hi = precond.sigma_range
    denoiser = edm.denoiser_fn(precond, eps_fn)
    grid = np.asarray(precond.sigmas, np.float64)
    runs = [("EDM Heun (rho = 7)", 2 * n - 1, lambda n=n: edm_sampling.edm_sampler(
        denoiser, shape, x_T=x_T, num_steps=n, sigma_min=max(0.002, lo), sigma_max=min(80.0, hi),
        grid=grid)) for n in EDM_HEUN_STEPS]
    for solver, per_step in (("euler", 1), ("heun", 2)):
        runs += [(f"flow ODE (OT path), {solver}", n, lambda n=n, s=solver, k=per_step:
                  flow_sampling.sample_ode(velocity_fn, x0=x_T, solver=s, num_steps=n // k))
                 for n in STEP_COUNTS]
    runs.append(("flow ODE (OT path), tsit5", None, lambda: flow_sampling.sample_ode(
        velocity_fn, x0=x_T, solver="tsit5")))
    return runs


def sliced_wasserstein(a, b, *, num_directions=256, seed=0):
    """Mean over random unit directions of the 1-D Wasserstein-1 distance of projections."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((a.shape[1], num_directions))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    pa, pb = np.sort(a @ directions, axis=0), np.sort(b @ directions, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def exact_mixture_eps(means, std, alphas_cumprod, x_t, t):
    """E[eps | x_t] for an isotropic mixture: x_t ~ sum_k w_k N(sqrt(a) m_k, (a s^2 + 1 - a) I)
    (equal weights), eps = -sqrt(1 - a) grad log p_t(x_t)."""
    a = alphas_cumprod[t][:, None, None]  # (B, 1, 1)
    centres = jnp.sqrt(a) * means[None]  # (B, K, D)
    var = a * std**2 + 1.0 - a
    diff = centres - x_t[:, None, :]
    weights = jax.nn.softmax(-jnp.sum(diff**2, -1, keepdims=True) / (2.0 * var), axis=1)
    score = jnp.sum(weights * diff / var, axis=1)
    return -jnp.sqrt(1.0 - alphas_cumprod[t])[:, None] * score


def exact_mixture_eps_continuous(means, std, sde, x_t, s):
    """`exact_mixture_eps` at a float DDPM step s (the network's time under `sde.DDPMVPSDE`):
    abar of the schedule's VP SDE at t = (s + 1) / N."""
    alpha, _ = sde.marginal_coeffs((s + 1.0) / sde.N)
    return exact_mixture_eps(means, std, alpha**2, x_t, jnp.arange(x_t.shape[0]))


def _eps_part(model_fn, x_t, t):
    """The eps half of a learned-variance model's output."""
    return gaussian.split_model_output(model_fn(x_t, t), x_t, "learned_range")[0]


def run_samplers(args, schedule, model_fn, var_type, velocity_fn=None, sde_eps_fn=None):
    """[(sampler, model evaluations, samples float64 (n, 2), seconds)].

    The first row is the reference: ancestral sampling over all T steps with the model's
    own variances (``var_type``: learned_range for the trained MLP; beta-tilde for the exact
    eps, which has no variance output). The fixed variances of DDPM follow (for a model with
    learned variances, on its eps output alone), then DDIM and DPM-Solver++(2M) on both
    of its grids, EDM's Heun sampler on the eps output and the flow ODE of ``velocity_fn``
    (rows with steps None report the solver's evaluation count). Every sampler starts
    from the same x_T. ``args.rows ==
    'reference_and_dpm'`` keeps the reference chain and DPM-Solver++ alone.
    """
    shape = (args.num_samples, 2)
    kw = dict(mean_type="eps", var_type=var_type)
    key = jax.random.key(args.seed + 1)
    x_T = jax.random.normal(jax.random.key(args.seed + 3), shape)
    eps_fn = model_fn if var_type == "fixed_small" else Partial(_eps_part, model_fn)
    runs = [("ancestral" + (" (learned var)" if var_type != "fixed_small" else
                            " (beta-tilde var)"), schedule.num_timesteps,
             lambda: sampling.p_sample_loop(schedule, model_fn, shape, key=key, x_T=x_T, **kw))]
    every_row = args.rows == "all"
    fixed = ["fixed_large"] if var_type == "fixed_small" else ["fixed_small", "fixed_large"]
    for vt in fixed if every_row else ():
        name = {"fixed_small": "beta-tilde", "fixed_large": "beta"}[vt]
        runs.append((f"ancestral ({name} var)", schedule.num_timesteps,
                     lambda vt=vt: sampling.p_sample_loop(
                         schedule, eps_fn, shape, key=key, x_T=x_T, mean_type="eps",
                         var_type=vt)))
    for n in STEP_COUNTS if every_row else ():
        spaced, spaced_model = sampling.respace(schedule, model_fn, str(n))
        runs.append(("DDIM", n, lambda s=spaced, m=spaced_model: sampling.ddim_sample_loop(
            s, m, shape, key=key, x_T=x_T, **kw)))
    for spacing in ("logsnr", "time_quadratic") if args.rows != "sde" else ():
        for n in STEP_COUNTS + (200,):
            runs.append((f"DPM-Solver++(2M), {spacing}", n,
                         lambda n=n, sp=spacing: sampling.dpm_solver_pp_sample_loop(
                             schedule, model_fn, shape, num_steps=n, key=key, x_T=x_T,
                             spacing=sp, **kw)))
    if every_row:
        runs += edm_and_flow_runs(schedule, eps_fn, velocity_fn, shape, x_T)
    if args.rows in ("all", "sde"):
        runs += sde_runs(schedule, sde_eps_fn or eps_fn, shape, key, x_T)
    results = []
    for name, steps, fn in runs:
        start = time.time()
        out = jax.block_until_ready(fn())
        x = np.asarray(out["sample"], np.float64)
        if "nfe" in out:  # adaptive solvers report their evaluations
            steps = int(out["nfe"])
        results.append((name, steps, x, time.time() - start))
        print(f"  {name} {steps} steps: {time.time() - start:.1f} s", flush=True)
    return results


def sde_runs(schedule, eps_fn, shape, key, x_T):
    """The score-SDE samplers on the schedule's VP SDE (`sde.DDPMVPSDE`; the eps network
    called at float steps): PC (reverse diffusion + Langevin, snr 0.01, score_sde's VP
    setting), Euler-Maruyama, and the probability-flow ODE with Tsit5 (rtol = atol =
    1e-5; NFE as counted by the solve) and Heun (50 steps); Tweedie denoising at 1e-3."""
    sde = sde_lib.DDPMVPSDE.from_schedule(schedule)
    score = sde_losses.score_fn_from_model(sde, eps_fn, "eps")
    n = schedule.num_timesteps
    return [
        ("PC (reverse diffusion + Langevin)", 2 * n + 1, lambda: sampling.pc_sample(
            sde, score, shape, key=key, x_T=x_T, snr=0.01)),
        ("Euler-Maruyama", n + 1, lambda: sampling.pc_sample(
            sde, score, shape, key=key, x_T=x_T, predictor="euler_maruyama",
            corrector="none")),
        ("ODE, Heun", 101, lambda: sampling.ode_sample(
            sde, score, shape, x_T=x_T, solver="heun", num_steps=50)),
        ("ODE, Tsit5 (adaptive)", 0, lambda: sampling.ode_sample(sde, score, shape, x_T=x_T)),
    ]


def ode_loglik_rows(schedule, models, mixture, rng, num_points):
    """The ODE log-likelihood (exact divergence, Tsit5, rtol = atol = 1e-5) of held-out
    mixture samples against their true log-density, for each model."""
    x = mixture.sample(rng, num_points).astype(np.float32)
    true = mixture.log_prob(x.astype(np.float64))
    sde = sde_lib.DDPMVPSDE.from_schedule(schedule)
    lines = ["| model | mean ODE log p (nats) | mean true log p | mean abs(ODE - true) | "
             "mean NFE |", "|---|---:|---:|---:|---:|"]
    summary = {}
    for label, eps_fn in models:
        score = sde_losses.score_fn_from_model(sde, eps_fn, "eps")
        out = likelihood.ode_likelihood(sde, score, jnp.asarray(x))
        logp = np.asarray(out["logp"], np.float64)
        se = logp.std(ddof=1) / math.sqrt(logp.size)
        diff = np.abs(logp - true)
        summary[label] = dict(ode_logp=float(logp.mean()), ode_logp_se=float(se),
                              true_logp=float(true.mean()), mean_abs_diff=float(diff.mean()),
                              nfe=float(np.mean(out["nfe"])))
        lines.append(f"| {label} | {logp.mean():.4f} +- {se:.4f} | {true.mean():.4f} | "
                     f"{diff.mean():.4f} | {np.mean(out['nfe']):.0f} |")
    return "\n".join(lines), summary


def off_modes(x, mixture, num_stds=OFF_MODE_STDS):
    """Share of samples farther than ``num_stds`` component stds from every centre (a
    sample of the mixture itself lands there with probability exp(-num_stds^2 / 2))."""
    dist = np.linalg.norm(x[:, None, :] - mixture.means[None], axis=-1)
    return float(np.mean(np.min(dist / mixture.stds[None], axis=1) > num_stds))


def evaluate(results, mixture, data, fresh):
    """Rows of metrics; the first is the data itself."""
    rows = [{"sampler": "data (fresh sample)", "steps": 0, "x": data, "seconds": 0.0}]
    rows += [{"sampler": n, "steps": s, "x": x, "seconds": sec} for n, s, x, sec in results]
    for row in rows:
        logp = mixture.log_prob(row["x"])
        row.update(mean_logp=float(logp.mean()),
                   se_logp=float(logp.std(ddof=1) / math.sqrt(logp.size)),
                   median_logp=float(np.median(logp)),
                   off_modes=off_modes(row["x"], mixture),
                   sliced_w1=sliced_wasserstein(row["x"], fresh))
    return rows


def table(rows):
    """Markdown; relative differences are to rows[1] (the reference ancestral chain), with
    the standard error of the difference of the two independent means."""
    data_logp, ref = rows[0]["mean_logp"], rows[1]
    lines = [
        "| sampler | model evals | mean log p(x) (nats) | vs ancestral (+- s.e.) | "
        f"minus data's | median log p | off the modes (> {OFF_MODE_STDS:g} std) | "
        "sliced W1 to data | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rel = (row["mean_logp"] - ref["mean_logp"]) / abs(ref["mean_logp"])
        se = math.hypot(row["se_logp"], ref["se_logp"]) / abs(ref["mean_logp"])
        vs = "(reference)" if row is ref else f"{100 * rel:+.1f} +- {100 * se:.1f} %"
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['mean_logp']:.3f} +- "
            f"{row['se_logp']:.3f} | {vs} | {row['mean_logp'] - data_logp:+.3f} | "
            f"{row['median_logp']:.3f} | {100 * row['off_modes']:.3f} % | "
            f"{row['sliced_w1']:.4f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def scatter(path, panel_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(panels) for _, panels in panel_rows)
    fig, axes = plt.subplots(
        len(panel_rows), cols, figsize=(2.2 * cols, 2.4 * len(panel_rows)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax_row, (label, panels) in zip(axes, panel_rows):
        for ax, row in zip(ax_row, panels):
            x = row["x"][:2000]
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.5)
            name = row["sampler"].replace("DPM-Solver++(2M), ", "DPM++ ").replace(" var)", ")")
            title = name + (f" {row['steps']}" if row["steps"] else "")
            ax.set_title(f"{label}:\n{title}" if ax is ax_row[0] else title, fontsize=7)
            ax.set_xlim(-2.2, 2.2)
            ax.set_ylim(-2.2, 2.2)
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument(
        "--data", choices=tuple(DATASETS), default="ring8",
        help="the mixture: FFJORD's 8 Gaussians scaled to unit variance, or a sharper ring",
    )
    parser.add_argument("--train_steps", type=int, default=20_000)
    parser.add_argument("--hidden", type=int, default=256, help="MLP width")
    parser.add_argument("--depth", type=int, default=4, help="MLP hidden blocks")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--num_timesteps", type=int, default=1000)
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rows", choices=("all", "reference_and_dpm", "sde"), default="all",
        help="'reference_and_dpm': only the reference chain and DPM-Solver++ (the seed "
        "study); 'sde': the reference chain and the score-SDE rows",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the table, JSON and plot of an earlier run in --outdir",
    )
    args = parser.parse_args()
    outdir = pathlib.Path(args.outdir)
    earlier = [name for name in OUTPUTS if (outdir / name).exists()]
    if earlier and not args.overwrite:
        parser.error(
            f"{outdir} already holds {', '.join(earlier)} of an earlier run; choose another "
            "--outdir or pass --overwrite to replace them."
        )
    outdir.mkdir(parents=True, exist_ok=True)

    mixture = toy.ring_mixture(*DATASETS[args.data])
    schedule = schedules.get_schedule("linear", args.num_timesteps)
    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    exact = Partial(
        exact_mixture_eps, jnp.asarray(mixture.means, jnp.float32),
        float(mixture.stds[0]), schedule.alphas_cumprod,
    )
    trained = train(args, schedule, mixture)
    trained_velocity = train_flow(args, mixture) if args.rows == "all" else None
    exact_velocity = Partial(exact_mixture_velocity, jnp.asarray(mixture.means, jnp.float32),
                             float(mixture.stds[0]))

    rng = np.random.default_rng(args.seed + 2)
    fresh = mixture.sample(rng, args.num_samples).astype(np.float64)
    data = mixture.sample(rng, args.num_samples).astype(np.float64)
    report, summary, panel_rows = [], {}, []
    exact_cont = Partial(exact_mixture_eps_continuous, jnp.asarray(mixture.means, jnp.float32),
                         float(mixture.stds[0]), sde_lib.DDPMVPSDE.from_schedule(schedule))
    models = [("trained MLP", trained, "learned_range", trained_velocity, None),
              ("exact eps", exact, "fixed_small", exact_velocity, exact_cont)]
    for label, model_fn, var_type, velocity_fn, sde_eps_fn in models:
        print(f"sampling with the {label}:", flush=True)
        rows = evaluate(run_samplers(args, schedule, model_fn, var_type, velocity_fn, sde_eps_fn),
                        mixture, data, fresh)
        report.append(f"### {label}\n\n{table(rows)}\n")
        summary[label] = [{k: v for k, v in row.items() if k != "x"} for row in rows]
        panel_rows.append((label, [r for r in rows if r["steps"] in (0, 20, 35, 1000)]))
    if args.rows in ("all", "sde"):
        text, summary["ode_loglik"] = ode_loglik_rows(
            schedule, [("trained MLP", Partial(_eps_part, trained)), ("exact eps", exact_cont)],
            mixture, np.random.default_rng(args.seed + 4), 2000)
        report.append("### probability-flow ODE log-likelihood of 2000 held-out points\n\n"
                      + text + "\n")
    header = (
        f"{args.data}: ring mixture ({len(mixture.weights)} x N(., {mixture.stds[0]:.4g}^2 I), "
        f"radius {np.linalg.norm(mixture.means[0]):.4g}); linear schedule T = "
        f"{args.num_timesteps}; eps-MLP and velocity MLP (flow rows; 'exact eps': the exact "
        f"velocity) ({args.depth} blocks of width {args.hidden}) each trained "
        f"{args.train_steps} steps (batch "
        f"{args.batch_size}); {args.num_samples} samples per row; seed {args.seed}; "
        f"{jax.devices()[0].device_kind}.\n\n"
    )
    text = header + "\n".join(report)
    print("\n" + text)
    (outdir / "sampler_table.md").write_text(text)
    (outdir / "sampler_table.json").write_text(json.dumps(summary, indent=2))
    scatter(outdir / "samples.png", panel_rows)
    print(f"wrote {outdir}/sampler_table.md, sampler_table.json, samples.png")


if __name__ == "__main__":
    main()
