r"""The 2015 paper's experiments: swiss roll and binary heartbeat, trained, scored, plotted.

Sohl-Dickstein et al. (2015), Table 1 (v8), reports the bound K of Eq. 14 and K - L_null
(L_null: the log-likelihood under the prior pi) on held-out data:

    Swiss roll         K = 2.35 bits        K - L_null = 6.45 bits
    Binary heartbeat   K = -2.414 bits/seq  K - L_null = 12.024 bits/seq

This script trains ``configs/swissroll.py`` and ``configs/heartbeat.py`` with the
library's training loop (`train.train_and_evaluate`: the same code as ``launch.py``;
a workdir holding a finished run is reused, an unfinished one is resumed), scores K on a
held-out set (every KL term of every example; the standard error is over examples) with
the EMA parameters, and writes next to this file:

- ``results.md``: the table next to the paper's numbers, with training times;
- ``swissroll.png``: Figure 1 of the paper: the forward trajectory q(x^(t)) and the
  reverse trajectory p(x^(t)) at t = 0, T/2, T, and the drift f_mu(x^(t), t) - x^(t);
- ``heartbeat.png``: held-out sequences, model samples, and the reverse chain at
  t = T, T/2, 0;
- ``results.json``: every number in the table.

Command, from the repository root (about 50 minutes on a 2-core CPU: two trainings of up to
30 minutes each, a few minutes of evaluation):

    PYTHONPATH=. python experiments/dpm2015/run.py --workdir=runs/dpm2015

``--only=swissroll`` or ``--only=heartbeat`` runs one; ``--variant=tiny`` runs the
smoke-test configs (seconds; the table then means nothing) into ``--outdir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import binomial, data, dpm2015, gaussian, losses  # noqa: E402
from diffusion_jax.data import toy  # noqa: E402
from diffusion_jax.training import train  # noqa: E402
from diffusion_jax.training.objectives import dpm2015 as objectives_2015  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
PAPER = {
    "swissroll": {"K": 2.35, "K_minus_null": 6.45},
    "heartbeat": {"K": -2.414, "K_minus_null": 12.024},
}
HELDOUT_SEED = 1  # toy_heldout_set's stream is never a training batch; seed 1 for these runs


def load_config(name: str, variant: str | None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def train_timed(config, workdir: pathlib.Path):
    """Trains (or resumes) and returns (state, total training seconds over sessions).

    Also records the machine's 15-minute load average when training ends (``load``): on
    a 2-core machine a value near 2 means the run had the cores to itself."""
    workdir.mkdir(parents=True, exist_ok=True)
    timing_path = workdir / "train_seconds.json"
    previous = json.loads(timing_path.read_text()) if timing_path.exists() else {"sessions": []}
    start = time.time()
    state = train.train_and_evaluate(config, workdir)
    elapsed = time.time() - start
    if int(state.step) > previous.get("step", 0):  # this session trained
        previous["sessions"].append(elapsed)
        previous["step"] = int(state.step)
        previous["load"] = os.getloadavg()[2]
        timing_path.write_text(json.dumps(previous))
    return state, float(sum(previous["sessions"]))


def train_load(workdir: pathlib.Path):
    """The 15-minute load average recorded at the end of training, or None."""
    path = workdir / "train_seconds.json"
    return json.loads(path.read_text()).get("load") if path.exists() else None


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def swiss_roll_log_likelihood(noise: float, num: int = 4000, grid: int = 200_001) -> float:
    """E log2 p(x) - L_null (bits) of the TRUE density of the roll with ``noise`` > 0.

    The density is a 1-D integral over the angle (uniform on its range) of N(x; c(angle),
    s^2 I); it is evaluated on a fine grid and averaged over ``num`` samples. No model
    can have K - L_null above this (Gibbs' inequality), which is why the noisy roll
    cannot reach the paper's number.
    """
    mean, std = toy.swiss_roll_moments()
    s = noise / math.sqrt(1 + noise**2)
    angle = np.linspace(*toy.SWISS_ROLL_T_RANGE, grid)
    curve = (np.stack([angle * np.cos(angle), angle * np.sin(angle)], -1) - mean) / std
    curve = curve / math.sqrt(1 + noise**2)
    x = toy.sample_swiss_roll(np.random.default_rng(123), num, noise=noise).astype(np.float64)
    log_p = np.empty(num)
    for i, xi in enumerate(x):
        a = -np.sum((curve - xi) ** 2, -1) / (2 * s * s)
        peak = a.max()
        log_p[i] = peak + math.log(np.mean(np.exp(a - peak))) - math.log(2 * math.pi * s * s)
    l_null = -0.5 * np.sum(x**2 + math.log(2 * math.pi), -1)
    return float(np.mean(log_p - l_null) / math.log(2))


def swissroll_oracle_k(betas, x, key, grid: int = 100_001) -> np.ndarray:
    """K - L_null (bits, per example) of the best diagonal-Gaussian reverse kernels for the
    noiseless roll under the forward schedule ``betas``: at each step the kernel's mean
    and per-coordinate variance are those of the exact q(x_{t-1} | x_t), a mixture over
    the roll's points (the angle on a fine grid) of the posteriors q(x_{t-1} | x_t, x_0).
    What a perfect network with Eq. 64-65's diagonal covariance would score. Float64."""
    with jax.enable_x64(True):
        schedule = gaussian.Schedule.from_betas(np.asarray(betas, np.float64), dtype=jnp.float64)
        mean, std = toy.swiss_roll_moments()
        angle = np.linspace(*toy.SWISS_ROLL_T_RANGE, grid)
        curve = jnp.asarray((np.stack([angle * np.cos(angle), angle * np.sin(angle)], -1) - mean) / std)
        x0 = jnp.asarray(x, jnp.float64)

        @jax.jit
        def kl_at(t, k):
            tt = jnp.full((x0.shape[0],), t)
            x_t = gaussian.q_sample(schedule, x0, tt, key=k)
            abar = schedule.alphas_cumprod[t]
            d2 = jnp.sum((x_t[:, None, :] - jnp.sqrt(abar) * curve[None]) ** 2, -1)
            w = jax.nn.softmax(-d2 / (2 * (1 - abar)), axis=1)[..., None]
            mu = (schedule.posterior_mean_coef1[t] * curve[None]
                  + schedule.posterior_mean_coef2[t] * x_t[:, None, :])
            m = jnp.sum(w * mu, 1)
            v = schedule.posterior_variance[t] + jnp.sum(w * (mu - m[:, None, :]) ** 2, 1)
            true_mean, _, true_log_var = gaussian.q_posterior_mean_variance(schedule, x0, x_t, tt)
            return jnp.sum(losses.normal_kl(true_mean, true_log_var, m, jnp.log(v)), -1)

        kl = sum(np.asarray(kl_at(t, jax.random.fold_in(key, t)))
                 for t in range(1, schedule.num_timesteps))
        k = float(dpm2015.entropy_terms(schedule, 2)) - kl
        return (k - np.asarray(dpm2015.null_log_likelihood(x0))) / math.log(2)


def heartbeat_oracle_k(schedule, x, key) -> np.ndarray:
    """K (bits, per example) of the best factorized reverse kernels: each bit's rate is
    E[q(x_{t-1} | x_t, x_0) | x_t] under the exact posterior over the 5 sequences. What a
    perfect network would score with this T and prior."""
    beats = jnp.asarray(np.unique(toy.sample_heartbeat(np.random.default_rng(0), 500), axis=0))

    def oracle(x_t, t):
        def per_sequence(beat):
            x0 = jnp.broadcast_to(beat, x_t.shape)
            m = binomial.q_probs(schedule, x0, t)
            log_lik = jnp.sum(x_t * jnp.log(m) + (1 - x_t) * jnp.log1p(-m), -1)
            return log_lik, binomial.q_posterior_probs(schedule, x0, x_t, t)

        log_lik, post = jax.vmap(per_sequence)(beats)
        weights = jax.nn.softmax(log_lik, axis=0)[:, :, None]
        probs = jnp.clip(jnp.sum(weights * post, 0), 1e-7, 1 - 1e-7)
        base = binomial.reverse_logits(schedule, jnp.zeros_like(x_t), x_t, t)
        return jnp.log(probs) - jnp.log1p(-probs) - base

    out = binomial.bound_k(schedule, oracle, jnp.asarray(x), key=key)
    return np.asarray(out["k"], np.float64) / math.log(2)


def swissroll_figure(model, params, path, key, num=2000):
    T = model.num_timesteps
    steps = (0, T // 2, T)
    schedule = model.schedule(params)
    x0 = toy.toy_heldout_set("swiss_roll", num, seed=HELDOUT_SEED + 1, noise=0.0)
    rev = model.sample(params, key, num, save_steps=steps)["saved"]
    fig, axes = plt.subplots(3, 3, figsize=(10, 10))
    grid = np.linspace(-2.2, 2.2, 21)
    gx, gy = np.meshgrid(grid, grid)
    points = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], -1), jnp.float32)
    fn = model.model_fn(params)
    for col, s in enumerate(steps):
        if s == 0:
            fwd = x0
        else:
            t = jnp.full((num,), s - 1, jnp.int32)  # x^(s) sits at array index s - 1
            fwd = np.asarray(gaussian.q_sample(schedule, jnp.asarray(x0), t,
                                                       key=jax.random.fold_in(key, s)))
        axes[0, col].scatter(fwd[:, 0], fwd[:, 1], s=1, alpha=0.5)
        axes[0, col].set_title(f"q(x^({s}))  [t = {s}]")
        axes[1, col].scatter(rev[col][:, 0], rev[col][:, 1], s=1, alpha=0.5, color="C1")
        axes[1, col].set_title(f"p(x^({s}))")
        # Drift of the reverse step that produces x^(s - 1) from x^(s), i.e. index s - 1;
        # at t = 0 the step from x^(1) (the first learned kernel is index 1).
        index = max(s - 1, 1)
        t = jnp.full((points.shape[0],), index, jnp.int32)
        mean, _, _ = dpm2015.p_mean_variance(schedule, fn(points, t), points, t)
        drift = np.asarray(mean - points)
        axes[2, col].quiver(points[:, 0], points[:, 1], drift[:, 0], drift[:, 1], angles="xy")
        axes[2, col].set_title(f"f_mu(x^({index + 1}), {index + 1}) - x^({index + 1})")
    for ax in axes.ravel():
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Swiss roll, Gaussian diffusion (T = %d): forward, reverse, drift" % T)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def heartbeat_figure(model, params, heldout, path, key, num=24):
    T = model.num_timesteps
    out = model.sample(params, key, num, save_steps=(T, T // 2, 0))
    panels = [("held-out data", heldout[:num]), (f"p(x^({T}))", out["saved"][0]),
              (f"p(x^({T // 2}))", out["saved"][1]), ("p(x^(0)): samples", out["saved"][2])]
    fig, axes = plt.subplots(1, 4, figsize=(12, 4))
    for ax, (title, x) in zip(axes, panels):
        ax.imshow(np.asarray(x), cmap="gray_r", interpolation="nearest", aspect="auto")
        ax.set_title(title)
        ax.set_xlabel("bin")
        ax.set_yticks([])
    axes[0].set_ylabel("sequence")
    fig.suptitle("Binary heartbeat, binomial diffusion (T = %d)" % T)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def betas_figure(model, params, path):
    schedule = model.schedule(params)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    t = np.arange(1, model.num_timesteps + 1)
    ax.semilogy(t, model.baseline_betas, "--", label="baseline (start of learning)")
    ax.semilogy(t, np.asarray(schedule.betas), label="learned")
    ax.set_xlabel("t")
    ax.set_ylabel("beta_t")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def train_and_score(args, name, variant, kind, num_examples, batch_size):
    """Trains config ``name``, scores K on its held-out set with the EMA parameters.

    Returns (config, model, params, held-out x, the result fields both experiments share).
    """
    config = load_config(name, variant)
    state, seconds = train_timed(config, args.workdir / name)
    model = objectives_2015.build_model(config, data.dataset_info(config.data), kind)
    params = state.ema_params
    x = toy.toy_heldout_set(config.data.name, num_examples, seed=HELDOUT_SEED,
                            **({"noise": config.data.noise} if kind == "gaussian" else {}))
    ev = objectives_2015.evaluate_bound(model, params, x, key=jax.random.key(2015),
                                        batch_size=batch_size)
    k, k_se = mean_se(ev["K_bits"])
    d, d_se = mean_se(ev["K_minus_null_bits"])
    fields = {
        "K": k, "K_se": k_se, "K_minus_null": d, "K_minus_null_se": d_se,
        "train_seconds": seconds, "steps": int(state.step), "examples": len(x),
        "load": train_load(args.workdir / name), "cores": os.cpu_count(),
        "T": config.diffusion.num_timesteps,
    }
    return config, model, params, x, fields


def run_swissroll(args, variant, results):
    config, model, params, x, fields = train_and_score(
        args, "swissroll", variant, "gaussian", args.swissroll_examples, 1000)
    results["swissroll"] = {
        **fields,
        "noise": float(config.data.noise), "beta_1": float(config.dpm2015.beta_1),
        "network": config.model.name,
        "noisy_roll_bound_0.05": swiss_roll_log_likelihood(0.05, num=args.bound_examples),
    }
    if config.data.noise == 0.0:
        betas = np.asarray(model.schedule(params).betas, np.float64)
        oracle = swissroll_oracle_k(betas, x[:args.oracle_examples], jax.random.key(8))
        results["swissroll"]["oracle_K_minus_null"], results["swissroll"]["oracle_se"] = \
            mean_se(oracle)
        results["swissroll"]["oracle_examples"] = len(oracle)
    swissroll_figure(model, params, args.outdir / "swissroll.png", jax.random.key(1))
    if model.learned_betas:
        betas_figure(model, params, args.outdir / "swissroll_betas.png")


def run_heartbeat(args, variant, results):
    config, model, params, x, fields = train_and_score(
        args, "heartbeat", variant, "binomial", args.heartbeat_examples, 500)
    oracle = heartbeat_oracle_k(model.schedule(params), x[:1000], jax.random.key(7))
    samples = np.asarray(model.sample(params, jax.random.key(3), 2000)["sample"])
    valid = np.array([any((s == b).all() for b in np.unique(x, axis=0)) for s in samples])
    phases = [int(np.argmax(s[:5])) for s, ok in zip(samples, valid) if ok]
    oracle_k, oracle_se = mean_se(oracle)
    results["heartbeat"] = {
        **fields,
        "prior_prob": config.dpm2015.prior_prob,
        "features": list(config.model.features), "activation": config.model.activation,
        "readout_basis": int(config.dpm2015.readout_basis), "lr": float(config.optim.lr),
        "oracle_K": oracle_k, "oracle_K_se": oracle_se,
        "valid_sample_fraction": float(valid.mean()),
        "phase_counts": np.bincount(phases, minlength=5).tolist(),
    }
    heartbeat_figure(model, params, x, args.outdir / "heartbeat.png", jax.random.key(4))


def _units(activation):
    if activation == "centered_sigmoid":
        return ("sigmoid units (each passing on sigmoid(a) - 1/2: the same functions as plain "
                "sigmoid units, a parameterisation Adam trains much faster, "
                "`models.mlp.centered_sigmoid`)")
    return f"{activation} units"


def write_table(results, path, variant):
    lines = [
        "# The 2015 paper's experiments, reproduced",
        "",
        "Sohl-Dickstein et al. (2015), *Deep Unsupervised Learning using Nonequilibrium",
        "Thermodynamics*, Table 1 (arXiv v8), next to this library's runs. Written by",
        "`experiments/dpm2015/run.py`" + (f" (config variant `{variant}`: a smoke run, the"
                                            " numbers mean nothing)" if variant else "") + ".",
        "K is the bound of Eq. 14 (T - 1 KL terms, the first reverse step fixed to the",
        "forward kernel's reversal), L_null the log-likelihood under the prior pi; both on",
        "held-out data, every KL term of every example evaluated with one noise draw, EMA",
        "parameters; ± is one standard error over examples.",
        "",
        "| data | paper K | paper K - L_null | K here | K - L_null here | target | met | training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if "swissroll" in results:
        r = results["swissroll"]
        met = r["K_minus_null"] >= PAPER["swissroll"]["K_minus_null"]
        lines.append(
            f"| Swiss roll | 2.35 bits | 6.45 bits | {r['K']:.3f} ± {r['K_se']:.3f} bits | "
            f"{r['K_minus_null']:.3f} ± {r['K_minus_null_se']:.3f} bits | K - L_null >= 6.45 | "
            f"{'yes' if met else 'NO'} | {r['train_seconds'] / 60:.1f} min, {r['steps']} steps |")
    if "heartbeat" in results:
        r = results["heartbeat"]
        met = r["K"] >= PAPER["heartbeat"]["K"]
        lines.append(
            f"| Binary heartbeat | -2.414 bits/seq | 12.024 bits/seq | {r['K']:.3f} ± "
            f"{r['K_se']:.3f} bits/seq | {r['K_minus_null']:.3f} ± {r['K_minus_null_se']:.3f} "
            f"bits/seq | K >= -2.414 (truth -2.322) | {'yes' if met else 'NO'} | "
            f"{r['train_seconds'] / 60:.1f} min, {r['steps']} steps |")
    loads = ", ".join(
        f"{name} {r['load']:.1f}" for name, r in results.items() if r.get("load") is not None)
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
              f"cores, {jax.device_count()} JAX device(s) ({jax.devices()[0].platform}); "
              "training times are wall-clock, compilation included. 15-minute load average "
              f"when each training ended (about the core count = the run had the machine to "
              f"itself): {loads or 'not recorded'}.", ""]
    if "swissroll" in results:
        r = results["swissroll"]
        lines += [
            "## Swiss roll",
            "",
            f"- Model: Gaussian diffusion, T = {r['T']}, reverse kernels of Eq. 64-65 from "
            f"an {r['network'].upper()} with a readout per step; beta_2..beta_T learned by "
            f"gradient ascent on K through the frozen noise, beta_1 = {r['beta_1']:g} fixed "
            "(`configs/swissroll.py`). "
            f"{r['examples']} held-out examples.",
            "- Generator (`diffusion_jax/data/toy.py`): angle u ~ U(1.5 pi, 4.5 pi), point "
            "(u cos u, u sin u) (scikit-learn's `make_swiss_roll` range, 1.5 turns), each "
            f"coordinate standardised to mean 0 and variance 1 exactly; noise = {r['noise']:g}.",
            "- How it may differ from the paper's: the paper does not say which roll it used "
            "(range, noise, scaling). With no noise the data lie on a curve, the true "
            "log-likelihood is unbounded, and K is limited by the model and by beta_1 (the "
            "fixed first step blurs the data by variance beta_1): a smaller beta_1 lets a "
            "sharper model score higher, so the two numbers are comparable only as far as "
            "the rolls and beta_1 agree. With noise the target is out of reach for ANY "
            f"model: at noise 0.05 the true density itself scores only "
            f"{r['noisy_roll_bound_0.05']:.2f} bits above L_null (computed here by "
            "quadrature), below 6.45; the paper's roll must have been (nearly) noiseless.",
        ]
        if "oracle_K_minus_null" in r:
            lines.append(
                "- A perfect network with these kernels (diagonal Gaussian, Eq. 64-65) under the "
                "learned schedule: each step's mean and per-coordinate variance those of the exact "
                "q(x_{t-1} | x_t), a mixture over the roll's points, scores K - L_null = "
                f"{r['oracle_K_minus_null']:.2f} ± {r['oracle_se']:.2f} bits "
                f"({r['oracle_examples']} examples): the ceiling for this beta_1 and schedule.")
        lines += [
            "",
            "![swiss roll](swissroll.png)",
            "",
        ]
        if (path.parent / "swissroll_betas.png").exists():
            lines += ["![learned betas](swissroll_betas.png)", ""]
    if "heartbeat" in results:
        r = results["heartbeat"]
        lines += [
            "## Binary heartbeat",
            "",
            f"- Model: binomial diffusion, T = {r['T']} steps toward Bernoulli("
            f"{r['prior_prob']:g}), beta_t = 1 / (T - t + 1); reverse rates f_b from an MLP "
            f"with hidden layers {r['features']} of {_units(r['activation'])} shared over "
            "time and a readout per step"
            + (f" (each a combination of {r['readout_basis']} basis readouts, smooth in t)"
               if r.get("readout_basis") else "")
            + ", every KL term of every example in each training batch"
            + (f", Adam at {r['lr']:g} with cosine decay" if r.get("lr") else "")
            + f" (`configs/heartbeat.py`). {r['examples']} held-out sequences.",
            f"- The best factorized reverse kernels at this T (each bit's rate the exact "
            f"posterior mixture over the 5 sequences, i.e. a perfect network) score K = "
            f"{r['oracle_K']:.3f} ± {r['oracle_K_se']:.3f} bits/seq; the truth is "
            f"log2(1/5) = {math.log2(0.2):.3f}.",
            f"- Samples: {100 * r['valid_sample_fraction']:.1f} % of 2000 model samples are "
            f"one of the 5 heartbeats; their phases: {r['phase_counts']}.",
            "",
            "![heartbeat](heartbeat.png)",
            "",
        ]
    path.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=ROOT / "runs" / "dpm2015")
    parser.add_argument("--outdir", type=pathlib.Path, default=HERE)
    parser.add_argument("--only", choices=["swissroll", "heartbeat"], default=None)
    parser.add_argument("--variant", default=None, help="config variant, e.g. 'tiny'")
    parser.add_argument("--swissroll_examples", type=int, default=10_000)
    parser.add_argument("--heartbeat_examples", type=int, default=2_000)
    parser.add_argument("--bound_examples", type=int, default=2_000)
    parser.add_argument("--oracle_examples", type=int, default=300)
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    results_path = args.outdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and args.only else {}
    if args.only in (None, "swissroll"):
        run_swissroll(args, args.variant, results)
    if args.only in (None, "heartbeat"):
        run_heartbeat(args, args.variant, results)
    results_path.write_text(json.dumps(results, indent=2))
    write_table(results, args.outdir / "results.md", args.variant)
    print((args.outdir / "results.md").read_text())


if __name__ == "__main__":
    main()
