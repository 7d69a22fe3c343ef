"""Timing and the machine: timed calls, compile time, the matmul peak, memory, environment.

- `time_calls`: wall seconds of calls waited for with ``block_until_ready``;
- `compile_timed`: trace + lower + compile time of a jitted call, with its `model_flops`;
- `measure_peak`: the best matmul FLOP/s on a set of devices (`PEAK_HOW`), kept per
  dtype and device count (`peak_key`, `best_peak`);
- `memory_report`: XLA's memory analysis, the device's and the host's peak use;
- `environment`, `load_average`: what the run ran on, and how busy the machine was.
"""

from __future__ import annotations

import os
import pathlib
import platform
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffusion_jax.training import mesh as mesh_lib

from .flops import model_flops


def time_calls(fn: Callable[[], Any], *, steps: int, warmup: int) -> tuple[list[float], Any]:
    """Wall seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones, and the last
    result; each call's result is waited for (``block_until_ready``), so the device time
    is included."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times, result = [], None
    for _ in range(steps):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times, result


def compile_timed(jitted, *args):
    """(compiled, model FLOPs, seconds for trace + lower + XLA compile) of ``jitted(*args)``."""
    start = time.perf_counter()
    traced = jitted.trace(*args)
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
    return compiled, model_flops(traced.jaxpr.jaxpr), seconds


def memory_report(compiled) -> dict[str, Any]:
    """Compiled sizes (XLA memory analysis), device peak where reported, host peak RSS."""
    out: dict[str, Any] = {}
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        stats = None
    if stats is not None:
        for name in ("argument", "output", "temp", "alias"):
            out[f"{name}_bytes"] = int(getattr(stats, f"{name}_size_in_bytes"))
    device_stats = jax.local_devices()[0].memory_stats()
    if device_stats and "peak_bytes_in_use" in device_stats:
        out["device_peak_bytes_in_use"] = int(device_stats["peak_bytes_in_use"])
    # ru_maxrss is KiB on Linux (bytes on macOS): the process's high-water mark so far.
    scale = 1 if sys.platform == "darwin" else 1024
    out["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return out


def sub_mesh(num_devices: int | None):
    """A ``data`` mesh over the first ``num_devices`` devices (None: all of them)."""
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    return Mesh(np.asarray(devices), (mesh_lib.DATA_AXIS,))


PEAK_HOW = (
    "the best FLOP/s of every matmul peak measured in the run for the case's dtype and "
    "device count: n x n x n products at n = --peak-size and --peak-size / 2, each the "
    "fastest of its timed calls, measured at the start and next to each train case; on a "
    "mesh of several devices every device multiplies its own pair at once (one sharded "
    "batched matmul) and the FLOPs of all devices count")


def measure_peak(dtype: str, n: int, reps: int, num_devices: int = 1) -> dict[str, Any]:
    """The best FLOP/s of an n x n x n matmul in ``dtype`` (float32 accumulation as XLA
    chooses) over the sizes n / 2 and n and ``reps`` timed calls each, on the first
    ``num_devices`` devices at once (a batched matmul split over them: each device
    multiplies its own pair). The best, not the median, so that it bounds what a
    network's convolutions and matmuls reach on the same devices (`PEAK_HOW`)."""
    mesh = sub_mesh(num_devices)
    sharding = mesh_lib.data_sharded(mesh)
    by_size = {}
    for size in sorted({max(n // 2, 16), n}):
        shape = (mesh.size, size, size)
        a = jax.device_put(jax.random.normal(jax.random.key(0), shape).astype(dtype), sharding)
        b = jax.device_put(jax.random.normal(jax.random.key(1), shape).astype(dtype), sharding)
        matmul = jax.jit(jnp.matmul, out_shardings=sharding)
        times, _ = time_calls(lambda: matmul(a, b), steps=reps, warmup=1)
        by_size[str(size)] = mesh.size * 2.0 * size**3 / min(times)
    return {"n": n, "devices": mesh.size, "flops_per_s": max(by_size.values()),
            "best_flops_per_s_by_n": by_size}


def peak_key(dtype: str, num_devices: int) -> str:
    """The key of a peak in the run's ``peaks`` (dtype -> measured FLOP/s) and its JSON."""
    return f"{dtype}@{num_devices}"


def best_peak(peaks: dict, dtype: str, num_devices: int = 1) -> float | None:
    """The best matmul FLOP/s measured so far for ``dtype`` on ``num_devices`` (`PEAK_HOW`)."""
    values = peaks.get(peak_key(dtype, num_devices))
    return max(values) if values else None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import flax
    import jaxlib

    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "host_cpu": cpu_model(),
        "host_cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "flax_version": flax.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
