"""The command line of `experiments/benchmark.py`: its flags (`parse_args`), and `run`,
which measures the matmul peaks and runs the chosen cases in order (PyTorch's first,
where asked), then `main`, which writes the JSON and the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

import jax

from diffusion_jax import sampling
from diffusion_jax.models import conv as conv_lib

from . import __doc__ as PACKAGE_DOC
from .conv import bench_conv
from .evaluation import bench_bpd, bench_ode_bpd, bench_sampling
from .fid import bench_fid
from .report import finalize_fractions, markdown_table
from .timing import PEAK_HOW, environment, load_average, measure_peak, peak_key
from .torch_side import TORCH_MODELS, attach_torch, bench_torch
from .train import bench_data, bench_loop, bench_train

SAMPLERS = sampling.SAMPLERS
ALL_CASES = ("train", "conv", "sample", "bpd", "ode_bpd", "fid", "data", "loop")


def _cpu_kernels_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in conv_lib.CPU_KERNELS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"--cpu-kernels takes distinct names among {list(conv_lib.CPU_KERNELS)}, "
            f"comma-separated; got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("--out", default="benchmark.json", help="where to write the JSON")
    p.add_argument("--markdown", default=None, help="also write the cases as a markdown table")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out / --markdown file (else the run refuses "
                        "to start)")
    p.add_argument("--cases", default=",".join(ALL_CASES), help=f"any of {ALL_CASES}")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a micro U-Net, tiny batches, T = 50 (no real figures)")
    p.add_argument("--cpu-devices", default="cores",
                   help="CPU backend: 'cores' = one JAX device per core (unless XLA_FLAGS "
                        "sets a device count), or a number; ignored by GPU/TPU runs")
    p.add_argument("--meshes", default="1,all",
                   help="devices of the train-step mesh: '1' (one device, all cores as its "
                        "threads) and/or 'all' (data parallel over every device)")
    p.add_argument("--train-models", default="cifar,small")
    p.add_argument("--dtypes", default="float32,bfloat16", help="train step compute dtypes")
    p.add_argument("--bf16-models", default="small",
                   help="models also timed in bfloat16 when --dtypes has it ('all' for all)")
    p.add_argument("--train-batch", type=int, default=32, help="batch of the cifar model")
    p.add_argument("--small-batch", type=int, default=16, help="batch of the small model")
    p.add_argument("--steps", type=int, default=5, help="timed train steps per case")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed train steps after compiling (PyTorch's CPU step takes about "
                        "three to reach its steady speed: oneDNN primitives and the "
                        "allocator's pools are built on the first calls)")
    p.add_argument("--cpu-kernels", default="none", type=_cpu_kernels_list,
                   help="the U-Net's model.cpu_kernels, comma-separated: each float32 train "
                        "case runs once per name (so that one run compares them); the "
                        "sample, bpd and loop cases use the first: 'none' (XLA's "
                        "convolutions, the default path), 'dilated' or 'onednn' (the "
                        ".[onednn] extra and a C++ compiler)")
    p.add_argument("--conv-model", default="cifar",
                   help="U-Net whose levels give the conv case's shapes")
    p.add_argument("--conv-batch", type=int, default=32, help="batch of the conv case")
    p.add_argument("--conv-steps", type=int, default=9, help="timed calls per conv kernel")
    p.add_argument("--eval-model", default="small", help="network for sample and bpd")
    p.add_argument("--eval-dtype", default="float32")
    p.add_argument("--eval-steps", type=int, default=2, help="timed calls per sampler")
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=10, help="network evaluations")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--bpd-batch", type=int, default=2)
    p.add_argument("--bpd-timesteps", type=int, default=1000)
    p.add_argument("--ode-tol", type=float, default=1e-5,
                   help="rtol = atol of the ode_bpd case's adaptive solve")
    p.add_argument("--fid-batch", type=int, default=32,
                   help="global batch of the fid case (rounded up to a multiple of the "
                        "device count)")
    p.add_argument("--fid-size", type=int, default=32,
                   help="height = width of the fid case's images (resized to 299 inside "
                        "the network, as --mode=fid does)")
    p.add_argument("--fid-steps", type=int, default=3, help="timed calls of the fid case")
    p.add_argument("--data-batch", type=int, default=128)
    p.add_argument("--data-batches", type=int, default=50)
    p.add_argument("--prefetch", type=int, default=4, help="data.prefetch for data and loop")
    p.add_argument("--loop-model", default="small")
    p.add_argument("--loop-batch", type=int, default=16)
    p.add_argument("--loop-steps", type=int, default=8)
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak")
    p.add_argument("--profile-dir", default=None,
                   help="trace one more step of each train case there and report its op time "
                        "by kind (convolutions forward / input grad / weight grad, matmuls, ...)")
    p.add_argument("--torch-python", default=None,
                   help="a Python with torch and diffusers (and pytorch-fid for the fid "
                        "case): run experiments/benchmark_torch.py on the same train, conv "
                        "and fid cases first, side by side in this run")
    args = p.parse_args(argv)
    existing = [path for path in (args.out, args.markdown)
                if path is not None and os.path.exists(path)]
    if existing and not args.overwrite:
        p.error(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''} "
                "(an earlier run's results?); choose another --out / --markdown or pass "
                "--overwrite to replace them")
    unknown = set(args.cases.split(",")) - set(ALL_CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; valid: {ALL_CASES}")
    for name in ("fid_batch", "fid_size", "fid_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if set(args.meshes.split(",")) - {"1", "all"}:
        p.error(f"--meshes takes '1' and/or 'all'; got {args.meshes!r}")
    if args.torch_python is not None:
        if not (os.path.isfile(args.torch_python) and os.access(args.torch_python, os.X_OK)):
            p.error(f"--torch-python={args.torch_python!r} is not an executable file; give "
                    "the path of a Python interpreter that has torch and diffusers")
        if not {"train", "conv", "fid"} & set(args.cases.split(",")):
            p.error("--torch-python compares train steps, convolutions and the FID "
                    "features; add 'train', 'conv' or 'fid' to --cases")
        if args.quick:
            p.error("--quick trains the micro U-Net, which the PyTorch benchmark does not "
                    "build; leave out --quick or --torch-python")
        if "train" in args.cases.split(",") and not (
                set(args.train_models.split(",")) & set(TORCH_MODELS)):
            p.error(f"--torch-python covers the train models {TORCH_MODELS}; "
                    f"--train-models is {args.train_models!r}")
    return args


def set_cpu_devices(setting: str) -> None:
    """Before the backend starts: how many devices the CPU backend shows (see --help)."""
    if setting == "cores":
        if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
            return
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    else:
        count = int(setting)
    jax.config.update("jax_num_cpu_devices", count)


def apply_quick(args) -> None:
    """--quick: a micro U-Net and batches of one or two per device (after device setup)."""
    devices = jax.device_count()
    args.train_models, args.bf16_models, args.conv_model = "micro", "micro", "micro"
    args.conv_batch, args.conv_steps = 2, 2
    args.train_batch = args.small_batch = args.loop_batch = 2 * devices
    args.steps, args.eval_steps, args.eval_model, args.loop_model = 2, 1, "micro", "micro"
    args.warmup = 1
    args.sample_batch = args.bpd_batch = devices
    args.sample_steps, args.bpd_timesteps, args.ode_tol = 2, 50, 1e-2
    args.data_batch, args.data_batches, args.loop_steps = 16, 3, 4
    # One image per device; the input size does not change the network's cost (every
    # image is resized to 299 x 299), only the resize's.
    args.fid_batch, args.fid_steps = devices, 2
    args.peak_size = args.peak_size or 256


def run(args) -> dict[str, Any]:
    """The run's JSON object: the environment, the matmul peaks, then each case asked for
    (PyTorch's first, where asked), with fractions of the run's best peaks."""
    cases_wanted = args.cases.split(",")
    result: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "environment": environment(), "load_average_start": load_average(),
    }
    if args.peak_size is None:
        args.peak_size = 4096 if jax.devices()[0].platform == "cpu" else 8192
    dtypes = args.dtypes.split(",")
    peaks: dict[str, list[float]] = {}
    meshes = sorted({1 if m == "1" else jax.device_count() for m in args.meshes.split(",")})
    eval_dtypes = {args.eval_dtype} if {"sample", "bpd"} & set(cases_wanted) else set()
    peak_cases = {(dt, devices) for dt in set(dtypes) | eval_dtypes
                  for devices in set(meshes) | ({jax.device_count()} if eval_dtypes else set())}
    if "fid" in cases_wanted:  # float32, over every local device
        peak_cases.add(("float32", jax.local_device_count()))
    result["peak_matmul"] = {}
    for dt, devices in sorted(peak_cases):
        peak = measure_peak(dt, args.peak_size, reps=5, num_devices=devices)
        result["peak_matmul"][peak_key(dt, devices)] = peak
        peaks.setdefault(peak_key(dt, devices), []).append(peak["flops_per_s"])
    result["peak_how"] = PEAK_HOW
    cases: list[dict[str, Any]] = []

    def add(new_cases):
        for case in new_cases if isinstance(new_cases, list) else [new_cases]:
            cases.append(case)
            print(f"# {json.dumps(case)}", file=sys.stderr, flush=True)

    if args.torch_python:
        if jax.devices()[0].platform != "cpu":
            raise SystemExit("--torch-python compares with PyTorch on the CPU "
                             "(experiments/benchmark_torch.py runs there); JAX runs on "
                             f"{jax.devices()[0].platform} here: run both on a CPU")
        # First, so that a missing torch fails the run before the long JAX cases.
        result["torch"] = bench_torch(args)
        print(f"# torch: {json.dumps(result['torch']['cases'])} "
              f"{json.dumps(result['torch'].get('fid_cases', []))}", file=sys.stderr, flush=True)
    if "train" in cases_wanted:
        for model in args.train_models.split(","):
            batch = args.train_batch if model == "cifar" else args.small_batch
            for dtype in dtypes:
                if dtype != "float32" and args.bf16_models != "all" and (
                        model not in args.bf16_models.split(",")):
                    continue
                kernels = args.cpu_kernels if dtype == "float32" else ["none"]
                for cpu_kernels in kernels:
                    for devices in meshes:
                        add(bench_train(model, dtype, batch, devices, args, peaks,
                                        cpu_kernels=cpu_kernels))
    if "conv" in cases_wanted:
        add(bench_conv(args, peaks))
    if "sample" in cases_wanted:
        add(bench_sampling(args, peaks))
    if "bpd" in cases_wanted:
        add(bench_bpd(args, peaks))
    if "ode_bpd" in cases_wanted:
        add(bench_ode_bpd(args, peaks))
    if "fid" in cases_wanted:
        add(bench_fid(args, peaks))
    if "data" in cases_wanted:
        add(bench_data(args))
    if "loop" in cases_wanted:
        add(bench_loop(args))
    finalize_fractions(cases, peaks)
    result["cases"] = cases
    if "torch" in result:
        attach_torch(cases, result["torch"])
    result["peak_flops_per_s"] = {key: max(v) for key, v in peaks.items()}
    result["load_average_end"] = load_average()
    return result


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    set_cpu_devices(args.cpu_devices)
    if args.quick:
        apply_quick(args)
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    pathlib.Path(args.out).write_text(text + "\n")
    if args.markdown:
        pathlib.Path(args.markdown).write_text(markdown_table(result) + "\n")
    return result
