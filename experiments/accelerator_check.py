"""Accelerator check: one command, one JSON, under 8 minutes on one H100 / H200.

    python experiments/accelerator_check.py --out=/tmp/accelerator.json
    python experiments/accelerator_check.py --tiny          # toy sizes, on a CPU too

What it measures, on the default device (one chip):

- ``peak``: the chip's bfloat16 matmul FLOP/s, the best over several sizes and
  repetitions of an n x n x n product (float32 accumulation), so that it bounds what a
  network can reach;
- ``train``: the DDPM CIFAR-10 U-Net (35.7M parameters) train step of the project
  (`training.step.make_train_step`: loss, gradient, clipping, Adam, EMA) at batch 128 in
  bfloat16 compute with float32 parameters: compile seconds, median step seconds,
  images/s, model FLOPs per step from XLA's cost analysis of the compiled step, and that
  FLOP rate as a fraction of ``peak``;
- ``sample``: ancestral (T = 1000 network evaluations), DDIM and DPM-Solver++
  (``--sample-steps`` each) sampling throughput, images/s;
- ``bound``: `likelihood.calc_bpd_loop` over the full T = 1000 (every term of the
  variational bound), seconds per batch and images/s;
- ``fid``: ``--mode=fid``'s feature extraction (pytorch-fid's FID Inception in Flax,
  32x32 images resized to 299x299 inside, pool features and logits back on the host;
  random weights of the right shapes) at batch 200, the ``fid.batch_size`` default:
  compile seconds, seconds per batch, images/s, FLOPs per image (the benchmark's ``fid``
  case, `experiments/bench/fid.py`);
- ``dit``: a DiT-B/2 train step in the paper's 256x256 latent setting (32x32x4 latents,
  1000 classes, learned sigma, bfloat16 compute), batch 32, through
  ``experiments/dit_step.py``: compile seconds, images/s, the losses (checked finite) and
  the device's peak bytes in use.

``--tiny`` shrinks everything (a one-level U-Net with ch 32 and no attention on 8x8
images, small batches and matmuls, T = 25: the linear schedule needs T > 20; a one-block
DiT-S/8), so that the script runs on a CPU; the test suite runs it that way
(tests/test_accelerator_check.py). Every measurement is made as at full size: only the
sizes, and so the compile times, shrink.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python experiments/accelerator_check.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib.util  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import ddpm_cifar  # noqa: E402
from diffusion_jax import data, likelihood, sampling, schedules  # noqa: E402
from diffusion_jax.training import objectives, step as step_lib  # noqa: E402
from diffusion_jax.training.setup import create_model  # noqa: E402
from diffusion_jax.training.state import TrainState, make_optimizer  # noqa: E402

FULL = dict(image=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn=(16,),
            train_batch=128, sample_batch=256, bound_batch=64, num_timesteps=1000,
            peak_sizes=(4096, 8192, 16384), steps=10,
            dit=dict(size="DiT-B/2", overrides={}, batch=32, steps=5),
            fid=dict(batch=200, size=32, steps=5))
TINY = dict(image=8, ch=32, ch_mult=(1,), num_res_blocks=1, attn=(),
            train_batch=4, sample_batch=4, bound_batch=2, num_timesteps=25,
            peak_sizes=(128, 256), steps=2,
            dit=dict(size="DiT-S/8", overrides={"depth": 1}, batch=8, steps=2),
            fid=dict(batch=2, size=16, steps=1))


def _median_seconds(fn, *, steps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).trace(*args).lower().compile()
    return compiled, time.perf_counter() - start


def _xla_flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def measure_bf16_peak(sizes, reps: int = 5) -> dict[str, Any]:
    """The best FLOP/s of a bfloat16 n x n x n matmul over ``sizes`` and ``reps``."""
    per_size = {}
    for n in sizes:
        keys = jax.random.split(jax.random.key(n), 2)
        a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(jnp.bfloat16) for k in keys)
        matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
        times = _median_seconds(lambda: matmul(a, b), steps=reps)
        per_size[str(n)] = 2.0 * n**3 / min(times)
    return {"flops_per_s": max(per_size.values()), "best_flops_per_s_by_n": per_size,
            "how": f"best of {reps} timed calls of a jitted bfloat16 n x n x n matmul "
                   f"(float32 accumulation) for each n in {list(sizes)}, one device"}


def _config(sizes: dict):
    config = ddpm_cifar.get_config()
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks = sizes["ch"], sizes["ch_mult"], sizes["num_res_blocks"]
    m.attn_resolutions, m.dtype = sizes["attn"], "bfloat16"
    config.diffusion.num_timesteps = sizes["num_timesteps"]
    config.data.mock = True
    return config


def _info(sizes: dict):
    return data.DataInfo("cifar10", "image", (sizes["image"], sizes["image"], 3), 50_000, 10)


def check_train(sizes: dict, peak: float) -> dict[str, Any]:
    config = _config(sizes)
    info = _info(sizes)
    objective = objectives.create_objective(config, info)
    optimizer = make_optimizer(config.optim)
    params = jax.jit(objective.init)(jax.random.key(0))
    state = TrainState.create(params, optimizer)
    batch_size = sizes["train_batch"]
    images = np.random.default_rng(0).uniform(-1, 1, (batch_size, *info.shape))
    batch = {"image": jnp.asarray(images, jnp.float32)}  # scaled to [-1, 1] as the data
    step_fn = step_lib.make_train_step(loss_fn=objective.loss, optimizer=optimizer,
                                       root_key=jax.random.key(1),
                                       ema_decay=config.optim.ema_decay)
    compiled, compile_s = _compile(step_fn, state, batch)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    times = _median_seconds(one_step, steps=sizes["steps"])
    step_s = statistics.median(times)
    flops = _xla_flops(compiled)
    return {
        "model_params": int(sum(p.size for p in jax.tree.leaves(params))),
        "batch": batch_size, "dtype": "bfloat16 compute, float32 parameters",
        "compile_s": compile_s, "step_s": step_s, "step_s_all": times,
        "images_per_s": batch_size / step_s, "xla_flops_per_step": flops,
        "fraction_of_peak": (flops / step_s / peak) if flops else None,
        "loss": float(one_step()["loss"]),
    }


def _eval_setup(sizes: dict):
    config = _config(sizes)
    info = _info(sizes)
    model = create_model(config, info)
    params = jax.jit(objectives.ddpm_objective(config, info).init)(jax.random.key(0))
    apply = lambda p, x, t: model.apply({"params": p}, x, t, train=False)
    d = config.diffusion
    return config, info, params, apply, schedules.get_schedule(d.schedule, d.num_timesteps)


def check_sampling(sizes: dict, sample_steps: int) -> dict[str, Any]:
    config, info, params, apply, schedule = _eval_setup(sizes)
    d = config.diffusion
    shape = (sizes["sample_batch"], *info.shape)
    out = {}
    for sampler in ("ancestral", "ddim", "dpm_solver++"):
        steps = d.num_timesteps if sampler == "ancestral" else min(sample_steps,
                                                                   d.num_timesteps)

        def draw(params, key, sampler=sampler, steps=steps):
            return sampling.sample(schedule, jax.tree_util.Partial(apply, params), shape,
                                   sampler=sampler, key=key, num_steps=steps,
                                   mean_type=d.mean_type, var_type=d.var_type,
                                   clip_denoised=True)

        key = jax.random.key(2)
        compiled, compile_s = _compile(draw, params, key)
        times = _median_seconds(lambda: compiled(params, key), steps=1)
        out[sampler] = {"network_evals": steps, "batch": shape[0], "compile_s": compile_s,
                        "seconds": times[0], "images_per_s": shape[0] / times[0]}
    return out


def check_bound(sizes: dict) -> dict[str, Any]:
    config, info, params, apply, schedule = _eval_setup(sizes)
    d = config.diffusion
    x = jnp.asarray(np.random.default_rng(0).uniform(
        -1, 1, (sizes["bound_batch"], *info.shape)), jnp.float32)

    def bound(params, x, key):
        return likelihood.calc_bpd_loop(
            schedule, jax.tree_util.Partial(apply, params), x, key=key,
            mean_type=d.mean_type, var_type=d.var_type, decoder_type=d.decoder_type,
        )["total_bpd"]

    key = jax.random.key(3)
    compiled, compile_s = _compile(bound, params, x, key)
    start = time.perf_counter()
    total = jax.block_until_ready(compiled(params, x, key))
    seconds = time.perf_counter() - start
    return {"num_timesteps": d.num_timesteps, "batch": x.shape[0], "compile_s": compile_s,
            "seconds": seconds, "images_per_s": x.shape[0] / seconds,
            "mean_total_bpd_of_untrained_model": float(np.mean(total))}


def check_dit(sizes: dict) -> dict[str, Any]:
    """The DiT train step of ``experiments/dit_step.py``, data parallel over every device
    (on the one-chip machine the check is for, that chip alone)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dit_step.py")
    spec = importlib.util.spec_from_file_location("dit_step", path)
    dit_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dit_step)
    d = sizes["dit"]
    config, info = dit_step.dit_latent_config(d["size"], dit_overrides=d["overrides"])
    report = dit_step.run(config, info, global_batch=d["batch"], steps=d["steps"])
    return {"size": d["size"], **d["overrides"], **report}


def check_fid(sizes: dict) -> dict[str, Any]:
    """The benchmark's ``fid`` case (`experiments.bench.fid.bench_fid`) at ``sizes['fid']``,
    without a fraction of peak (the network runs in float32, the peak here is bfloat16)."""
    from experiments.bench.fid import bench_fid

    d = sizes["fid"]
    args = argparse.Namespace(fid_batch=d["batch"], fid_size=d["size"], fid_steps=d["steps"],
                              warmup=1)
    case = bench_fid(args, peaks={})
    return {k: case[k] for k in ("batch", "devices", "image_size", "input_size", "compile_s",
                                 "first_call_s", "step_s", "images_per_s",
                                 "model_flops_per_image") if k in case}


def run(tiny: bool = False, sample_steps: int = 50) -> dict[str, Any]:
    sizes = TINY if tiny else FULL
    start = time.perf_counter()
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "tiny": tiny, "jax": jax.__version__, "platform": device.platform,
        "device_kind": device.device_kind, "sizes": {k: list(v) if isinstance(v, tuple)
                                                      else v for k, v in sizes.items()},
    }
    result["peak"] = measure_bf16_peak(sizes["peak_sizes"])
    result["train"] = check_train(sizes, result["peak"]["flops_per_s"])
    result["sample"] = check_sampling(sizes, sample_steps)
    result["bound"] = check_bound(sizes)
    result["dit"] = check_dit(sizes)
    result["fid"] = check_fid(sizes)
    result["total_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes everywhere (runs on a CPU in about a minute)")
    parser.add_argument("--sample-steps", type=int, default=50,
                        help="network evaluations of DDIM and DPM-Solver++")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.sample_steps < 1:
        parser.error(f"--sample-steps must be positive; got {args.sample_steps}")
    result = run(args.tiny, args.sample_steps)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
