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

Prints one JSON object (and writes it to ``--out``): versions, threads, and per case the
parameter count, the median step time and images/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

MODELS = {
    # (block_out_channels, layers_per_block, down block types)
    "cifar": ((128, 256, 256, 256), 2,
              ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")),
    "small": ((64, 128, 128), 1, ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")),
}


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

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "case": "train_step", "model": model_name, "batch": batch, "dtype": "float32",
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": median, "step_s_all": times, "images_per_s": batch / median,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cifar,small")
    p.add_argument("--cifar-batch", type=int, default=32)
    p.add_argument("--small-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmark_torch.json")
    args = p.parse_args(argv)
    unknown = sorted(set(m for m in args.models.split(",") if m) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {sorted(MODELS)}")
    return args


def main():
    args = parse_args()

    import diffusers
    import torch

    models = [m for m in args.models.split(",") if m]
    result = {
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
        "machine": platform.processor() or platform.machine(), "cases": [],
    }
    for name in models:
        batch = args.cifar_batch if name == "cifar" else args.small_batch
        case = bench(name, batch, args.steps, args.warmup)
        print(f"{name} batch {batch}: {case['params'] / 1e6:.2f}M params, "
              f"{case['step_s']:.3f} s/step, {case['images_per_s']:.2f} images/s", flush=True)
        result["cases"].append(case)
    text = json.dumps(result, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
