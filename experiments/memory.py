r"""Memory of a train step under FSDP: per-device state bytes and XLA's peak estimate.

  python experiments/memory.py --out=memory.json            # DiT-B/2, CIFAR U-Net, DiT-XL/2
  python experiments/memory.py --cases=dit_b2 --fsdp=1,8 --batch=16

Runs on 8 fake CPU devices (``--devices``; set before JAX starts) and never materialises a
model: the train state is `jax.eval_shape`'d, given the shardings of
`diffusion_jax.training.sharding` on a (data, fsdp) mesh, and the jitted train step is
lowered and compiled from `jax.ShapeDtypeStruct`s. Per case and ``fsdp`` size it reports

- ``params_bytes``, ``ema_bytes``, ``opt_bytes``: what one device holds of the parameters,
  their EMA and the optimizer state (Adam's two moments), and ``whole_*`` the unsharded
  totals; ``replicated_params_bytes``: parameters the rule leaves whole on every device;
- ``xla``: the compiled program's memory analysis per device: argument, output, alias and
  temporary bytes, ``peak_bytes`` (XLA's ``peak_memory_in_bytes`` where the backend gives
  it, else 0) and ``estimate_bytes`` = argument + output - alias + temporary;
- ``compile_s``: lower + compile (on a loaded machine it is only indicative).

Cases: ``dit_b2`` (DiT-B/2 in the paper's 256x256 setting: 32x32x4 latents, 1000
classes, learned sigma, bfloat16 compute), ``unet_cifar`` (configs/ddpm_cifar.py's 35.7M
U-Net, float32, XLA convolutions), ``dit_xl2`` (DiT-XL/2, 675M parameters; compiled with
``fsdp = 8`` only and checked against the bound whole/8 + replicated small arrays).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__":  # before JAX is imported
    _devices = 8
    for _arg in sys.argv:
        if _arg.startswith("--devices="):
            _devices = int(_arg.split("=", 1)[1])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from diffusion_jax.data.pipeline import DataInfo  # noqa: E402
from diffusion_jax.models.dit import dit_size_kwargs  # noqa: E402
from diffusion_jax.training import mesh as mesh_lib, objectives  # noqa: E402
from diffusion_jax.training import sharding as sharding_lib  # noqa: E402
from diffusion_jax.training import step as step_lib  # noqa: E402
from diffusion_jax.training.config import default_config  # noqa: E402
from diffusion_jax.training.state import TrainState, make_optimizer  # noqa: E402

CASES = ("dit_b2", "unet_cifar", "dit_xl2")


def case_config(name: str):
    """(config, DataInfo) of a case of the module docstring."""
    config = default_config()
    if name in ("dit_b2", "dit_xl2"):
        size = {"dit_b2": "DiT-B/2", "dit_xl2": "DiT-XL/2"}[name]
        config.model.name, config.model.dtype, config.model.num_classes = "dit", "bfloat16", 1000
        config.model.dit.update(dit_size_kwargs(size))
        config.diffusion.var_type, config.diffusion.loss_type = "learned_range", "hybrid"
        return config, DataInfo("latents_256", "image", (32, 32, 4), None, 1000)
    if name == "unet_cifar":
        config.model.cpu_kernels = "none"
        return config, DataInfo("cifar10", "image", (32, 32, 3), 50_000, 10)
    raise ValueError(f"Unknown case {name!r}; valid cases are {list(CASES)}.")


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def train_step_memory(config, info, *, fsdp: int, global_batch: int) -> dict:
    """The figures of the module docstring for one model and one ``fsdp`` size, on a mesh
    of every device (data = devices / fsdp)."""
    mesh = mesh_lib.make_mesh(fsdp=fsdp)
    objective = objectives.create_objective(config, info)
    optimizer = make_optimizer(config.optim)
    state = jax.eval_shape(lambda k: TrainState.create(objective.init(k), optimizer),
                           jax.random.key(0))
    shardings = sharding_lib.state_shardings(state, mesh, min_size=config.mesh.min_shard_size)
    state = _abstract(state, shardings)
    batch_sharding = mesh_lib.data_sharded(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((global_batch, *info.shape), jnp.float32,
                                      sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sharding),
    }
    step = jax.jit(
        step_lib.make_train_step(loss_fn=objective.loss, optimizer=optimizer,
                                 root_key=jax.random.key(1), ema_decay=config.optim.ema_decay),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    replicated = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params)
        if x.sharding.spec == PartitionSpec())
    xla = {}
    if stats is not None:
        xla = {k: int(getattr(stats, f"{k}_size_in_bytes"))
               for k in ("argument", "output", "alias", "temp")}
        xla["peak_bytes"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
        xla["estimate_bytes"] = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    return {
        "fsdp": fsdp, "data": mesh.shape["data"], "global_batch": global_batch,
        "num_params": sum(x.size for x in jax.tree.leaves(state.params)),
        "params_bytes": sharding_lib.per_device_bytes(state.params),
        "ema_bytes": sharding_lib.per_device_bytes(state.ema_params),
        "opt_bytes": sharding_lib.per_device_bytes(state.opt_state),
        "whole_params_bytes": _whole_bytes(state.params),
        "whole_opt_bytes": _whole_bytes(state.opt_state),
        "replicated_params_bytes": replicated,
        "xla": xla, "compile_s": round(compile_s, 2),
    }


def _whole_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--fsdp", default="1,2,4,8", help="fsdp sizes (dit_xl2: 8 only)")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    parser.add_argument("--remat", action="store_true",
                        help="DiT cases: recompute block activations (model.dit.remat)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    for c in args.cases:
        if c not in CASES:
            parser.error(f"unknown case {c!r}; valid cases are {list(CASES)}")
    args.fsdp = [int(f) for f in args.fsdp.split(",") if f]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
              "jax": jax.__version__, "global_batch": args.batch, "remat": args.remat,
              "cases": {}}
    for name in args.cases:
        config, info = case_config(name)
        config.model.dit.remat = args.remat
        sizes = [8] if name == "dit_xl2" else args.fsdp
        rows = [train_step_memory(config, info, fsdp=f, global_batch=args.batch) for f in sizes]
        for row in rows:
            state_bytes = row["params_bytes"] + row["opt_bytes"]
            bound = (row["whole_params_bytes"] + row["whole_opt_bytes"]) / row["fsdp"] + \
                3 * row["replicated_params_bytes"]
            row["params_plus_opt_bytes"] = state_bytes
            row["within_whole_over_fsdp_plus_replicated"] = bool(state_bytes <= bound)
        report["cases"][name] = rows
        print(json.dumps({name: rows}), file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return report


if __name__ == "__main__":
    main()
