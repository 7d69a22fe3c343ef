"""Tests for experiments/benchmark.py and its package experiments/bench: its quick mode
runs and reports sane fields, its FLOP count is exact on known programs, and the U-Net's
fast upsampling (which the benchmark's figures rest on) equals DDPM's nearest-neighbour
upsampling followed by a 3x3 conv.

Nothing here depends on timings: speed belongs in the benchmark itself."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import conv as conv_lib
from diffusion_jax.models.unet import Upsample
from experiments.bench.cli import parse_args
from experiments.bench.conv import conv_kernels, conv_shapes
from experiments.bench.flops import model_flops
from experiments.bench.op_profile import OP_KINDS, classify_op, parse_hlo, profile_step
from experiments.bench.report import markdown_table
from experiments.bench.torch_side import attach_torch, bench_torch

from tests.helpers import onednn_skip_reason

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "benchmark.py"


@pytest.fixture(autouse=True)
def _in_a_fresh_directory(tmp_path, monkeypatch):
    """parse_args refuses an existing --out (default benchmark.json in the working
    directory): a benchmark.json left in the checkout by a real run must not fail tests
    that parse arguments without --out."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = dict(os.environ)
    # Two CPU devices (set by --cpu-devices, not the 8 fake ones of conftest). XLA's own
    # optimisation level: at level 0 the compiles are barely shorter and the ode_bpd
    # case's adaptive solve runs ten times slower (38 s against 4 s alone), which doubled
    # this run.
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cpu-devices=2", "--meshes=1",
         "--dtypes=float32", "--samplers=ddim", "--cases=train,conv,sample,bpd,ode_bpd,fid,data",
         f"--profile-dir={out.parent / 'trace'}", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == printed
    return printed


def _positive(value):
    return isinstance(value, (int, float)) and np.isfinite(value) and value > 0


def test_quick_mode_reports_environment_and_peak(quick_result):
    env = quick_result["environment"]
    assert env["platform"] == "cpu" and env["device_count"] == 2
    assert env["jax_version"] == jax.__version__
    assert env["device_kind"]
    peak = quick_result["peak_matmul"]["float32@1"]
    assert peak["n"] == 256 and _positive(peak["flops_per_s"]) and peak["devices"] == 1
    assert set(peak["best_flops_per_s_by_n"]) == {"128", "256"}
    assert peak["flops_per_s"] == max(peak["best_flops_per_s_by_n"].values())
    assert "best" in quick_result["peak_how"] and "every device" in quick_result["peak_how"]
    assert len(quick_result["load_average_start"]) == 3


def test_quick_mode_train_step_case(quick_result):
    (case,) = [c for c in quick_result["cases"] if c["case"] == "train_step"]
    assert case["model"] == "micro" and case["dtype"] == "float32"
    assert case["batch"] == 4 and case["devices"] == 1 and case["params"] > 100_000
    for field in ("compile_s", "step_s", "images_per_s", "xla_flops", "model_flops",
                  "ddpm_flops", "model_flops_per_s", "fraction_of_peak", "cores_busy"):
        assert _positive(case[field]), field
    assert len(case["step_s_all"]) == 2
    assert case["images_per_s"] == pytest.approx(4 / case["step_s"])
    # Over the best peak of the run (never below the one measured next to the case).
    assert case["peak_flops_per_s"] == quick_result["peak_flops_per_s"]["float32@1"]
    assert case["peak_flops_per_s"] >= case["peak_next_to_case_flops_per_s"]
    assert case["fraction_of_peak"] == pytest.approx(
        case["model_flops_per_s"] / case["peak_flops_per_s"])
    # The default path: XLA's convolutions, no CPU kernels.
    assert case["cpu_kernels"] == "none"
    # XLA counts elementwise work too; convolutions and matmuls are most of it.
    assert 0.5 < case["model_flops"] / case["xla_flops"] < 1.5
    # The micro U-Net has no upsampling layer: DDPM's count is ours.
    assert case["ddpm_flops"] == case["model_flops"]
    assert case["traces"] == 1 and case["state_donated"] is True
    memory = case["memory"]
    assert memory["argument_bytes"] > 4 * case["params"]  # params, EMA, Adam moments
    assert memory["host_peak_rss_bytes"] > 0
    # The traced step's convolutions and matmuls, found op by op in the compiled program,
    # are the jaxpr's count.
    kinds = case["profile"]["kinds"]
    assert sum(k["gflop"] or 0 for k in kinds.values()) * 1e9 == pytest.approx(
        case["model_flops"], rel=1e-6)
    assert kinds["conv weight grad"]["ops"] > 0 and _positive(case["profile"]["traced_step_s"])


def test_quick_mode_sampling_bound_and_data_cases(quick_result):
    """Sampling and the bound split their batch over both devices. (The ``loop`` case,
    `train.train_and_evaluate` itself, is left out for time: tests/test_compile_count.py
    runs the loop and checks its ``data_wait_fraction``.)"""
    by_case = {}
    for c in quick_result["cases"]:
        by_case.setdefault(c["case"], []).append(c)
    assert set(by_case) == {"train_step", "conv", "sample", "bpd", "ode_bpd", "fid", "data"}
    (sample,) = by_case["sample"]
    assert sample["sampler"] == "ddim" and sample["network_evals"] == 2
    assert sample["batch"] == 2 and sample["devices"] == 2
    assert sample["image_evals_per_s"] == pytest.approx(2 * sample["images_per_s"])
    (bpd,) = by_case["bpd"]
    assert bpd["num_timesteps"] == 50 and bpd["devices"] == 2
    # T network evaluations per image: the loop's FLOPs are T times one forward pass (the
    # sampler made 2 evaluations of the same batch size).
    assert bpd["batch"] == sample["batch"]
    assert bpd["model_flops"] == pytest.approx(50 / 2 * sample["model_flops"], rel=0.01)
    assert 0 < bpd["mean_total_bpd_of_untrained_model"] < 100
    assert {c["prefetch"] for c in by_case["data"]} == {4, 0}
    # The probability-flow ODE's bits/dim: an adaptive solve per image (6 evaluations a
    # Tsit5 step, plus the first), both images over the two devices.
    (ode,) = by_case["ode_bpd"]
    assert ode["devices"] == 2 and ode["batch"] == 2 and ode["rtol"] == 1e-2
    assert ode["nfe_max"] >= ode["nfe_mean"] >= 7 and (ode["nfe_max"] - 1) % 6 == 0
    assert np.isfinite(ode["mean_bpd_of_untrained_model"])
    for case in sample, bpd, ode, *by_case["data"]:
        assert _positive(case["images_per_s"]) and _positive(case["step_s"])


def test_quick_mode_conv_case(quick_result):
    """The micro U-Net has one level: one shape, 32x32 with 32 channels, batch 2."""
    (case,) = [c for c in quick_result["cases"] if c["case"] == "conv"]
    assert (case["side"], case["in_ch"], case["out_ch"], case["batch"]) == (32, 32, 32, 2)
    assert case["devices"] == 1 and case["dtype"] == "float32"
    assert case["flops"] == 2 * 2 * 32 * 32 * 9 * 32 * 32
    for kind in ("forward", "input_grad", "weight_grad", "weight_grad_dilated"):
        assert _positive(case[f"{kind}_s"]), kind
        assert case[f"{kind}_flops_per_s"] == pytest.approx(case["flops"] / case[f"{kind}_s"])
        assert _positive(case[f"{kind}_fraction_of_peak"]), kind


def test_quick_mode_fid_case(quick_result):
    """--mode=fid's extraction: one image per device (two), 32x32 resized to 299 inside the
    Inception, pool features and logits back; its FLOPs are the FID Inception's."""
    (case,) = [c for c in quick_result["cases"] if c["case"] == "fid"]
    assert (case["batch"], case["devices"], case["image_size"], case["input_size"]) == (
        2, 2, 32, 299)
    assert case["outputs"] == ["logits", "logits_unbiased", "pool"]
    for field in ("compile_s", "first_call_s", "step_s", "images_per_s", "model_flops",
                  "model_flops_per_s", "fraction_of_peak"):
        assert _positive(case[field]), field
    assert len(case["step_s_all"]) == 2
    assert case["images_per_s"] == pytest.approx(2 / case["step_s"])
    # pytorch-fid's Inception at 299 x 299: 5.7 G multiply-adds per image (with the resize
    # and the classifier, a few M more).
    assert 11.4e9 < case["model_flops_per_image"] < 11.5e9
    assert case["model_flops"] == 2 * case["model_flops_per_image"]
    # XLA's count of the per-device program, times the devices: the same network (it
    # counts elementwise work, and convolutions without their zero padding).
    assert 0.9 < case["xla_flops_per_image"] / case["model_flops_per_image"] < 1.1
    # Over the best float32 peak of the run on the same two devices.
    assert case["peak_flops_per_s"] == quick_result["peak_flops_per_s"]["float32@2"]
    assert case["fraction_of_peak"] == pytest.approx(
        case["model_flops_per_s"] / case["peak_flops_per_s"])
    assert case["fraction_of_peak"] <= 1
    assert "ddpm_fraction_of_peak" not in case and "vs_torch" not in case


def test_conv_shapes_are_the_levels_of_the_unets():
    assert conv_shapes("cifar") == [(32, 128, 128), (16, 256, 256), (8, 256, 256),
                                    (4, 256, 256)]
    assert conv_shapes("small") == [(32, 64, 64), (16, 128, 128), (8, 128, 128)]


def test_conv_kernels_are_the_convolution_and_its_gradients():
    """The timed kernels compute what a train step's differentiation computes: the
    forward pass, and the vector-Jacobian products in the input and in the weight."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 6, 6, 3))
    w = jax.random.normal(keys[1], (3, 3, 3, 4))
    dy = jax.random.normal(keys[2], (2, 6, 6, 4))
    kernels = conv_kernels()
    y, vjp = jax.vjp(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), x, w)
    dx, dw = vjp(dy)
    np.testing.assert_allclose(kernels["forward"](x, w, dy), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels["input_grad"](x, w, dy), dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels["weight_grad"](x, w, dy), dw, rtol=1e-5, atol=1e-5)
    # Independent of both: the weight gradient as a sum over the padded input's windows.
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((3, 3, 3, 4))
    for i in range(3):
        for j in range(3):
            expected[i, j] = np.einsum("nhwc,nhwo->co", xp[:, i:i + 6, j:j + 6],
                                       np.asarray(dy, np.float64))
    for kind in ("weight_grad", "weight_grad_dilated"):
        np.testing.assert_allclose(kernels[kind](x, w, dy), expected, rtol=1e-4, atol=1e-4)


def test_markdown_table_has_a_row_per_case(quick_result):
    table = markdown_table(quick_result).splitlines()
    cases = table[:table.index("")]  # then the bare convolutions and the op profile
    assert len(cases) == 2 + len([c for c in quick_result["cases"] if c["case"] != "conv"])
    assert all(row.startswith("| ") and row.endswith(" |") for row in cases[2:])
    impl = ""  # the default path names no CPU kernels
    assert cases[2].startswith(f"| train step, micro U-Net, float32{impl} | 4 | 1 |")
    conv_rows = [row for row in table if row.startswith("| 32x32, 32 -> 32 channels | 2 | ")]
    assert len(conv_rows) == 1 and conv_rows[0].count("|") == 7  # no PyTorch columns
    assert table[-1].startswith(f"| train step, micro U-Net, float32{impl} | 1 | ")
    (fid_row,) = [row for row in cases if row.startswith("| FID features")]
    assert fid_row.startswith("| FID features, Inception, 32 -> 299 | 2 | 2 | ")
    # No DDPM count for the Inception: the FLOP and fraction cells have one figure each.
    assert "(" not in fid_row and fid_row.count(" % |") == 1


# --- side by side with PyTorch (--torch-python) ---------------------------------------------

# Stands in for a Python with torch: answers benchmark_torch.py's command line with cases
# whose images/s encode the batch, and records the command it was given.
_FAKE_TORCH_PYTHON = """#!{python}
import json, sys
args = dict(a.split("=", 1) for a in sys.argv[2:])
if args["--steps"] == "99":
    sys.exit("no module named torch")
batches = {{"cifar": int(args["--cifar-batch"]), "small": int(args["--small-batch"])}}
cases = [{{"case": "train_step", "model": m, "batch": batches[m], "dtype": "float32",
          "step_s": 0.5, "images_per_s": 2.0 * batches[m]}}
         for m in args["--models"].split(",") if m]
convs = []
for shape in filter(None, args.get("--conv-shapes", "").split(",")):
    side, cin, cout = map(int, shape.split("x"))
    convs.append({{"case": "conv", "batch": int(args["--conv-batch"]), "side": side,
                  "in_ch": cin, "out_ch": cout, "forward_flops_per_s": 1e11,
                  "input_grad_flops_per_s": 2e11, "weight_grad_flops_per_s": 4e11}})
fids = []
if int(args.get("--fid-batch", 0)):
    batch, size = int(args["--fid-batch"]), int(args["--fid-size"])
    fids.append({{"case": "fid", "batch": batch, "image_size": size, "skipped": "no pytorch-fid"}}
                if size == 13 else {{"case": "fid", "batch": batch, "image_size": size,
                                    "pytorch_fid": "0.3.0", "step_s": 4.0,
                                    "images_per_s": batch / 4.0}})
json.dump({{"torch": "9.9", "diffusers": "0.1", "threads": 2, "argv": sys.argv[1:],
           "cases": cases, "conv_cases": convs, "fid_cases": fids}}, open(args["--out"], "w"))
"""


@pytest.fixture
def fake_torch_python(tmp_path):
    path = tmp_path / "python-with-torch"
    path.write_text(_FAKE_TORCH_PYTHON.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def test_torch_side_by_side_runs_the_torch_script_on_the_same_cases(fake_torch_python):
    args = parse_args([f"--torch-python={fake_torch_python}", "--train-models=cifar,micro",
                       "--train-batch=8", "--small-batch=4", "--steps=3", "--warmup=0"])
    result = bench_torch(args)
    # Only the models benchmark_torch.py builds, with this run's batches and step counts.
    assert [(c["model"], c["batch"]) for c in result["cases"]] == [("cifar", 8)]
    assert result["argv"][0].endswith("benchmark_torch.py")
    assert {"--models=cifar", "--cifar-batch=8", "--steps=3", "--warmup=0"} <= set(result["argv"])
    # The command line is one the real script's parser takes, with these values.
    spec = importlib.util.spec_from_file_location("benchmark_torch", result["argv"][0])
    torch_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_script)
    parsed = torch_script.parse_args(result["argv"][1:])
    assert (parsed.models, parsed.cifar_batch, parsed.small_batch, parsed.steps,
            parsed.warmup) == ("cifar", 8, 4, 3, 0)

    cases = [{"case": "train_step", "model": "cifar", "batch": 8, "dtype": "float32",
              "images_per_s": 4.0},
             {"case": "train_step", "model": "cifar", "batch": 8, "dtype": "bfloat16",
              "images_per_s": 5.0},
             {"case": "train_step", "model": "micro", "batch": 4, "dtype": "float32",
              "images_per_s": 9.0},
             {"case": "sample", "images_per_s": 1.0}]
    attach_torch(cases, result)
    assert cases[0]["vs_torch"] == pytest.approx(4.0 / 16.0)
    assert cases[2]["vs_torch"] is None  # PyTorch has no micro case
    assert "vs_torch" not in cases[1] and "vs_torch" not in cases[3]
    table = markdown_table({"cases": [], "torch": result}).splitlines()
    assert table[2].startswith("| train step, cifar U-Net, float32, PyTorch 9.9 + diffusers 0.1 "
                               "(2 threads) | 8 |  |  | 0.500 | 16.00 |")


def test_torch_side_by_side_on_the_bare_convolutions(fake_torch_python):
    """--cases=conv alone: no train models for PyTorch, the conv case's shapes and batch;
    each JAX conv case gets vs_torch per kernel, and the conv table PyTorch's columns."""
    args = parse_args([f"--torch-python={fake_torch_python}", "--cases=conv",
                       "--conv-model=small", "--conv-batch=4", "--conv-steps=3",
                       "--train-models=micro"])
    result = bench_torch(args)
    assert result["cases"] == []
    shapes = "--conv-shapes=32x64x64,16x128x128,8x128x128"
    assert {"--models=", shapes, "--conv-batch=4", "--conv-steps=3"} <= set(result["argv"])
    spec = importlib.util.spec_from_file_location("benchmark_torch", result["argv"][0])
    torch_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_script)
    parsed = torch_script.parse_args(result["argv"][1:])
    assert parsed.models == "" and parsed.conv_batch == 4 and parsed.conv_steps == 3
    assert parsed.conv_shapes == [(32, 64, 64), (16, 128, 128), (8, 128, 128)]

    ours = [{"case": "conv", "batch": 4, "side": side, "in_ch": c, "out_ch": c,
             "forward_flops_per_s": 2e11, "input_grad_flops_per_s": 2e11,
             "weight_grad_flops_per_s": 1e11, "weight_grad_dilated_flops_per_s": 3e11}
            for side, c in ((16, 128), (4, 256))]
    attach_torch(ours, result)
    # The dilated weight gradient is compared with PyTorch's weight gradient.
    assert ours[0]["vs_torch"] == pytest.approx(
        {"forward": 2.0, "input_grad": 1.0, "weight_grad": 0.25, "weight_grad_dilated": 0.75})
    assert ours[1]["vs_torch"] is None  # a shape PyTorch did not run
    table = markdown_table({"cases": ours, "torch": result}).splitlines()
    assert table[0] == "Bare 3x3 convolution, GFLOP/s of each kernel alone (one device):"
    assert "PyTorch 9.9 (2 threads, NCHW): forward | input grad | weight grad |" in table[2]
    assert table[4] == ("| 16x16, 128 -> 128 channels | 4 | 200 | 200 | 100 | 300 | 100 | 200 "
                        "| 400 |")
    assert table[5] == "| 4x4, 256 -> 256 channels | 4 | 200 | 200 | 100 | 300 |  |  |  |"


@pytest.mark.parametrize("shapes", ["32x128", "32x0x8", "axbxc", "32x128x128x1"])
def test_torch_script_rejects_bad_conv_shapes(shapes, capsys):
    spec = importlib.util.spec_from_file_location(
        "benchmark_torch", ROOT / "experiments" / "benchmark_torch.py")
    torch_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_script)
    with pytest.raises(SystemExit):
        torch_script.parse_args([f"--conv-shapes={shapes}"])
    assert "want SIDExCINxCOUT" in capsys.readouterr().err


def _torch_script():
    spec = importlib.util.spec_from_file_location(
        "benchmark_torch", ROOT / "experiments" / "benchmark_torch.py")
    torch_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_script)
    return torch_script


def test_torch_side_by_side_on_the_fid_features(fake_torch_python):
    """--cases=fid alone: PyTorch gets the batch JAX's extractor runs (rounded up to the
    device count: 8 here), the image size and the step count; the JAX fid case gets
    vs_torch, None where PyTorch skipped it (no pytorch-fid)."""
    args = parse_args([f"--torch-python={fake_torch_python}", "--cases=fid",
                       "--fid-batch=5", "--fid-size=40", "--fid-steps=2", "--warmup=1"])
    result = bench_torch(args)
    assert result["cases"] == [] and result["conv_cases"] == []
    assert {"--models=", "--fid-batch=8", "--fid-size=40", "--fid-steps=2",
            "--warmup=1"} <= set(result["argv"])
    assert result["argv"][-1].startswith("--out=")
    assert result["command"].endswith("--fid-steps=2")  # all but --out
    parsed = _torch_script().parse_args(result["argv"][1:])
    assert (parsed.models, parsed.fid_batch, parsed.fid_size, parsed.fid_steps,
            parsed.warmup) == ("", 8, 40, 2, 1)

    ours = [{"case": "fid", "batch": 8, "image_size": 40, "input_size": 299, "devices": 8,
             "step_s": 1.0, "images_per_s": 8.0}]
    attach_torch(ours, result)
    assert ours[0]["vs_torch"] == pytest.approx(8.0 / 2.0)
    table = markdown_table({"cases": ours, "torch": result}).splitlines()
    assert table[2].startswith("| FID features, Inception, 40 -> 299, 4.00x PyTorch | 8 | 8 |")
    assert table[3].startswith("| FID features, pytorch-fid 0.3.0 Inception, 40 -> 299, "
                               "PyTorch 9.9 (2 threads) | 8 |  |  | 4.000 | 2.00 |")

    skipped = bench_torch(parse_args([f"--torch-python={fake_torch_python}", "--cases=fid",
                                      "--fid-batch=8", "--fid-size=13"]))
    ours = [{"case": "fid", "batch": 8, "image_size": 13, "images_per_s": 8.0}]
    attach_torch(ours, skipped)
    assert ours[0]["vs_torch"] is None
    table = markdown_table({"cases": [], "torch": skipped}).splitlines()
    assert table[2].startswith("| FID features, pytorch-fid: skipped (no pytorch-fid) | 8 |")


def test_torch_script_times_pytorch_fids_inception_with_random_weights(monkeypatch):
    """The PyTorch side's network is pytorch-fid's own, built without fetching or loading
    its weights (pytorch-fid's loaders are put back after), at the JAX side's weight
    scale; without pytorch-fid the case is skipped with the reason."""
    torch = pytest.importorskip("torch")
    pt_inception = pytest.importorskip("pytorch_fid.inception")
    torch_script = _torch_script()

    def no_download(*args, **kwargs):
        raise AssertionError("the benchmark must not fetch pytorch-fid's weights")

    monkeypatch.setattr(pt_inception, "load_state_dict_from_url", no_download)
    originals = (pt_inception.load_state_dict_from_url, pt_inception.fid_inception_v3,
                 torch.nn.Module.load_state_dict)
    case = torch_script.bench_fid(batch=1, size=20, steps=1, warmup=0)
    assert (pt_inception.load_state_dict_from_url, pt_inception.fid_inception_v3,
            torch.nn.Module.load_state_dict) == originals
    assert case["batch"] == 1 and case["image_size"] == 20 and case["input_size"] == 299
    assert case["pytorch_fid"] and case["images_per_s"] == pytest.approx(1 / case["step_s"])
    assert _positive(case["first_call_s"]) and len(case["step_s_all"]) == 1

    wrapper, net = torch_script.build_fid_inception()
    conv = net.Mixed_7c.branch_pool.conv  # one of pytorch-fid's own FID blocks
    assert type(net.Mixed_7c).__name__ == "FIDInceptionE_2"
    assert float(conv.weight.std()) == pytest.approx((2.0 / conv.weight[0].numel()) ** 0.5,
                                                     rel=0.1)
    assert not wrapper.training and wrapper.resize_input and wrapper.normalize_input

    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails
    skipped = torch_script.fid_case(batch=2, size=32, steps=1, warmup=0)
    assert skipped["batch"] == 2 and "no pytorch-fid in" in skipped["skipped"]


def test_torch_side_by_side_failure_is_reported_with_its_output(fake_torch_python):
    args = parse_args([f"--torch-python={fake_torch_python}", "--steps=99"])  # it fails
    with pytest.raises(RuntimeError, match="(?s)PyTorch benchmark failed.*no module named torch"):
        bench_torch(args)


@pytest.mark.parametrize("argv, message", [
    (["--torch-python=/nonexistent/python"], "not an executable file"),
    (["--cases=sample"], "add 'train', 'conv' or 'fid' to --cases"),
    (["--train-models=micro"], "covers the train models"),
    (["--quick"], "leave out --quick or --torch-python"),
])
def test_torch_side_by_side_bad_arguments(argv, message, fake_torch_python, capsys):
    if not argv[0].startswith("--torch-python"):
        argv = argv + [f"--torch-python={fake_torch_python}"]
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


# --- the FLOP count -------------------------------------------------------------------------


def test_model_flops_counts_convolutions_and_dots_exactly():
    x = jnp.ones((2, 8, 6, 3))
    kernel = jnp.ones((3, 3, 3, 5))

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    conv_flops = 2 * (2 * 8 * 6 * 5) * (3 * 3 * 3)
    assert model_flops(jax.make_jaxpr(conv)(x, kernel).jaxpr) == conv_flops
    a, b = jnp.ones((4, 7)), jnp.ones((7, 9))
    assert model_flops(jax.make_jaxpr(jnp.matmul)(a, b).jaxpr) == 2 * 4 * 7 * 9
    # Gradients: each of the two backward convolutions costs what the forward one does.
    grad = jax.grad(lambda x, k: jnp.sum(conv(x, k)), argnums=(0, 1))
    assert model_flops(jax.make_jaxpr(grad)(x, kernel).jaxpr) == 3 * conv_flops

    # A scan body counts once per iteration, inside jit too; elementwise work not at all.
    def loop(a, b):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ b[:, :7]), None), a, None, length=5)[0]

    jaxpr = jax.make_jaxpr(jax.jit(loop))(a, jnp.ones((7, 7))).jaxpr
    assert model_flops(jaxpr) == 5 * 2 * 4 * 7 * 7


@pytest.mark.skipif(onednn_skip_reason() is not None, reason=str(onednn_skip_reason()))
def test_model_flops_counts_the_onednn_convolutions_as_xlas():
    x, kernel = jnp.ones((2, 8, 6, 3)), jnp.ones((3, 3, 3, 5))
    for argnums in ((0, 1), 1):  # both gradients, or the kernel's alone
        flops = {impl: model_flops(jax.make_jaxpr(jax.grad(
            lambda x_, k_, impl=impl: jnp.sum(conv_lib.conv2d(x_, k_, cpu_kernels=impl)),
            argnums=argnums))(x, kernel).jaxpr) for impl in ("none", "onednn")}
        assert flops["onednn"] == flops["none"] > 0


# --- the U-Net's sub-pixel upsampling ------------------------------------------------------


def _numpy_upsample_conv(x, kernel, bias):
    """DDPM's upsample: nearest neighbour x2, then a 'SAME' 3x3 conv; float64."""
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    b, h, w, _ = up.shape
    padded = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out + bias


@pytest.mark.parametrize("shape", [(2, 4, 4, 32), (1, 3, 5, 64)])
def test_upsample_conv_equals_nearest_neighbour_then_3x3_conv(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    layer = Upsample()
    params = layer.init(jax.random.key(1), x)["params"]
    # The parameters of DDPM's conv: a 3x3 kernel and a bias; random values so that every
    # tap matters (the bias starts at zero).
    assert params["conv"]["kernel"].shape == (3, 3, shape[-1], shape[-1])
    rng = np.random.default_rng(2)
    params = {"conv": {"kernel": rng.normal(0, 0.1, (3, 3, shape[-1], shape[-1])),
                       "bias": rng.normal(0, 0.1, (shape[-1],))}}
    params32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    got = layer.apply({"params": params32}, x)
    want = _numpy_upsample_conv(np.asarray(x, np.float64), params["conv"]["kernel"],
                                params["conv"]["bias"])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # bfloat16 compute: the same up to bfloat16 rounding.
    got16 = Upsample(dtype=jnp.bfloat16).apply({"params": params32}, x)
    assert got16.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(got16, np.float64) - want) / np.linalg.norm(want)
    assert err < 2e-2


# --- the U-Net's GroupNorm with its gradient written out -----------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 4, 4, 64), (3, 5, 7, 32)])
def test_group_norm_and_its_gradient_equal_flax_group_norm(shape, dtype):
    import flax.linen as nn

    from diffusion_jax.models.unet import GroupNorm

    x = (3.0 * jax.random.normal(jax.random.key(0), shape) + 1.0).astype(dtype)
    reference = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, use_fast_variance=False)
    ours = GroupNorm(dtype=dtype)
    shapes = jax.eval_shape(reference.init, jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.key(1), x)) == (
        jax.tree.map(jnp.shape, shapes))
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(1.0, 0.3, s.shape), jnp.float32),
                          shapes)
    weights = jax.random.normal(jax.random.key(3), shape)

    def loss(module):
        return lambda params, x: jnp.sum(
            jnp.sin(module.apply(params, x).astype(jnp.float32)) * weights)

    want, got = reference.apply(params, x), ours.apply(params, x)
    assert got.dtype == want.dtype == dtype
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tolerance, rtol=tolerance)
    grads_want = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    grads_got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    # Parameters' gradients accumulate in float32 either way; the input's gradient is
    # rounded to the input's dtype (bfloat16: 2**-8 relative).
    for (path, g_want), g_got in zip(jax.tree_util.tree_leaves_with_path(grads_want),
                                     jax.tree.leaves(grads_got)):
        g_want, g_got = np.asarray(g_want, np.float32), np.asarray(g_got, np.float32)
        assert g_got.dtype == g_want.dtype
        rel = np.linalg.norm(g_got - g_want) / np.linalg.norm(g_want)
        is_input = jax.tree_util.keystr(path).startswith("[1]")
        assert rel < (1e-5 if dtype == jnp.float32 or not is_input else 1e-2), (path, rel)


# --- the op profile (--profile-dir) -----------------------------------------------------------


def test_profile_step_sorts_a_conv_nets_ops_by_kind(tmp_path):
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) * 0.1
    dense = jax.random.normal(jax.random.key(2), (16, 16)) * 0.1

    def loss(x, kernel, dense):
        h = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(h @ dense) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = step.lower(x, kernel, dense).compile().as_text()
    profile = profile_step(lambda: step(x, kernel, dense), hlo, str(tmp_path))
    kinds = profile["kinds"]
    assert set(kinds) <= set(OP_KINDS)
    assert {"conv forward", "conv input grad", "conv weight grad", "matmul"} <= set(kinds)
    # Each of the three convolutions does the forward pass's multiply-adds, counted exactly.
    conv_flops = 2 * (4 * 8 * 8 * 16) * (3 * 3 * 16)
    for kind in ("conv forward", "conv input grad", "conv weight grad"):
        assert kinds[kind]["ops"] == 1 and kinds[kind]["gflop"] * 1e9 == pytest.approx(conv_flops)
        assert _positive(kinds[kind]["gflop_per_s"])
    # The matmul of the forward pass and its two gradients (a fusion may hold one of them).
    assert kinds["matmul"]["gflop"] * 1e9 == pytest.approx(3 * 2 * (4 * 8 * 8) * 16 * 16)
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0)
    assert profile["op_ms_total"] > 0 and _positive(profile["traced_step_s"])
    assert (pathlib.Path(profile["trace_dir"]) / "program.hlo.txt").read_text() == hlo

    table = markdown_table({"cases": [{
        "case": "train_step", "model": "micro", "dtype": "float32", "batch": 4, "devices": 1,
        "profile": profile}]}).splitlines()
    assert table[-1].startswith("| train step, micro U-Net, float32 | 1 | ")
    assert table[-3].startswith("| case | devices | conv forward | conv input grad |")


_HLO = """HloModule m, entry_computation_layout={()->f32[]}

%fused_conv (param_0: f32[4,8,8,16], param_1: f32[3,3,16,16]) -> f32[4,8,8,16] {
  %param_0 = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %param_1 = f32[3,3,16,16]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = f32[4,8,8,16]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/conv_general_dilated"}
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %p = (s32[], f32[64,64]{1,0}) parameter(0)
  %m = f32[64,64]{1,0} get-tuple-element(%p), index=1
  %inner = f32[64,64]{1,0} dot(%m, %m), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[64,64]{1,0}) tuple(%i, %inner)
}

%cond (c: (s32[], f32[64,64])) -> pred[] {
  %c = (s32[], f32[64,64]{1,0}) parameter(0)
  ROOT %true = pred[] constant(true)
}

ENTRY %main (x: f32[4,8,8,16], w: f32[3,3,16,16], a: f32[64,64]) -> f32[] {
  %x = f32[4,8,8,16]{3,2,1,0} parameter(0)
  %w = f32[3,3,16,16]{3,2,1,0} parameter(1)
  %a = f32[64,64]{1,0} parameter(2)
  %conv_fusion = f32[4,8,8,16]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_conv
  %dgrad = f32[4,8,8,16]{3,2,1,0} convolution(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/transpose(jvp(f))/conv_general_dilated"}
  %wgrad = f32[16,3,3,16]{3,2,1,0} convolution(f32[16,8,8,4]{3,2,1,0} %xt, f32[8,8,4,16]{3,2,1,0} %dyt), window={size=8x8 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/transpose(jvp(f))/conv_general_dilated"}
  %nchw = f32[16,8,8,4]{3,2,1,0} convolution(f32[8,8,16,4]{3,2,1,0} %y, f32[16,3,3,16]{3,2,1,0} %k), window={size=3x3 pad=1_1x1_1}, dim_labels=01fb_o01i->f01b
  %dot.1 = f32[64,32]{1,0} dot(f32[64,128]{1,0} %a, f32[128,32]{1,0} %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %ar = f32[64,64]{1,0} all-reduce(%a), replica_groups={}, to_apply=%add
  %lt = (f32[64,64]{1,0}, s8[1024]{0}) custom-call(%a, %a), custom_call_target="__cublas$lt$matmul"
  %dnn = f32[4,8,8,16]{3,2,1,0} custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__onednn$convolution"
  %filter = (f32[3,3,16,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x), custom_call_target="__cudnn$convBackwardFilter"
  %djf = f32[4,8,8,16]{3,2,1,0} custom-call(%x, %w), custom_call_target="DjConvForward", api_version=API_VERSION_TYPED_FFI
  %djd = f32[4,8,8,16]{3,2,1,0} custom-call(f32[4,8,8,16]{3,2,1,0} %dy, f32[3,3,16,16]{3,2,1,0} %w), custom_call_target="DjConvBackwardData"
  %djw = f32[3,3,16,16]{3,2,1,0} custom-call(%x, %x), custom_call_target="DjConvBackwardWeights"
  %init = (s32[], f32[64,64]{1,0}) tuple(%i0, %a)
  %loop = (s32[], f32[64,64]{1,0}) while(%init), condition=%cond, body=%body
  %tr = f32[64,64]{0,1} transpose(%a), dimensions={1,0}
  %ex = f32[64,64]{1,0} exponential(%a)
  ROOT %r = f32[] reduce(%ex, %zero), dimensions={0,1}, to_apply=%add
}
"""


def test_classify_op_on_hand_written_hlo():
    instrs, comps = parse_hlo(_HLO)
    conv = 2.0 * (4 * 8 * 8 * 16) * 9 * 16
    expected = {
        "conv_fusion": ("conv forward", conv),  # judged by the computation it calls
        "dgrad": ("conv input grad", conv),
        "wgrad": ("conv weight grad", 2.0 * (16 * 3 * 3 * 16) * 64 * 4),  # = conv
        "nchw": ("conv forward", 2.0 * (16 * 8 * 8 * 4) * 9 * 16),  # labels, not positions
        "dot.1": ("matmul", 2.0 * 64 * 32 * 128),  # operand shapes printed inline
        "ar": ("collective", None),
        "lt": ("matmul", None),
        "dnn": ("conv forward", conv),
        "filter": ("conv weight grad", None),
        "djf": ("conv forward", conv),  # this project's oneDNN FFI calls
        "djd": ("conv input grad", conv),
        "djw": ("conv weight grad", conv),
        "loop": (None, None),  # its inner dot has its own event
        "inner": ("matmul", 2.0 * 64 * 64 * 64),
        "tr": ("data movement", None),
        "ex": ("elementwise/other", None),
        "r": ("reduction", None),
    }
    assert expected["wgrad"][1] == conv
    for name, (kind, flops) in expected.items():
        got = classify_op(name, instrs, comps)
        assert got[0] == kind, name
        assert (got[1] is None) == (flops is None) and (flops is None or got[1] == flops), name


def test_profile_of_a_data_parallel_step_counts_every_device_and_the_all_reduce(tmp_path):
    """Two devices, each with half the batch: the convolutions' FLOPs summed over both are
    the global batch's, and the gradient's all-reduce is a collective."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (4, 8, 8, 16)),
                       NamedSharding(mesh, PartitionSpec("data")))
    kernel = jax.device_put(jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) * 0.1,
                            NamedSharding(mesh, PartitionSpec()))

    def loss(kernel, x):
        h = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(h) ** 2)

    step = jax.jit(jax.grad(loss), out_shardings=NamedSharding(mesh, PartitionSpec()))
    hlo = step.lower(kernel, x).compile().as_text()
    kinds = profile_step(lambda: step(kernel, x), hlo, str(tmp_path))["kinds"]
    conv_flops = 2 * (4 * 8 * 8 * 16) * (3 * 3 * 16)
    assert kinds["conv forward"]["ops"] == 2  # one per device
    assert kinds["conv forward"]["gflop"] * 1e9 == pytest.approx(conv_flops)
    assert kinds["conv weight grad"]["gflop"] * 1e9 == pytest.approx(conv_flops)
    assert kinds["collective"]["ops"] >= 2


@pytest.mark.parametrize("flag", ["--out", "--markdown"])
def test_existing_outputs_are_kept_unless_overwrite(flag, tmp_path, capsys):
    """A finished run's JSON or table is not replaced by the next run unless asked: the
    refusal comes from the argument parser, before any case runs."""
    earlier = tmp_path / "earlier"
    earlier.write_text("an earlier run")
    argv = ([f"--out={earlier}"] if flag == "--out"
            else [f"--out={tmp_path / 'new.json'}", f"--markdown={earlier}"])
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{earlier} already exists" in err and "--overwrite" in err, err
    assert earlier.read_text() == "an earlier run"
    assert parse_args([*argv, "--overwrite"]).overwrite


def test_cpu_kernels_take_a_list_for_one_run_and_refuse_unknown_names(capsys):
    assert parse_args(["--cpu-kernels=none,dilated"]).cpu_kernels == ["none", "dilated"]
    assert parse_args([]).cpu_kernels == ["none"]
    for bad in ("none,fast", "none,none"):
        with pytest.raises(SystemExit):
            parse_args([f"--cpu-kernels={bad}"])
        assert "distinct names among ['none', 'dilated', 'onednn']" in capsys.readouterr().err
