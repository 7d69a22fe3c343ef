"""Classifier-free guidance on scikit-learn's digits: accuracy against diversity for w = 0, 1, 3.

Trains, on the same 1,500 training digits (8x8, [-1, 1]; the last 297 are held out):

- a small CNN classifier (two 3x3 convolutions, 32 and 64 channels, the second of stride 2,
  a dense layer of 128; Adam, cross-entropy); its held-out accuracy is reported;
- a class-conditional DDPM (the digits U-Net of ``configs/digits.py``: ch 32, ch_mult (1, 2),
  one residual block, attention at 4x4; eps prediction, L_simple, cosine schedule, T = 1000;
  Adam 1e-3 with 200 warm-up steps, EMA 0.999) whose U-Net embeds an eleventh, null class:
  each training label is replaced by it with probability p_uncond = 0.2 (Ho & Salimans
  2022, Algorithm 1; `guidance.drop_labels`).

Then, for each guidance scale w (Ho & Salimans' convention: eps~ = (1 + w) eps(x, c) -
w eps(x); `guidance.guided_model_fn`, one network call on the doubled batch), it draws
``--samples_per_class`` samples of every digit with DDIM (50 steps, eta = 0) from the SAME
x_T for every w, and reports

- the share the classifier assigns to the requested digit (+- its binomial standard error),
- the diversity: per digit, the variance of each pixel over that digit's samples, averaged
  over pixels and digits (in [-1, 1] units; the training digits' own value beside it),

writing a markdown table, a JSON file and a figure (one row per digit, one panel per w) to
``--outdir`` (an earlier run's are replaced only with ``--overwrite``).

Command, from the repository root (about 10-20 minutes on 2 CPU cores):

    PYTHONPATH=. python experiments/guidance_digits.py --outdir=/tmp/guidance_digits
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

from diffusion_jax import guidance, losses, sampling, schedules
from diffusion_jax.data import embedded
from diffusion_jax.models.unet import UNet

NUM_CLASSES = embedded.NUM_CLASSES
OUTPUTS = ("guidance_digits.md", "guidance_digits.json", "samples.png")


def load_digits():
    """(train images, train labels, test images, test labels); images (N, 8, 8, 1) in [-1, 1]."""
    images, labels = embedded.load_digits_uint8()
    x = images.astype(np.float32) / 127.5 - 1.0
    n = embedded.NUM_TRAIN
    return x[:n], labels[:n], x[n:], labels[n:]


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(32, (3, 3))(x))
        h = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(h))
        h = nn.relu(nn.Dense(128)(h.reshape((h.shape[0], -1))))
        return nn.Dense(NUM_CLASSES)(h)


def _minibatches(rng, n, batch_size, steps):
    for _ in range(steps):
        yield rng.choice(n, batch_size, replace=False)


def train_classifier(args, x, y):
    model = Classifier()
    params = model.init(jax.random.key(args.seed), x[:1])["params"]
    optimizer = optax.adamw(1e-3, weight_decay=1e-4)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss_fn(p):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    for idx in _minibatches(rng, len(x), min(128, len(x)), args.classifier_steps):
        params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
    return jax.jit(lambda images: jnp.argmax(model.apply({"params": params}, images), -1))


def digits_unet():
    return UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
                num_classes=NUM_CLASSES, null_class=True)


def train_diffusion(args, schedule, x, y):
    """Returns ``cond_model_fn(x, t, labels)`` (a `Partial` over the EMA parameters)."""
    model = digits_unet()
    init_key, key = jax.random.split(jax.random.key(args.seed + 1))
    params = model.init(init_key, x[:1], jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                        train=False)["params"]
    lr = optax.join_schedules([optax.linear_schedule(0.0, 1e-3, 200), optax.constant_schedule(1e-3)],
                              [200])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    opt_state, ema = optimizer.init(params), params

    def apply(p, x_t, t, labels):
        return model.apply({"params": p}, x_t, t, labels, train=False)

    @jax.jit
    def step(params, opt_state, ema, xb, yb, key, n):
        drop_key, t_key, noise_key = jax.random.split(key, 3)
        labels = guidance.drop_labels(drop_key, yb, p_uncond=args.p_uncond,
                                      num_classes=NUM_CLASSES)
        t = jax.random.randint(t_key, (xb.shape[0],), 0, schedule.num_timesteps)

        def loss_fn(p):
            model_fn = Partial(lambda p, x_t, t: apply(p, x_t, t, labels), p)
            out = losses.training_losses(schedule, model_fn, xb, t, key=noise_key,
                                         mean_type="eps", var_type="fixed_large", loss_type="mse")
            return jnp.mean(out["loss"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.minimum(0.999, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, q: decay * e + (1 - decay) * q, ema, params)
        return params, opt_state, ema, loss

    rng = np.random.default_rng(args.seed + 1)
    start, running = time.time(), []
    for i, idx in enumerate(_minibatches(rng, len(x), args.batch_size, args.train_steps)):
        params, opt_state, ema, loss = step(params, opt_state, ema, x[idx], y[idx],
                                            jax.random.fold_in(key, i), jnp.float32(i))
        running.append(loss)
        if (i + 1) % max(args.train_steps // 5, 1) == 0:
            print(f"step {i + 1}: L_simple {float(jnp.mean(jnp.stack(running))):.4f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            running = []
    return Partial(apply, ema)


def per_class_pixel_variance(images, labels):
    """Mean over classes of the mean over pixels of the variance across that class's images."""
    return float(np.mean([images[labels == c].var(axis=0).mean() for c in range(NUM_CLASSES)]))


def sample_guided(args, schedule, cond_model_fn, scale, labels):
    model_fn = guidance.guided_model_fn(cond_model_fn, labels, scale=scale,
                                        num_classes=NUM_CLASSES)
    return sampling.sample(schedule, model_fn, (len(labels), 8, 8, 1), sampler="ddim",
                           num_steps=args.num_steps, key=jax.random.key(args.seed + 2),
                           mean_type="eps", var_type="fixed_large", clip_denoised=True)


def figure(path, panels, per_row):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, images) in zip(axes[0], panels):
        grid = images[:, :, :, 0].reshape(NUM_CLASSES, per_row, 8, 8)
        grid = grid.transpose(0, 2, 1, 3).reshape(NUM_CLASSES * 8, per_row * 8)
        ax.imshow(grid, cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--train_steps", type=int, default=3000)
    parser.add_argument("--classifier_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--p_uncond", type=float, default=0.2)
    parser.add_argument("--samples_per_class", type=int, default=100)
    parser.add_argument("--num_steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--scales", default="0,1,3", help="guidance scales w, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    scales = [float(w) for w in args.scales.split(",")]
    if not 0.0 <= args.p_uncond < 1.0:
        parser.error(f"--p_uncond must lie in [0, 1); got {args.p_uncond}.")
    outdir = pathlib.Path(args.outdir)
    earlier = [name for name in OUTPUTS if (outdir / name).exists()]
    if earlier and not args.overwrite:
        parser.error(f"{outdir} already holds {', '.join(earlier)} of an earlier run; choose "
                     "another --outdir or pass --overwrite to replace them.")
    outdir.mkdir(parents=True, exist_ok=True)

    x_train, y_train, x_test, y_test = load_digits()
    classify = train_classifier(args, x_train, y_train)
    accuracy = float(np.mean(np.asarray(classify(x_test)) == y_test))
    print(f"classifier held-out accuracy: {accuracy:.4f} ({len(y_test)} digits)", flush=True)
    schedule = schedules.get_schedule("cosine", 1000)
    cond_model_fn = train_diffusion(args, schedule, x_train, y_train)

    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), args.samples_per_class)
    rows, panels = [], []
    for w in scales:
        start = time.time()
        images = np.asarray(sample_guided(args, schedule, cond_model_fn, w, jnp.asarray(labels)))
        hit = np.asarray(classify(jnp.asarray(images))) == labels
        share = float(hit.mean())
        rows.append({"w": w, "share_requested": share,
                     "se": math.sqrt(max(share * (1 - share), 1e-12) / hit.size),
                     "diversity": per_class_pixel_variance(images, labels),
                     "seconds": time.time() - start})
        print(f"w = {w:g}: {rows[-1]}", flush=True)
        panels.append((f"w = {w:g}", images))
    data_div = per_class_pixel_variance(x_train, y_train)
    lines = [
        f"Digits, class-conditional DDPM (U-Net with a null class, p_uncond {args.p_uncond}, "
        f"{args.train_steps} steps, batch {args.batch_size}); DDIM {args.num_steps} steps, "
        f"{args.samples_per_class} samples per digit from the same x_T for every w; classifier "
        f"held-out accuracy {100 * accuracy:.1f} % on {len(y_test)} digits; "
        f"{jax.devices()[0].device_kind}.",
        "",
        "| w | classified as the requested digit (+- s.e.) | diversity: mean per-class pixel "
        "variance | time (s) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['w']:g} | {100 * r['share_requested']:.1f} +- {100 * r['se']:.1f} % | "
              f"{r['diversity']:.4f} | {r['seconds']:.0f} |" for r in rows]
    lines.append(f"| training digits | {100 * float(np.mean(np.asarray(classify(x_train)) == y_train)):.1f} % | "
                 f"{data_div:.4f} | |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (outdir / "guidance_digits.md").write_text(text)
    (outdir / "guidance_digits.json").write_text(json.dumps(
        {"classifier_test_accuracy": accuracy, "data_diversity": data_div, "rows": rows,
         "args": vars(args)}, indent=2))
    per_row = min(args.samples_per_class, 10)
    figure(outdir / "samples.png",
           [(t, im.reshape(NUM_CLASSES, args.samples_per_class, 8, 8, 1)[:, :per_row]
             .reshape(-1, 8, 8, 1)) for t, im in panels], per_row)
    print(f"wrote {outdir}/guidance_digits.md, guidance_digits.json, samples.png")


if __name__ == "__main__":
    main()
