"""The ``sde`` objective end to end through launch.py: train, resume exactly, sample, eval."""

import json
import shutil

import jax
import numpy as np
import pytest

from diffusion_jax.training import evaluate, objectives
from diffusion_jax.training.objectives import sde as sde_objective

from helpers import ROOT, launch, load_config, restore_tree

CONFIG = ROOT / "configs" / "sde_digits.py"
FLAGS = ("--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
         "--config.model.cpu_kernels=none", "--config.train.sample_every=0")


def _config():
    config = load_config(CONFIG, "tiny")
    config.model.ch_mult, config.model.attn_resolutions = (1,), ()
    config.model.cpu_kernels, config.train.sample_every = "none", 0
    return config


def test_sde_trains_resumes_exactly_samples_and_evaluates(tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    args = [f"--config={CONFIG}:tiny", *FLAGS]
    launch(*args, f"--workdir={straight}", "--config.train.num_steps=6", devices=1)
    # The uninterrupted run saved step 3 on its way (train.checkpoint_every = 3): what a
    # run stopped after 3 steps leaves (a 3-step launch would compute the same 3 steps
    # again). A second run resumes from it and must end where the uninterrupted one did.
    shutil.copytree(straight / "checkpoints" / "3", resumed / "checkpoints" / "3")
    proc = launch(*args, f"--workdir={resumed}", "--config.train.num_steps=6", devices=1)
    assert "Resumed from step 3" in proc.stderr
    a, b = restore_tree(resumed, 6), restore_tree(straight, 6)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(x, y)  # 3 + 3 = 6 steps, bit for bit
    # --mode=sample with each sampler (in process: the launch path is the same call).
    for sampler in ("pc", "ode"):  # euler_maruyama is pc_sample with another predictor
        config = _config()
        config.sample.sampler, config.sample.num_samples = sampler, 4
        config.sample.ode_rtol = config.sample.ode_atol = 1e-2
        path = evaluate.sample_from_checkpoint(config, resumed)
        samples = np.load(path)["samples"]
        assert samples.shape == (4, 8, 8, 1) and np.all(np.isfinite(samples))
    # --mode=eval through launch.py: the DDPM bound and the ODE bits/dim of one model.
    launch(*args, f"--workdir={resumed}", "--mode=eval", "--config.eval.num_examples=8",
           "--config.eval.ode_rtol=0.01", "--config.eval.ode_atol=0.01", devices=1)
    result = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 6 and result["eval/num_examples"] == 8
    assert 0 < result["eval/ode_bpd"] < 30 and 0 < result["eval/total_bpd"] < 30
    assert result["eval/ode_nfe"] >= 7


def test_sde_config_errors():
    info = None
    for field, value, match in [
        ("sde.name", "edm", "'vpsde', 'subvpsde', 'vesde', 'ddpm'"),
        ("sde.weighting", "l2", "'std2', 'likelihood'"),
        ("sample.sampler", "ddim", "'pc', 'euler_maruyama', 'ode'"),
        ("sample.predictor", "heun", "'reverse_diffusion'"),
        ("sample.corrector", "hmc", "'langevin', 'ald', 'none'"),
        ("sample.snr", 0.0, "sample.snr must be > 0"),
        ("eval.ode_rtol", 0.0, "eval.ode_rtol must be > 0"),
    ]:
        config = _config()
        section, name = field.split(".")
        config[section][name] = value
        with pytest.raises(ValueError, match=match):
            objectives.create_objective(config, info)
    assert sde_objective.SDE_NAMES[-1] == "ddpm"
