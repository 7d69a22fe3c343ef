"""The ``fid`` case: ``--mode=fid``'s feature extraction, pytorch-fid's FID Inception in Flax.

`bench_fid` times `features.FeatureExtractor` on `inception.InceptionV3` as ``--mode=fid``
runs it: float images of ``--fid-size`` x ``--fid-size`` resized to 299 x 299 inside the
network, the 2048-d pool features and the logits back on the host as NumPy, the global
batch ``--fid-batch`` (rounded up to a multiple of the device count, `fid_batch`) split
over every local device. Random weights of the right shapes
(`random_inception_variables`) stand in for pytorch-fid's: the speed does not depend on
their values, and no weights file is needed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.metrics import features, inception

from .flops import model_flops, xla_flops
from .timing import best_peak, load_average, memory_report, time_calls


def random_inception_variables(seed: int = 0) -> dict:
    """Variables of `InceptionV3`'s shapes, filled with scaled normal noise (no init pass:
    Flax's initialisers of 24M parameters take longer than the benchmark). Kernels are
    normal with variance 2 / fan-in and the batch norms the identity, so that activations
    keep their scale through the network (no vanishing values, no denormals)."""
    shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, 75, 75, 3)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "var":
            return np.ones(leaf.shape, np.float32)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return np.zeros(leaf.shape, np.float32) if name in ("bias", "mean") else np.ones(
            leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def fid_batch(batch: int) -> int:
    """The global batch `features.FeatureExtractor` runs for ``batch``: rounded up to a
    multiple of the local device count (PyTorch's side gets the same)."""
    devices = jax.local_device_count()
    return -(-batch // devices) * devices


def bench_fid(args, peaks: dict) -> dict[str, Any]:
    """`features.FeatureExtractor` on the FID Inception over every local device: compile
    time, the first call, the median of ``--fid-steps`` calls after ``--warmup`` more
    untimed ones (as PyTorch's side does), images/s, FLOPs
    per image (conv and matmul count of the jaxpr; XLA's cost analysis where the backend
    gives one) and the fraction of the float32 matmul peak on those devices."""
    extractor = features.FeatureExtractor(inception.InceptionV3().apply,
                                          random_inception_variables(), args.fid_batch)
    batch, devices = extractor.batch_size, extractor.mesh.devices.size
    size = args.fid_size
    images = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    start = time.perf_counter()
    traced = extractor.trace(images)
    compiled = traced.lower().compile()
    compile_s = time.perf_counter() - start
    flops = model_flops(traced.jaxpr.jaxpr)
    # A partitioned program's cost analysis is one device's share of the batch.
    per_device = xla_flops(compiled)
    start = time.perf_counter()
    out = extractor(images)
    first_call_s = time.perf_counter() - start
    assert out["pool"].shape == (batch, inception.FEATURE_DIM), out["pool"].shape
    times, _ = time_calls(lambda: extractor(images), steps=args.fid_steps,
                          warmup=args.warmup)
    step_s = statistics.median(times)
    case = {
        "case": "fid", "network": "inception", "dtype": "float32", "batch": batch,
        "devices": devices, "image_size": size, "input_size": inception.INPUT_SIZE,
        "outputs": sorted(out), "compile_s": compile_s, "first_call_s": first_call_s,
        "step_s": step_s, "step_s_all": [round(t, 4) for t in times],
        "images_per_s": batch / step_s,
        "model_flops": flops, "model_flops_per_image": flops / batch,
        "model_flops_per_s": flops / step_s,
        "memory": memory_report(compiled), "load_average": load_average(),
    }
    if per_device is not None:
        case["xla_flops"] = per_device * devices
        case["xla_flops_per_image"] = per_device * devices / batch
        case["xla_flops_per_s"] = per_device * devices / step_s
    peak = best_peak(peaks, "float32", devices)
    if peak:
        case["fraction_of_peak"] = flops / step_s / peak
    return case
