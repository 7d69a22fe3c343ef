"""Throughput benchmark: train steps, samplers, the full bound and the input pipeline.

Prints one JSON object and writes it to ``--out``. It reports the device (platform, kind,
count), the JAX version, the machine's measured peak (a large matmul in each precision,
timed in the same run, and again next to each train case, because other work on a shared
machine moves it) and, per case:

- ``compile_s``: trace + lower + compile of the case's jitted function;
- ``step_s``: the median of ``--steps`` timed calls after warm-up, each ended with
  ``block_until_ready`` (``step_s_all`` lists them);
- ``images_per_s``;
- ``xla_flops``: FLOPs of one call from XLA's cost analysis of the compiled program
  (every op, elementwise included; given for the loop-free train step on one device only,
  as XLA counts a loop body once and a partitioned program per device);
- ``model_flops``: 2 x the multiply-adds of every convolution and matmul the program runs,
  counted from its jaxpr with loops multiplied out, and ``ddpm_flops``: the same for
  DDPM's network as written, whose upsampling convolves the 2x-upsampled image (our
  `unet.Upsample` does the same arithmetic per output phase with 16/36 of the work); the
  convention of published figures;
- ``model_flops_per_s``, ``ddpm_flops_per_s`` and ``fraction_of_peak``,
  ``ddpm_fraction_of_peak``: per second, and over ``peak_flops_per_s``, the best matmul
  FLOP/s of the run in the case's precision on the case's devices (``peak_how`` in the
  JSON: several sizes and repetitions, all devices at once for data-parallel cases);
- ``memory``: the compiled program's argument/output/temporary bytes (XLA's memory
  analysis), the device's peak bytes in use where the backend reports it (GPU, TPU), and
  the process's peak resident set size (host RAM);
- train steps also: ``devices`` (mesh size), ``cores_busy`` (process CPU seconds per wall
  second), ``traces`` (1 = no retracing), ``state_donated``.

Cases (``--cases``, comma-separated):

- ``train``: the train step (loss, gradient, Adam, EMA) of ``--train-models`` (``cifar``:
  the DDPM CIFAR-10 U-Net, 35.7M parameters; ``small``: ch 64, ch_mult (1, 2, 2), one
  residual block, attention at 8x8, 4.4M) in each of ``--dtypes`` (``bfloat16``: bfloat16
  compute, float32 parameters and optimizer state), on a mesh of one device and/or of all
  devices (``--meshes``);
- ``conv``: a bare 3x3 convolution (stride 1, SAME padding, NHWC, float32) at each
  level of ``--conv-model``'s U-Net (the CIFAR one: 32x32 with 128 channels in and out,
  then 16x16, 8x8 and 4x4 with 256), batch ``--conv-batch``, on one device: its forward
  pass, its input gradient and its weight gradient (as XLA writes it, and in the dilated
  form of `diffusion_jax.models.conv`, ``weight_grad_dilated``), each jitted alone, with
  GFLOP/s (2 x B x H x W x 9 x C_in x C_out each) and the fraction of the matmul peak; the
  kernels a train step spends most of its time in, without the network around them;
- ``sample``: ancestral, DDIM and DPM-Solver++ with ``--sample-steps`` network
  evaluations each, one compiled loop per sampler; images/s and network evaluations x
  images per second;
- ``bpd``: `likelihood.calc_bpd_loop`, every term of the bound over ``--bpd-timesteps``
  steps (the full T = 1000 by default) in one compiled loop;
- ``ode_bpd``: `likelihood.ode_bpd`, bits/dim under the probability-flow ODE of the eval
  model read as a score model through its DDPM schedule's VP SDE (Hutchinson divergence,
  one dequantization draw, Tsit5 with rtol = atol = ``--ode-tol``), one compiled solve
  per example, the batch split over every device; images/s and the network evaluations
  (NFE) per example;
- ``data``: the input pipeline alone (mocked CIFAR-10 through TFDS + grain, the same
  reader threads and batch function as training), images/s, with and without prefetch;
- ``loop``: ``train.train_and_evaluate`` itself on mocked CIFAR-10 with the ``small``
  model: the loop's images/s and the fraction of wall time spent waiting for input
  (``data_wait_fraction`` from its metrics).

On a CPU the backend shows one device per core by default (``--cpu-devices``), so the
train step is timed both on one device (XLA spreads each op over the cores) and data
parallel over the cores (one device per core, each running its share of the batch), the
setting ``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>`` gives a training run.

Commands, from the repository root:

    python experiments/benchmark.py --out=/tmp/benchmark.json          # CPU: minutes
    python experiments/benchmark.py --quick --out=/tmp/quick.json      # smoke test
    python experiments/benchmark.py --train-batch=128 --small-batch=256 \
        --sample-batch=256 --bpd-batch=64 --data-batch=512 --eval-model=cifar \
        --dtypes=float32,bfloat16 --bf16-models=all --out=/tmp/gpu.json   # GPU / TPU

Side by side with PyTorch in the same run: ``--torch-python=PATH`` names a Python
interpreter that has ``torch`` and ``diffusers`` (they are not dependencies of this
project; any environment will do). Before the JAX train cases, it runs
`experiments/benchmark_torch.py` with that interpreter on the same models (``cifar``,
``small``), batches and step counts, and on the same bare convolutions (``conv``; NCHW,
the layout of the PyTorch network); its cases go under ``torch`` in the JSON (and as rows
of the markdown tables), each float32 JAX train case gets ``vs_torch``, its images/s
over PyTorch's, and each ``conv`` case ``vs_torch`` per kernel, its GFLOP/s over
PyTorch's:

    python experiments/benchmark.py --cases=train --dtypes=float32 \
        --torch-python=/path/to/venv/bin/python --out=/tmp/side_by_side.json

Where the time goes: ``--profile-dir=DIR`` traces one more step of each train case with
JAX's profiler (a timestamped folder under ``DIR/train_<model>_<dtype>_<n>dev``, with the
compiled program beside it as ``program.hlo.txt``; open the trace in Perfetto or
TensorBoard) and adds ``profile`` to the case: the op time summed by kind (convolutions
forward, input gradient and weight gradient, matmuls, reductions, collectives, data
movement, the rest), each kind's share and, for convolutions and matmuls, GFLOP/s; the
markdown gets a second table.
``experiments.bench.op_profile.op_time_by_kind(trace, program)`` sums a saved trace again.

Batches are global, split over the devices of the mesh (multiples of the device count).
``--cpu-kernels`` sets the U-Net's ``model.cpu_kernels`` for the float32 cases: 'none'
(the default path, XLA's convolutions), or the opt-ins 'dilated' and 'onednn'
(`diffusion_jax.models.conv`; oneDNN on one device uses every core, on several each
device convolves its shard of the batch on its share of the cores); the rows that used
an opt-in say which. Set ``XLA_FLAGS`` in the
environment to try XLA options; the JSON records them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# The PyTorch side's script imports nothing beyond the standard library until it runs.
from experiments import benchmark_torch  # noqa: E402
from diffusion_jax import sampling  # noqa: E402
from diffusion_jax.models import conv as conv_lib  # noqa: E402
from experiments.bench.conv import (  # noqa: E402
    CONV_KINDS, JAX_CONV_KINDS, bench_conv, conv_shapes)
from experiments.bench.evaluation import bench_bpd, bench_ode_bpd, bench_sampling  # noqa: E402
from experiments.bench.op_profile import OP_KINDS  # noqa: E402
from experiments.bench.timing import (  # noqa: E402
    PEAK_HOW, best_peak, environment, load_average, measure_peak, peak_key)
from experiments.bench.train import bench_data, bench_loop, bench_train  # noqa: E402

SAMPLERS = sampling.SAMPLERS
ALL_CASES = ("train", "conv", "sample", "bpd", "ode_bpd", "data", "loop")
TORCH_MODELS = tuple(benchmark_torch.MODELS)  # the configurations it builds


# --- report ---------------------------------------------------------------------------------


def finalize_fractions(cases: list[dict[str, Any]], peaks: dict) -> None:
    """Every case's fractions over the best peak of the whole run for its dtype and
    device count (a peak measured after a case may be higher than those before it)."""
    for case in cases:
        if "model_flops_per_s" not in case or case.get("case") == "conv":
            continue
        dtype = case.get("dtype", "float32")
        peak = best_peak(peaks, dtype, case.get("devices", 1))
        if not peak:
            continue
        case["peak_flops_per_s"] = peak
        case["fraction_of_peak"] = case["model_flops_per_s"] / peak
        case["ddpm_fraction_of_peak"] = case["ddpm_flops_per_s"] / peak
    for case in cases:  # the bare convolutions' kernels
        if case.get("case") != "conv" or not best_peak(peaks, "float32"):
            continue
        for key in [k for k in case if k.endswith("_fraction_of_peak")]:
            kind = key[: -len("_fraction_of_peak")]
            case[key] = case[f"{kind}_flops_per_s"] / best_peak(peaks, "float32")


# --- main -----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--cpu-kernels", default="none", choices=conv_lib.CPU_KERNELS,
                   help="the U-Net's model.cpu_kernels in the float32 train, sample, bpd and "
                        "loop cases: 'none' (XLA's convolutions, the default path), "
                        "'dilated' or 'onednn' (the .[onednn] extra and a C++ compiler)")
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
                   help="a Python with torch and diffusers: run experiments/benchmark_torch.py "
                        "on the same train cases first, side by side in this run")
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
    if set(args.meshes.split(",")) - {"1", "all"}:
        p.error(f"--meshes takes '1' and/or 'all'; got {args.meshes!r}")
    if args.torch_python is not None:
        if not (os.path.isfile(args.torch_python) and os.access(args.torch_python, os.X_OK)):
            p.error(f"--torch-python={args.torch_python!r} is not an executable file; give "
                    "the path of a Python interpreter that has torch and diffusers")
        if not {"train", "conv"} & set(args.cases.split(",")):
            p.error("--torch-python compares train steps and convolutions; add 'train' "
                    "or 'conv' to --cases")
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
    args.peak_size = args.peak_size or 256


def run(args) -> dict[str, Any]:
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
    result["peak_matmul"] = {}
    for dt in sorted(set(dtypes) | eval_dtypes):
        for devices in sorted(set(meshes) | ({jax.device_count()} if eval_dtypes else set())):
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
        print(f"# torch: {json.dumps(result['torch']['cases'])}", file=sys.stderr, flush=True)
    if "train" in cases_wanted:
        for model in args.train_models.split(","):
            batch = args.train_batch if model == "cifar" else args.small_batch
            for dtype in dtypes:
                if dtype != "float32" and args.bf16_models != "all" and (
                        model not in args.bf16_models.split(",")):
                    continue
                for devices in meshes:
                    add(bench_train(model, dtype, batch, devices, args, peaks))
    if "conv" in cases_wanted:
        add(bench_conv(args, peaks))
    if "sample" in cases_wanted:
        add(bench_sampling(args, peaks))
    if "bpd" in cases_wanted:
        add(bench_bpd(args, peaks))
    if "ode_bpd" in cases_wanted:
        add(bench_ode_bpd(args, peaks))
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


def bench_torch(args) -> dict[str, Any]:
    """`experiments/benchmark_torch.py` under ``--torch-python`` on the train models it
    has, with this run's batches and step counts, and on the conv case's shapes; its
    JSON, or RuntimeError with its output when it fails."""
    cases = args.cases.split(",")
    models = ([m for m in args.train_models.split(",") if m in TORCH_MODELS]
              if "train" in cases else [])
    script = pathlib.Path(__file__).resolve().parent / "benchmark_torch.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "torch.json"
        command = [args.torch_python, str(script), f"--models={','.join(models)}",
                   f"--cifar-batch={args.train_batch}", f"--small-batch={args.small_batch}",
                   f"--steps={args.steps}", f"--warmup={args.warmup}", f"--out={out}"]
        if "conv" in cases:
            shapes = benchmark_torch.format_conv_shapes(conv_shapes(args.conv_model))
            command += [f"--conv-shapes={shapes}", f"--conv-batch={args.conv_batch}",
                        f"--conv-steps={args.conv_steps}"]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"the PyTorch benchmark failed (exit {proc.returncode}): {' '.join(command)}\n"
                f"{(proc.stdout + proc.stderr)[-3000:]}")
        result = json.loads(out.read_text())
    result["command"] = " ".join(command[:-1])
    return result


def attach_torch(cases: list[dict[str, Any]], torch_result: dict[str, Any]) -> None:
    """``vs_torch`` on each float32 JAX train case: its images/s over PyTorch's on the same
    model and batch (None where PyTorch has no such case); on each conv case, per kernel,
    its FLOP/s over PyTorch's on the same shape and batch."""
    by_model = {(c["model"], c["batch"]): c["images_per_s"] for c in torch_result["cases"]}
    by_shape = {_conv_key(c): c for c in torch_result.get("conv_cases", [])}
    for case in cases:
        if case["case"] == "conv":
            theirs = by_shape.get(_conv_key(case))
            case["vs_torch"] = None if not theirs else {
                kind: case[f"{kind}_flops_per_s"] / theirs[
                    f"{kind.removesuffix('_dilated')}_flops_per_s"]
                for kind in JAX_CONV_KINDS if f"{kind}_flops_per_s" in case}
        if case["case"] == "train_step" and case.get("dtype") == "float32":
            theirs = by_model.get((case["model"], case["batch"]))
            case["vs_torch"] = None if not theirs else case["images_per_s"] / theirs


def _conv_key(case: dict[str, Any]) -> tuple[int, int, int, int]:
    return case["batch"], case["side"], case["in_ch"], case["out_ch"]


def _impl_label(case: dict[str, Any]) -> str:
    kernels = case.get("cpu_kernels", "none")
    return "" if kernels == "none" else f", cpu_kernels={kernels}"


def _train_label(case: dict[str, Any]) -> str:
    return f"train step, {case.get('model')} U-Net, {case.get('dtype')}{_impl_label(case)}"


def markdown_table(result: dict[str, Any]) -> str:
    """The cases of a result as markdown tables (the README's Performance section): the
    cases, then the bare convolutions (JAX and PyTorch side by side where the run has
    both), then the op profile of the train steps."""
    header = ["| case | batch | devices | compile s | s / call | images/s | GFLOP / call "
            "(DDPM count) | GFLOP/s | of peak (DDPM count) | host RSS GB | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for c in result["cases"]:
        if c["case"] == "conv":
            continue
        name = {"train_step": _train_label(c),
                "sample": f"sample, {c.get('sampler')}, {c.get('network_evals')} evaluations"
                          f"{_impl_label(c)}",
                "bpd": f"bound, T = {c.get('num_timesteps')}{_impl_label(c)}",
                "ode_bpd": f"ODE bits/dim, T = {c.get('num_timesteps')}, rtol {c.get('rtol')}"
                           f", NFE {c.get('nfe_mean', 0):.0f} per image",
                "data": f"input pipeline, prefetch {c.get('prefetch')}",
                "train_loop": f"train loop, {c.get('model')} U-Net{_impl_label(c)}, input "
                              f"wait {100 * (c.get('data_wait_fraction') or 0):.2f} %"}[c["case"]]

        def fmt(key, scale=1.0, digits=1):
            value = c.get(key)
            return "" if value is None else f"{value / scale:.{digits}f}"

        flops = (f"{fmt('model_flops', 1e9, 0)} ({fmt('ddpm_flops', 1e9, 0)})"
                 if "model_flops" in c else "")
        fraction = (f"{fmt('fraction_of_peak', 0.01, 0)} % "
                    f"({fmt('ddpm_fraction_of_peak', 0.01, 0)} %)"
                    if "fraction_of_peak" in c else "")
        rss = c.get("memory", {}).get("host_peak_rss_bytes")
        cells = [name, str(c.get("batch", "")), str(c.get("devices") or ""), fmt("compile_s"),
                 fmt("step_s", digits=3), fmt("images_per_s", digits=2), flops,
                 fmt("model_flops_per_s", 1e9, 0), fraction,
                 "" if rss is None else f"{rss / 1e9:.1f}",
                 str((c.get("load_average") or [""])[0])]
        rows.append("| " + " | ".join(cells) + " |")
    torch_result = result.get("torch")
    for c in (torch_result or {}).get("cases", []):
        name = (f"train step, {c['model']} U-Net, {c['dtype']}, PyTorch {torch_result['torch']}"
                f" + diffusers {torch_result['diffusers']} ({torch_result['threads']} threads)")
        cells = [name, str(c["batch"]), "", "", f"{c['step_s']:.3f}",
                 f"{c['images_per_s']:.2f}", "", "", "", "", ""]
        rows.append("| " + " | ".join(cells) + " |")
    sections = [header + rows if rows else [], _conv_table(result)]
    profiled = [c for c in result["cases"] if c.get("profile", {}).get("kinds")]
    if profiled:
        rows = ["Op time of one traced train step by kind (share of the summed op time; "
                "GFLOP/s of convolutions and matmuls):", "",
                "| case | devices | " + " | ".join(OP_KINDS) + " |",
                "|---|---|" + "---|" * len(OP_KINDS)]
        for c in profiled:
            kinds = c["profile"]["kinds"]
            cells = [_train_label(c), str(c["devices"])]
            for kind in OP_KINDS:
                k = kinds.get(kind)
                rate = f" ({k['gflop_per_s']:.0f})" if k and k.get("gflop_per_s") else ""
                cells.append("" if k is None else f"{100 * k['share']:.1f} %{rate}")
            rows.append("| " + " | ".join(cells) + " |")
        sections.append(rows)
    return "\n\n".join("\n".join(section) for section in sections if section)


def _conv_table(result: dict[str, Any]) -> list[str]:
    convs = [c for c in result["cases"] if c["case"] == "conv"]
    if not convs:
        return []
    torch_result = result.get("torch") or {}
    by_shape = {_conv_key(c): c for c in torch_result.get("conv_cases", [])}
    with_torch = any(_conv_key(c) in by_shape for c in convs)
    header = ("| 3x3 convolution, float32 | batch | forward | input grad | weight grad | "
              "weight grad, dilated |")
    if with_torch:
        header += (f" PyTorch {torch_result['torch']} ({torch_result['threads']} threads, "
                   "NCHW): forward | input grad | weight grad |")
    rows = ["Bare 3x3 convolution, GFLOP/s of each kernel alone (one device):", "",
            header, "|---|---|---|---|---|---|" + ("---|---|---|" if with_torch else "")]
    for c in convs:
        cells = [f"{c['side']}x{c['side']}, {c['in_ch']} -> {c['out_ch']} channels",
                 str(c["batch"])]
        cells += ["" if c.get(f"{kind}_flops_per_s") is None
                  else f"{c[f'{kind}_flops_per_s'] / 1e9:.0f}" for kind in JAX_CONV_KINDS]
        if with_torch:
            theirs = by_shape.get(_conv_key(c))
            cells += ["" if theirs is None else f"{theirs[f'{kind}_flops_per_s'] / 1e9:.0f}"
                      for kind in CONV_KINDS]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


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


if __name__ == "__main__":
    main()
