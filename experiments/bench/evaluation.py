"""The evaluation cases: sampling (``sample``), the full bound (``bpd``) and bits/dim under
the probability-flow ODE (``ode_bpd``), each one compiled program over every device.

- `bench_sampling`: each sampler with ``--sample-steps`` network evaluations, one
  compiled loop; images/s and network evaluations x images per second;
- `bench_bpd`: `likelihood.calc_bpd_loop`, every term of the bound over T steps;
- `bench_ode_bpd`: `likelihood.ode_bpd` of the eval model read as a score model through
  its schedule's VP SDE (Hutchinson divergence, adaptive Tsit5); images/s and NFE.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import numpy as np

from diffusion_jax import likelihood, sampling, schedules
from diffusion_jax import sde as sde_lib, sde_losses
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training import objectives
from diffusion_jax.training.setup import create_model

from .flops import add_rates
from .models import CIFAR_INFO, ddpm_extra_flops, make_config
from .timing import best_peak, compile_timed, load_average, memory_report, sub_mesh, time_calls


def _eval_model(args, num_timesteps: int):
    config = make_config(args.eval_model, args.eval_dtype, num_timesteps=num_timesteps,
                         cpu_kernels=args.cpu_kernels[0])
    model = create_model(config, CIFAR_INFO)
    params = jax.jit(objectives.ddpm_objective(config, CIFAR_INFO).init)(jax.random.key(0))
    return config, model, params


def _apply(model):
    """``apply(params, x, t)``: one function object, so a new Partial of it (new
    parameters) reuses the compiled loop."""
    return lambda params, x, t: model.apply({"params": params}, x, t, train=False)


def bench_sampling(args, peaks: dict) -> list[dict[str, Any]]:
    """Each sampler with ``--sample-steps`` network evaluations: one compiled loop, the
    samples split over every device (as ``--mode=sample`` does)."""
    config, model, params = _eval_model(args, 1000)
    d = config.diffusion
    schedule = schedules.get_schedule(d.schedule, d.num_timesteps)
    apply = _apply(model)
    shape = (args.sample_batch,) + CIFAR_INFO.shape
    mesh = sub_mesh(None)
    cases = []
    for sampler in args.samplers.split(","):
        def draw(params, key, sampler=sampler):
            model_fn = jax.tree_util.Partial(apply, params)
            return sampling.sample(
                schedule, model_fn, shape, sampler=sampler, key=key,
                num_steps=args.sample_steps, mean_type=d.mean_type, var_type=d.var_type,
                clip_denoised=True,
            )

        jitted = jax.jit(draw, out_shardings=mesh_lib.data_sharded(mesh))
        key = jax.random.key(2)
        compiled, flops, compile_s = compile_timed(jitted, params, key)
        times, _ = time_calls(lambda: compiled(params, key), steps=args.eval_steps, warmup=1)
        case = {
            "case": "sample", "sampler": sampler, "model": args.eval_model,
            "dtype": args.eval_dtype, "batch": args.sample_batch, "devices": mesh.size,
            "cpu_kernels": config.model.cpu_kernels, "network_evals": args.sample_steps,
            "compile_s": compile_s,
            "step_s": statistics.median(times), "step_s_all": [round(t, 4) for t in times],
            "memory": memory_report(compiled), "load_average": load_average(),
        }
        extra = ddpm_extra_flops(args.eval_model, args.sample_batch, args.sample_steps)
        add_rates(case, images=args.sample_batch, flops=flops, extra=extra,
                  peak=best_peak(peaks, args.eval_dtype, mesh.size))
        case["image_evals_per_s"] = case["images_per_s"] * args.sample_steps
        cases.append(case)
    return cases


def bench_bpd(args, peaks: dict) -> dict[str, Any]:
    """`likelihood.calc_bpd_loop` over all T steps: one compiled loop, the batch split over
    every device (as ``--mode=eval`` does); one timed call (T network evaluations)."""
    config, model, params = _eval_model(args, args.bpd_timesteps)
    d = config.diffusion
    schedule = schedules.get_schedule(d.schedule, d.num_timesteps)
    apply = _apply(model)

    def bound(params, x, key):
        out = likelihood.calc_bpd_loop(
            schedule, jax.tree_util.Partial(apply, params), x, key=key,
            mean_type=d.mean_type, var_type=d.var_type, decoder_type=d.decoder_type,
        )
        return out["total_bpd"]

    mesh = sub_mesh(None)
    replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.data_sharded(mesh)
    images = np.random.default_rng(0).uniform(-1, 1, (args.bpd_batch,) + CIFAR_INFO.shape)
    x = jax.device_put(images.astype(np.float32), sharded)
    key = jax.random.key(3)
    jitted = jax.jit(bound, in_shardings=(replicated, sharded, replicated),
                     out_shardings=sharded)
    compiled, flops, compile_s = compile_timed(jitted, params, x, key)
    times, total_bpd = time_calls(lambda: compiled(params, x, key), steps=1, warmup=0)
    case = {
        "case": "bpd", "model": args.eval_model, "dtype": args.eval_dtype,
        "batch": args.bpd_batch, "devices": mesh.size, "num_timesteps": args.bpd_timesteps,
        "cpu_kernels": config.model.cpu_kernels,
        "compile_s": compile_s, "step_s": statistics.median(times),
        "step_s_all": [round(t, 4) for t in times],
        "mean_total_bpd_of_untrained_model": float(np.mean(total_bpd)),
        "memory": memory_report(compiled), "load_average": load_average(),
    }
    extra = ddpm_extra_flops(args.eval_model, args.bpd_batch, args.bpd_timesteps)
    add_rates(case, images=args.bpd_batch, flops=flops, extra=extra,
              peak=best_peak(peaks, args.eval_dtype, mesh.size))
    return case


def bench_ode_bpd(args, peaks: dict) -> dict[str, Any]:
    """`likelihood.ode_bpd` of the eval model as a score model (eps through the VP SDE of
    its T-step schedule): one timed call of the compiled solve; images/s and NFE."""
    config, model, params = _eval_model(args, args.bpd_timesteps)
    d = config.diffusion
    sde = sde_lib.DDPMVPSDE.from_schedule(schedules.get_schedule(d.schedule, d.num_timesteps))
    apply = _apply(model)

    def bpd(params, x, key):
        score_fn = sde_losses.score_fn_from_model(
            sde, jax.tree_util.Partial(apply, params), "eps")
        out = likelihood.ode_bpd(sde, score_fn, x, key=key, divergence="hutchinson",
                                 rtol=args.ode_tol, atol=args.ode_tol)
        return out["bpd"], out["nfe"][0]

    mesh = sub_mesh(None)
    replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.data_sharded(mesh)
    levels = np.random.default_rng(0).integers(0, 256, (args.bpd_batch,) + CIFAR_INFO.shape)
    x = jax.device_put((levels / 127.5 - 1.0).astype(np.float32), sharded)
    key = jax.random.key(4)
    jitted = jax.jit(bpd, in_shardings=(replicated, sharded, replicated),
                     out_shardings=(sharded, sharded))
    compiled, _, compile_s = compile_timed(jitted, params, x, key)
    times, (bpd_values, nfe) = time_calls(lambda: compiled(params, x, key), steps=1, warmup=0)
    step_s = statistics.median(times)
    return {
        "case": "ode_bpd", "model": args.eval_model, "dtype": args.eval_dtype,
        "batch": args.bpd_batch, "devices": mesh.size, "num_timesteps": args.bpd_timesteps,
        "rtol": args.ode_tol, "atol": args.ode_tol, "divergence": "hutchinson",
        "compile_s": compile_s, "step_s": step_s, "images_per_s": args.bpd_batch / step_s,
        "nfe_mean": float(np.mean(nfe)), "nfe_max": int(np.max(nfe)),
        "mean_bpd_of_untrained_model": float(np.mean(bpd_values)),
        "load_average": load_average(),
    }
