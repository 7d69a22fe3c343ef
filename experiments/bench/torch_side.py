"""PyTorch side by side (``--torch-python``): `experiments/benchmark_torch.py` run under
another Python interpreter, and its figures set against this run's.

`bench_torch` runs the script on the train models it builds (`TORCH_MODELS`) with this
run's batches and step counts, on the conv case's shapes and on the fid case's batch and
image size (pytorch-fid's Inception); `attach_torch` gives each float32 train case, each
conv case and the fid case its ``vs_torch`` ratio. The script itself imports nothing from
JAX: the interpreter that runs it needs only torch and diffusers (and pytorch-fid for the
fid case, which it reports as skipped without it).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import tempfile
from typing import Any

from experiments import benchmark_torch

from .conv import JAX_CONV_KINDS, conv_shapes
from .fid import fid_batch

TORCH_MODELS = tuple(benchmark_torch.MODELS)  # the configurations it builds
SCRIPT = pathlib.Path(benchmark_torch.__file__).resolve()


def bench_torch(args) -> dict[str, Any]:
    """`experiments/benchmark_torch.py` under ``--torch-python`` on the train models it
    has, with this run's batches and step counts, and on the conv case's shapes; its
    JSON, or RuntimeError with its output when it fails. The fid case's batch is the
    one JAX's extractor runs (a multiple of the device count)."""
    cases = args.cases.split(",")
    models = ([m for m in args.train_models.split(",") if m in TORCH_MODELS]
              if "train" in cases else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "torch.json"
        command = [args.torch_python, str(SCRIPT), f"--models={','.join(models)}",
                   f"--cifar-batch={args.train_batch}", f"--small-batch={args.small_batch}",
                   f"--steps={args.steps}", f"--warmup={args.warmup}"]
        if "conv" in cases:
            shapes = benchmark_torch.format_conv_shapes(conv_shapes(args.conv_model))
            command += [f"--conv-shapes={shapes}", f"--conv-batch={args.conv_batch}",
                        f"--conv-steps={args.conv_steps}"]
        if "fid" in cases:
            command += [f"--fid-batch={fid_batch(args.fid_batch)}",
                        f"--fid-size={args.fid_size}", f"--fid-steps={args.fid_steps}"]
        command.append(f"--out={out}")  # last: the recorded command leaves it out
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"the PyTorch benchmark failed (exit {proc.returncode}): {' '.join(command)}\n"
                f"{(proc.stdout + proc.stderr)[-3000:]}")
        result = json.loads(out.read_text())
    result["command"] = " ".join(command[:-1])
    return result


def conv_key(case: dict[str, Any]) -> tuple[int, int, int, int]:
    """What makes two conv cases (JAX's and PyTorch's) comparable: batch and shape."""
    return case["batch"], case["side"], case["in_ch"], case["out_ch"]


def attach_torch(cases: list[dict[str, Any]], torch_result: dict[str, Any]) -> None:
    """``vs_torch`` on each float32 JAX train case: its images/s over PyTorch's on the same
    model and batch (None where PyTorch has no such case); on each conv case, per kernel,
    its FLOP/s over PyTorch's on the same shape and batch; on the fid case, its images/s
    over pytorch-fid's on the same batch and image size (None where PyTorch skipped it)."""
    by_model = {(c["model"], c["batch"]): c["images_per_s"] for c in torch_result["cases"]}
    by_shape = {conv_key(c): c for c in torch_result.get("conv_cases", [])}
    by_fid = {(c["batch"], c["image_size"]): c for c in torch_result.get("fid_cases", [])
              if not c.get("skipped")}
    for case in cases:
        if case["case"] == "conv":
            theirs = by_shape.get(conv_key(case))
            case["vs_torch"] = None if not theirs else {
                kind: case[f"{kind}_flops_per_s"] / theirs[
                    f"{kind.removesuffix('_dilated')}_flops_per_s"]
                for kind in JAX_CONV_KINDS if f"{kind}_flops_per_s" in case}
        if case["case"] == "fid":
            theirs = by_fid.get((case["batch"], case["image_size"]))
            case["vs_torch"] = None if not theirs else case["images_per_s"] / theirs[
                "images_per_s"]
        if case["case"] == "train_step" and case.get("dtype") == "float32":
            theirs = by_model.get((case["model"], case["batch"]))
            case["vs_torch"] = None if not theirs else case["images_per_s"] / theirs
