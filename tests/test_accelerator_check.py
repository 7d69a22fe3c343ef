"""experiments/accelerator_check.py at toy sizes on the CPU (``--tiny``): one JSON with
every measurement the accelerator run reports, each a finite positive number, and the
fraction of the measured bfloat16 peak a fraction."""

import importlib.util
import json
import math
import pathlib

import jax

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "accelerator_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_measurement(tmp_path, capsys):
    out = tmp_path / "check.json"
    result = _load().main(["--tiny", "--sample-steps=3", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == json.loads(
        json.dumps(result))
    assert result["tiny"] and result["platform"] == "cpu"
    positive = [result["peak"]["flops_per_s"], result["train"]["images_per_s"],
                result["train"]["compile_s"], result["train"]["xla_flops_per_step"],
                result["bound"]["images_per_s"]]
    positive += [s["images_per_s"] for s in result["sample"].values()]
    assert all(math.isfinite(v) and v > 0 for v in positive), positive
    assert 0 < result["train"]["fraction_of_peak"] <= 1
    assert set(result["sample"]) == {"ancestral", "ddim", "dpm_solver++"}
    assert result["sample"]["ancestral"]["network_evals"] == 25  # T of the tiny run
    assert result["sample"]["ddim"]["network_evals"] == 3
    assert result["bound"]["num_timesteps"] == 25
    assert math.isfinite(result["bound"]["mean_total_bpd_of_untrained_model"])
    assert math.isfinite(result["train"]["loss"])
    dit = result["dit"]
    assert dit["finite"] and len(dit["losses"]) == 2 and dit["images_per_s"] > 0
    assert dit["mesh"] == {"data": jax.device_count(), "fsdp": 1} and dit["global_batch"] == 8
    fid = result["fid"]
    assert fid["input_size"] == 299 and fid["image_size"] == 16
    assert fid["batch"] % jax.local_device_count() == 0 and fid["batch"] >= 2
    assert all(math.isfinite(fid[k]) and fid[k] > 0
               for k in ("images_per_s", "compile_s", "model_flops_per_image"))


def test_bad_sample_steps_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        _load().main(["--sample-steps=0"])
    assert "--sample-steps must be positive; got 0" in capsys.readouterr().err
