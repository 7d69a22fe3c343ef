"""The edm and flow objectives through launch.py on tiny settings: 3 + 3 steps equal 6 bit
for bit, --mode=sample (with classifier-free guidance for a class-conditional flow) and
--mode=eval; configuration errors of guidance at config time."""

import json
import shutil

import jax
import numpy as np
import pytest

from diffusion_jax.training import setup
from helpers import ONE_LEVEL_FLAGS, ROOT, launch, load_config, restore_tree

TINY_FLAGS = (*ONE_LEVEL_FLAGS, "--config.model.cpu_kernels=none", "--config.train.sample_every=0")


def _train_resume_sample_eval(tmp_path, config, sample_flags, stem, eval_key):
    args = [f"--config={config}", *TINY_FLAGS]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    launch(*args, f"--workdir={straight}", "--config.train.num_steps=6")
    # The uninterrupted run saved step 3 on its way (train.checkpoint_every = 3): what a
    # run stopped after 3 steps leaves (a 3-step launch would compute the same 3 steps
    # again). A second run resumes from it and must end where the uninterrupted one did.
    shutil.copytree(straight / "checkpoints" / "3", resumed / "checkpoints" / "3")
    proc = launch(*args, f"--workdir={resumed}", "--config.train.num_steps=6")
    assert "Resumed from step 3" in proc.stderr
    a, b = restore_tree(resumed, 6), restore_tree(straight, 6)
    for name in ("params", "ema_params", "opt_state"):
        for x, y in zip(_leaves(a[name]), _leaves(b[name]), strict=True):
            np.testing.assert_array_equal(x, y)

    launch(*args, f"--workdir={resumed}", "--mode=sample", "--config.sample.num_samples=8",
           *sample_flags)
    samples = np.load(resumed / "samples" / f"{stem}.npz")["samples"]
    assert samples.shape == (8, 8, 8, 1) and np.isfinite(samples).all()
    launch(*args, f"--workdir={resumed}", "--mode=eval")
    result = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 6 and result["eval/num_examples"] == 16
    assert np.isfinite(result[f"eval/{eval_key}"]) and result[f"eval/{eval_key}"] > 0
    return result


def _leaves(tree):
    return jax.tree.leaves(tree)


@pytest.mark.slow
def test_edm_trains_resumes_exactly_samples_and_evaluates(tmp_path):
    _train_resume_sample_eval(
        tmp_path, f"{ROOT / 'configs' / 'edm_digits.py'}:tiny",
        ["--config.sample.S_churn=5"], "edm_heun_4_step6", "edm_loss")


@pytest.mark.slow
def test_guided_flow_trains_resumes_exactly_samples_with_guidance_and_evaluates(tmp_path):
    result = _train_resume_sample_eval(
        tmp_path, f"{ROOT / 'configs' / 'flow_digits.py'}:guided_tiny",
        ["--config.sample.guidance=3"], "heun_2_step6_guidance3", "flow_bpd")
    assert 0 < result["eval/flow_bpd"] < 30 and result["eval/velocity_loss"] > 0


FLOW = ROOT / "configs" / "flow_digits.py"


@pytest.mark.parametrize("variant,fields,match", [
    ("tiny", {"sample.guidance": 1.0}, "the model is unconditional"),
    ("guided_tiny", {"train.p_uncond": 0.0}, r"needs the unconditional model of a run"),
    ("guided_tiny", {"train.p_uncond": 1.0}, r"train.p_uncond must lie in \[0, 1\)"),
    ("tiny", {"train.p_uncond": 0.1}, "model.num_classes is None"),
    ("guided_tiny", {"sample.guidance_convention": "cfg"}, "Unknown guidance convention"),
    ("tiny", {"flow.path": "straight"}, "Unknown path 'straight'"),
    ("tiny", {"sample.sampler": "rk45"}, "Unknown sample.sampler 'rk45'"),
])
def test_bad_flow_and_guidance_configs_are_refused(variant, fields, match):
    from diffusion_jax.data import dataset_info
    from diffusion_jax.training import objectives

    config = load_config(FLOW, variant)
    for name, value in fields.items():
        section, field = name.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=match):
        setup.validate_config(config)
        objectives.create_objective(config, dataset_info(config.data))


@pytest.mark.parametrize("fields,match", [
    ({"sample.sigma_min": 90.0}, "sigma_min must be < sigma_max"),
    ({"sample.rho": 0.0}, "rho must be"),
    ({"edm.preconditioning": "karras"}, "Unknown edm.preconditioning 'karras'"),
    ({"sample.sampler": "ddim"}, "Unknown sample.sampler 'ddim'"),
])
def test_bad_edm_configs_are_refused(fields, match):
    from diffusion_jax.data import dataset_info
    from diffusion_jax.training import objectives

    config = load_config(ROOT / "configs" / "edm_digits.py", "tiny")
    for name, value in fields.items():
        section, field = name.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=match):
        objectives.create_objective(config, dataset_info(config.data))
