"""The training cases: the train step (``train``), the input pipeline (``data``) and the
training loop itself (``loop``).

- `bench_train`: the train step (loss, gradient, Adam, EMA) as `train.train_and_evaluate`
  jits it, on a mesh of one or several devices: compile time, step time, FLOPs, cores
  busy, retraces, memory, and optionally an op profile of one more step;
- `bench_data`: mocked CIFAR-10 through TFDS + grain with the training's reader threads
  and batch function, images/s with and without prefetch;
- `bench_loop`: ``train.train_and_evaluate`` on mocked CIFAR-10, its own logged images/s
  and the share of time it waited for input.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from diffusion_jax import data
from diffusion_jax.training import mesh as mesh_lib
from diffusion_jax.training import objectives, step as step_lib
from diffusion_jax.training.state import TrainState, make_optimizer

from .flops import add_rates, xla_flops
from .models import CIFAR_INFO, ddpm_extra_flops, make_config
from .op_profile import profile_step
from .timing import (best_peak, compile_timed, load_average, measure_peak, memory_report,
                     peak_key, sub_mesh, time_calls)


def bench_train(model: str, dtype: str, batch: int, num_devices: int | None, args,
                peaks: dict, *, cpu_kernels: str = "none") -> dict[str, Any]:
    """The train step on a mesh of ``num_devices`` devices, as `train.train_and_evaluate`
    jits it: donated state, replicated parameters, the batch split over ``data``; the
    U-Net's ``model.cpu_kernels`` is ``cpu_kernels`` (float32 only)."""
    config = make_config(model, dtype, cpu_kernels=cpu_kernels)
    objective = objectives.create_objective(config, CIFAR_INFO)
    optimizer = make_optimizer(config.optim)
    mesh = sub_mesh(num_devices)
    replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.data_sharded(mesh)
    state = jax.jit(
        lambda key: TrainState.create(objective.init(key), optimizer), out_shardings=replicated
    )(jax.random.key(0))
    images = np.random.default_rng(0).uniform(-1, 1, (batch,) + CIFAR_INFO.shape)
    batch_arrays = mesh_lib.global_batch({"image": images.astype(np.float32)}, sharded)

    traces = []
    step_fn = step_lib.make_train_step(
        loss_fn=objective.loss, optimizer=optimizer, root_key=jax.random.key(1),
        ema_decay=config.optim.ema_decay,
    )

    def counted_step(state, batch):
        traces.append(None)  # runs only while tracing
        return step_fn(state, batch)

    train_step = jax.jit(
        counted_step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    compiled, flops, compile_s = compile_timed(train_step, state, batch_arrays)
    # Next to the case too: other work on a shared machine moves it.
    peak = measure_peak(dtype, args.peak_size, reps=3, num_devices=mesh.size)
    old_leaf = jax.tree.leaves(state.params)[0]
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = train_step(holder["state"], batch_arrays)
        return holder["state"], metrics

    start_cpu = time.process_time()
    times, _ = time_calls(one_step, steps=args.steps, warmup=args.warmup)
    cpu_s = time.process_time() - start_cpu
    case = {
        "case": "train_step", "model": model, "dtype": dtype, "batch": batch,
        "devices": mesh.size,
        "cpu_kernels": config.model.cpu_kernels,
        "params": int(sum(x.size for x in jax.tree.leaves(holder["state"].params))),
        "compile_s": compile_s, "step_s": statistics.median(times),
        "step_s_all": [round(t, 4) for t in times],
        # CPU seconds of this process per wall second over the timed and warm-up steps:
        # how many cores the step keeps busy (on a CPU backend).
        "cores_busy": cpu_s / (sum(times) * (1 + args.warmup / max(args.steps, 1))),
        # XLA's cost analysis of a partitioned program is not the global count: one device.
        "xla_flops": xla_flops(compiled) if mesh.size == 1 else None,
        "traces": len(traces), "state_donated": bool(old_leaf.is_deleted()),
        "peak_next_to_case_flops_per_s": peak["flops_per_s"],
        "memory": memory_report(compiled), "load_average": load_average(),
    }
    if args.profile_dir:
        label = f"train_{model}_{dtype}_{mesh.size}dev"
        try:
            case["profile"] = profile_step(one_step, compiled.as_text(),
                                           os.path.join(args.profile_dir, label))
        except RuntimeError as error:  # a backend whose trace lacks op names: keep the run
            case["profile"] = {"error": str(error)}
    peaks.setdefault(peak_key(dtype, mesh.size), []).append(peak["flops_per_s"])
    add_rates(case, images=batch, flops=flops, extra=ddpm_extra_flops(model, batch, 3),
              peak=best_peak(peaks, dtype, mesh.size))
    return case


def _mock_cifar_config(prefetch: int) -> dict[str, Any]:
    return {"name": "cifar10", "mock": True, "mock_num_examples": 1024, "random_flip": True,
            "prefetch": prefetch}


def bench_data(args) -> list[dict[str, Any]]:
    cases = []
    for prefetch in (args.prefetch, 0):
        iterator = data.create_data_iterator(
            _mock_cifar_config(prefetch), per_process_batch=args.data_batch, seed=0,
            start_step=0, process_index=0, process_count=1,
        )
        next(iterator)  # readers started, first batch ready
        # Many more batches than the prefetch buffer holds: the sustained rate.
        count = max(args.data_batches, 5 * prefetch)
        start = time.perf_counter()
        for _ in range(count):
            next(iterator)
        seconds = (time.perf_counter() - start) / count
        cases.append({
            "case": "data", "source": "tfds mock_data cifar10 + grain", "prefetch": prefetch,
            "batch": args.data_batch, "step_s": seconds, "images_per_s": args.data_batch / seconds,
            "load_average": load_average(),
        })
    return cases


def bench_loop(args) -> dict[str, Any]:
    """``train.train_and_evaluate`` on mocked CIFAR-10: its own logged figures."""
    from diffusion_jax.training import train

    config = make_config(args.loop_model, cpu_kernels=args.cpu_kernels[0])
    config.data.mock, config.data.mock_num_examples = True, 1024
    config.data.prefetch = args.prefetch
    config.optim.warmup_steps = 10
    config.train.batch_size = args.loop_batch
    config.train.num_steps = args.loop_steps
    config.train.log_every = args.loop_steps // 2  # first log includes the compile
    config.train.checkpoint_every = 10**9
    config.train.sample_every = 0
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        wall = time.perf_counter() - start
        lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])  # the second half: compiled, steady state
    return {
        "case": "train_loop", "model": args.loop_model, "batch": args.loop_batch,
        "devices": jax.device_count(), "cpu_kernels": config.model.cpu_kernels,
        "steps": args.loop_steps, "wall_s_with_compile": wall,
        "steps_per_sec": last.get("steps_per_sec"), "images_per_s": last.get("images_per_sec"),
        "data_wait_fraction": last.get("data_wait_fraction"),
        "load_average": load_average(),
    }
