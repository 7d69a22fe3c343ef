"""experiments/memory.py: per-device state bytes and XLA's memory analysis under FSDP,
on a tiny DiT (the real cases are the script's run; see the README)."""

import importlib.util
import sys

import pytest

from diffusion_jax import data

from helpers import ROOT, load_config


def _load_memory():
    spec = importlib.util.spec_from_file_location("memory_report", ROOT / "experiments" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_report"] = module
    spec.loader.exec_module(module)
    return module


def test_state_bytes_per_device_fall_by_the_fsdp_factor():
    memory = _load_memory()
    config = load_config(ROOT / "configs" / "dit_digits.py", "tiny")
    config.model.dit.update(dict(hidden_size=32, depth=1, num_heads=2))
    config.mesh.min_shard_size = 256
    info = data.dataset_info(config.data)
    one, eight = (memory.train_step_memory(config, info, fsdp=f, global_batch=16) for f in (1, 8))
    assert one["whole_params_bytes"] == eight["whole_params_bytes"] == one["params_bytes"]
    assert 0 < eight["replicated_params_bytes"] < one["whole_params_bytes"]
    sharded = eight["whole_params_bytes"] - eight["replicated_params_bytes"]
    assert eight["params_bytes"] == sharded // 8 + eight["replicated_params_bytes"]
    assert eight["ema_bytes"] == eight["params_bytes"]
    # Adam's moments follow their parameters (plus the replicated step counters).
    assert 2 * eight["params_bytes"] <= eight["opt_bytes"] < 2 * eight["params_bytes"] + 64
    # XLA's per-device program takes the sharded state as its arguments.
    assert one["xla"]["argument"] > eight["xla"]["argument"] > 0
    assert eight["xla"]["estimate_bytes"] >= eight["xla"]["argument"]


def test_unknown_case():
    memory = _load_memory()
    with pytest.raises(ValueError, match=r"Unknown case 'dit_s2'; valid cases are \['dit_b2'"):
        memory.case_config("dit_s2")


def test_dit_step_check_runs_a_sharded_step():
    """experiments/dit_step.py (the accelerator check's DiT step) on a 1-block DiT/8 with
    fsdp = 2 on the 8 CPU devices: finite losses, the mesh and sizes reported."""
    spec = importlib.util.spec_from_file_location("dit_step", ROOT / "experiments" / "dit_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config, info = module.dit_latent_config(
        "DiT-S/8", fsdp=2, dit_overrides=dict(hidden_size=32, depth=1, num_heads=2))
    config.mesh.min_shard_size = 256
    report = module.run(config, info, global_batch=8, steps=2)
    assert report["finite"] and len(report["losses"]) == 2
    assert report["mesh"] == {"data": 4, "fsdp": 2}
    # 1000 + 1 class rows of 32 dominate the count: the embedding is there.
    assert report["num_params"] > 1001 * 32
