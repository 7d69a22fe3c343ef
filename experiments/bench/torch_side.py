"""PyTorch side by side (``--torch-python``): `experiments/benchmark_torch.py` run under
another Python interpreter, and its figures set against this run's.

`bench_torch` runs the script on the train models it builds (`TORCH_MODELS`) with this
run's batches and step counts, and on the conv case's shapes; `attach_torch` gives each
float32 train case and each conv case its ``vs_torch`` ratio. The script itself imports
nothing from JAX: the interpreter that runs it needs only torch and diffusers.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import tempfile
from typing import Any

from experiments import benchmark_torch

from .conv import JAX_CONV_KINDS, conv_shapes

TORCH_MODELS = tuple(benchmark_torch.MODELS)  # the configurations it builds
SCRIPT = pathlib.Path(benchmark_torch.__file__).resolve()


def bench_torch(args) -> dict[str, Any]:
    """`experiments/benchmark_torch.py` under ``--torch-python`` on the train models it
    has, with this run's batches and step counts, and on the conv case's shapes; its
    JSON, or RuntimeError with its output when it fails."""
    cases = args.cases.split(",")
    models = ([m for m in args.train_models.split(",") if m in TORCH_MODELS]
              if "train" in cases else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "torch.json"
        command = [args.torch_python, str(SCRIPT), f"--models={','.join(models)}",
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


def conv_key(case: dict[str, Any]) -> tuple[int, int, int, int]:
    """What makes two conv cases (JAX's and PyTorch's) comparable: batch and shape."""
    return case["batch"], case["side"], case["in_ch"], case["out_ch"]


def attach_torch(cases: list[dict[str, Any]], torch_result: dict[str, Any]) -> None:
    """``vs_torch`` on each float32 JAX train case: its images/s over PyTorch's on the same
    model and batch (None where PyTorch has no such case); on each conv case, per kernel,
    its FLOP/s over PyTorch's on the same shape and batch."""
    by_model = {(c["model"], c["batch"]): c["images_per_s"] for c in torch_result["cases"]}
    by_shape = {conv_key(c): c for c in torch_result.get("conv_cases", [])}
    for case in cases:
        if case["case"] == "conv":
            theirs = by_shape.get(conv_key(case))
            case["vs_torch"] = None if not theirs else {
                kind: case[f"{kind}_flops_per_s"] / theirs[
                    f"{kind.removesuffix('_dilated')}_flops_per_s"]
                for kind in JAX_CONV_KINDS if f"{kind}_flops_per_s" in case}
        if case["case"] == "train_step" and case.get("dtype") == "float32":
            theirs = by_model.get((case["model"], case["batch"]))
            case["vs_torch"] = None if not theirs else case["images_per_s"] / theirs
