"""The same train step in PyTorch, for a side-by-side figure with `experiments/benchmark.py`.

The network is the DDPM U-Net as the `diffusers` library builds it (``UNet2DModel`` with the
configuration of the ``google/ddpm-cifar10-32`` port of DDPM's CIFAR-10 model: channels
128 x (1, 2, 2, 2), two residual blocks per level, attention at 16x16, dropout 0.1, 35.7M
parameters), or the 4.4M configuration of the benchmark's ``small`` case (ch 64,
ch_mult (1, 2, 2), one residual block, attention at 8x8). One train step is what
`diffusion_jax.training.step` does: random t and noise, the L_simple loss, backward,
global-norm clipping at 1, Adam, an EMA of the parameters. Timing: median of ``--steps``
steps after ``--warmup`` untimed ones, on the threads PyTorch picks (one per core).

PyTorch and diffusers are not dependencies of this project; install them next to it
(any environment):

    pip install torch diffusers
    python experiments/benchmark_torch.py --models=cifar,small --out=torch.json

With ``--conv-shapes=SIDExCINxCOUT,...`` it also times a bare 3x3 convolution (stride 1,
padding 1, NCHW, the network's layout) at each shape and batch ``--conv-batch``: the forward
pass, the input gradient and the weight gradient alone (``convolution_backward`` with one
output each), the counterpart of `experiments/benchmark.py`'s ``conv`` case.

With ``--fid-batch=N`` it also times pytorch-fid's FID Inception as FID computes its
features (``InceptionV3([3], resize_input=True, normalize_input=True)``: images of
``--fid-size`` squared resized to 299, the 2048-d pool features, then the classifier's
logits, biased and not, as `diffusion_jax.metrics.inception` returns them), the
counterpart of the ``fid`` case. Its weights are random (`build_fid_inception`: nothing is
downloaded). Without pytorch-fid the case is reported as skipped, with the reason.

Prints one JSON object (and writes it to ``--out``): versions, threads, and per case the
parameter count, the median step time and images/s; per convolution (``conv_cases``) each
kernel's median seconds and FLOP/s; the FID features (``fid_cases``) the first call's
seconds, the median seconds per batch and images/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

MODELS = {
    # (block_out_channels, layers_per_block, down block types)
    "cifar": ((128, 256, 256, 256), 2,
              ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")),
    "small": ((64, 128, 128), 1, ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")),
}


CONV_KINDS = ("forward", "input_grad", "weight_grad")


def time_calls(fn, *, steps: int, warmup: int) -> list[float]:
    """Wall seconds of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (PyTorch on
    the CPU returns when the work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def build(model: str):
    from diffusers import UNet2DModel

    channels, blocks, down = MODELS[model]
    up = tuple(name.replace("Down", "Up") for name in reversed(down))
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=channels,
        layers_per_block=blocks, down_block_types=down, up_block_types=up,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-6, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, time_embedding_type="positional",
        attention_head_dim=None, dropout=0.1,
    )


def bench(model_name: str, batch: int, steps: int, warmup: int) -> dict:
    import torch

    torch.manual_seed(0)
    model = build(model_name).train()
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    images = torch.rand(batch, 3, 32, 32) * 2 - 1

    def step():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(images)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * images + (1 - a).sqrt() * noise
        loss = torch.mean((model(x_t, t).sample - noise) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.9999)
        return float(loss.detach())

    times = time_calls(step, steps=steps, warmup=warmup)
    median = statistics.median(times)
    return {
        "case": "train_step", "model": model_name, "batch": batch, "dtype": "float32",
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": median, "step_s_all": times, "images_per_s": batch / median,
    }


def conv_flops(batch: int, side: int, in_ch: int, out_ch: int) -> float:
    """2 x the multiply-adds of a 3x3 stride-1 convolution with padding 1 (each of its
    three kernels, forward, input gradient and weight gradient, does this many)."""
    return 2.0 * batch * side * side * 9 * in_ch * out_ch


def bench_conv(batch: int, side: int, in_ch: int, out_ch: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    x = torch.randn(batch, in_ch, side, side)
    w = torch.randn(out_ch, in_ch, 3, 3) * 0.05
    dy = torch.randn(batch, out_ch, side, side)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    kernels = {
        "forward": lambda: torch.nn.functional.conv2d(x, w, padding=1),
        "input_grad": backward([True, False, False]),
        "weight_grad": backward([False, True, False]),
    }
    flops = conv_flops(batch, side, in_ch, out_ch)
    case = {"case": "conv", "batch": batch, "side": side, "in_ch": in_ch, "out_ch": out_ch,
            "dtype": "float32", "flops": flops}
    with torch.no_grad():
        for kind, fn in kernels.items():
            seconds = statistics.median(time_calls(fn, steps=steps, warmup=1))
            case[f"{kind}_s"] = seconds
            case[f"{kind}_flops_per_s"] = flops / seconds
    return case


def fid_inception_without_weights():
    """(pytorch-fid's ``InceptionV3([3])`` wrapper with its default resize and input
    normalisation, the FID Inception network inside it), with PyTorch's initial weights.

    pytorch-fid builds the network by its own code; only its weight download and the load
    of those weights are replaced while it builds (and put back after), so nothing is
    fetched. The parity test (tests/test_metrics_parity.py) builds its network here too."""
    import torch
    from pytorch_fid import inception as pt_inception

    no_weights = object()
    saved = (pt_inception.load_state_dict_from_url, pt_inception.fid_inception_v3,
             torch.nn.Module.load_state_dict)
    built = []

    def load(module, state_dict, *args, **kwargs):
        if state_dict is no_weights:
            return None
        return saved[2](module, state_dict, *args, **kwargs)

    pt_inception.load_state_dict_from_url = lambda *args, **kwargs: no_weights
    pt_inception.fid_inception_v3 = lambda: built.append(saved[1]()) or built[-1]
    torch.nn.Module.load_state_dict = load
    try:
        wrapper = pt_inception.InceptionV3(
            [pt_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
            normalize_input=True)
    finally:
        (pt_inception.load_state_dict_from_url, pt_inception.fid_inception_v3,
         torch.nn.Module.load_state_dict) = saved
    return wrapper, built[0]


def build_fid_inception():
    """`fid_inception_without_weights` in eval mode, with its weights drawn as the JAX
    side's (`experiments.bench.fid.random_inception_variables`): convolutions and the
    classifier normal with variance 2 / fan-in, biases zero, batch norms the identity, so
    that activations keep their scale through the network (PyTorch's default
    initialisation shrinks them towards denormal values, which a CPU computes slowly)."""
    import torch

    wrapper, net = fid_inception_without_weights()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.weight.fill_(1.0)
                module.bias.zero_()
    return wrapper.eval(), net.eval()


def bench_fid(batch: int, size: int, steps: int, warmup: int) -> dict:
    """pytorch-fid's features and logits of ``batch`` random images of ``size`` squared:
    the first call's seconds, then the median of ``steps`` calls after ``warmup`` untimed
    ones (the first calls build oneDNN's primitives)."""
    import pytorch_fid
    import torch

    wrapper, net = build_fid_inception()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

    def features():
        with torch.inference_mode():
            pool = wrapper(images)[0].flatten(1)
            return pool, net.fc(pool), pool @ net.fc.weight.T

    start = time.perf_counter()
    pool, logits, _ = features()
    first_call_s = time.perf_counter() - start
    assert pool.shape == (batch, 2048) and logits.shape == (batch, 1008), (pool.shape,
                                                                          logits.shape)
    times = time_calls(features, steps=steps, warmup=warmup)
    median = statistics.median(times)
    return {"case": "fid", "batch": batch, "image_size": size, "input_size": 299,
            "dtype": "float32", "pytorch_fid": pytorch_fid.__version__,
            "first_call_s": first_call_s, "step_s": median, "step_s_all": times,
            "images_per_s": batch / median}


def fid_case(batch: int, size: int, steps: int, warmup: int) -> dict:
    """`bench_fid`, or the case marked skipped with the reason where this Python has no
    pytorch-fid."""
    try:
        import pytorch_fid  # noqa: F401
    except ImportError as error:
        return {"case": "fid", "batch": batch, "image_size": size,
                "skipped": f"no pytorch-fid in {sys.executable}: {error}"}
    return bench_fid(batch, size, steps, warmup)


def format_conv_shapes(shapes) -> str:
    """[(32, 128, 128), (16, 256, 256)] -> '32x128x128,16x256x256' (`parse_conv_shapes`)."""
    return ",".join("x".join(str(d) for d in shape) for shape in shapes)


def parse_conv_shapes(text: str) -> list[tuple[int, int, int]]:
    """'32x128x128,16x256x256' -> [(32, 128, 128), (16, 256, 256)]; ValueError otherwise."""
    shapes = []
    for item in (part for part in text.split(",") if part):
        parts = item.split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad conv shape {item!r}: want SIDExCINxCOUT, positive "
                             "integers, e.g. 32x128x128")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cifar,small")
    p.add_argument("--cifar-batch", type=int, default=32)
    p.add_argument("--small-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--conv-shapes", default="",
                   help="bare 3x3 convolutions to time: SIDExCINxCOUT,... (none by default)")
    p.add_argument("--conv-batch", type=int, default=32)
    p.add_argument("--conv-steps", type=int, default=9, help="timed calls per conv kernel")
    p.add_argument("--fid-batch", type=int, default=0,
                   help="batch of pytorch-fid's Inception features (0: not timed)")
    p.add_argument("--fid-size", type=int, default=32, help="height = width of its images")
    p.add_argument("--fid-steps", type=int, default=3, help="timed calls of it")
    p.add_argument("--out", default="benchmark_torch.json")
    args = p.parse_args(argv)
    try:
        args.conv_shapes = parse_conv_shapes(args.conv_shapes)
    except ValueError as error:
        p.error(str(error))
    unknown = sorted(set(m for m in args.models.split(",") if m) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {sorted(MODELS)}")
    return args


def main():
    args = parse_args()

    import torch

    models = [m for m in args.models.split(",") if m]
    if models:
        import diffusers
    result = {
        "torch": torch.__version__, "diffusers": diffusers.__version__ if models else None,
        "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
        "machine": platform.processor() or platform.machine(), "cases": [],
        "conv_cases": [], "fid_cases": [],
    }
    for name in models:
        batch = args.cifar_batch if name == "cifar" else args.small_batch
        case = bench(name, batch, args.steps, args.warmup)
        print(f"{name} batch {batch}: {case['params'] / 1e6:.2f}M params, "
              f"{case['step_s']:.3f} s/step, {case['images_per_s']:.2f} images/s", flush=True)
        result["cases"].append(case)
    for side, in_ch, out_ch in args.conv_shapes:
        case = bench_conv(args.conv_batch, side, in_ch, out_ch, args.conv_steps)
        print(f"conv {side}x{side} {in_ch}->{out_ch}: " + ", ".join(
            f"{kind} {case[kind + '_flops_per_s'] / 1e9:.0f}"
            for kind in CONV_KINDS) + " GFLOP/s", flush=True)
        result["conv_cases"].append(case)
    if args.fid_batch:
        case = fid_case(args.fid_batch, args.fid_size, args.fid_steps, args.warmup)
        print(f"fid batch {args.fid_batch}, {args.fid_size}x{args.fid_size}: " + (
            f"skipped ({case['skipped']})" if case.get("skipped")
            else f"{case['step_s']:.3f} s/batch, {case['images_per_s']:.2f} images/s"),
            flush=True)
        result["fid_cases"].append(case)
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
