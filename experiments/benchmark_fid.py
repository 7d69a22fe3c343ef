r"""Throughput of --mode=fid's feature extraction: images/s of the FID Inception (resize to
299 included) or the digits network, split over every local device. Prints one JSON object.

  python experiments/benchmark_fid.py --network=digits --batch=64

The Inception's figures belong to the project's benchmark, with its compile time, FLOPs,
fraction of the matmul peak and pytorch-fid beside it (`experiments/bench/fid.py`):

  python experiments/benchmark.py --cases=fid --fid-batch=32 --out=/tmp/fid.json

Random weights of the right shapes stand in for pytorch-fid's (the speed does not depend
on their values), so no weights file is needed. Reports the device kind, so the same
command gives GPU and TPU figures where it runs there.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from diffusion_jax.metrics import digits, features, inception  # noqa: E402
from experiments.bench.fid import random_inception_variables  # noqa: E402


def measure(network: str, batch: int, size: int, repeats: int) -> dict:
    if network == "inception":
        apply_fn, variables, shape = inception.InceptionV3().apply, random_inception_variables(), (
            size, size, 3)
    else:
        apply_fn, variables, shape = (digits.apply_digits_net,
                                      digits.train_digits_classifier().params, (8, 8, 1))
    extractor = features.FeatureExtractor(apply_fn, variables, batch)
    images = np.random.default_rng(0).random((extractor.batch_size, *shape), dtype=np.float32)
    start = time.perf_counter()
    extractor(images)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        extractor(images)
    seconds = (time.perf_counter() - start) / repeats
    return {"network": network, "batch": extractor.batch_size, "image_shape": list(shape),
            "devices": extractor.mesh.devices.size, "device_kind": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform, "first_call_s": round(compile_s, 3),
            "images_per_sec": round(extractor.batch_size / seconds, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", choices=("inception", "digits"), default="inception")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="input height = width (Inception)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.network, args.batch, args.size, args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
