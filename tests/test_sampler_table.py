"""experiments/sampler_table.py at toy size: it runs end to end, writes its table, JSON and
plot, scores every sampler for both models, and with the exact eps of the mixture the
probability-flow ODE solved finely reproduces the data's average log-density.

The full-size figures belong to the script (30 minutes); this only guards it from rot."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "sampler_table.py"
NUM_SAMPLES = 400
DPM_ROWS = [(f"DPM-Solver++(2M), {grid}", n)
            for grid in ("logsnr", "time_quadratic") for n in (10, 20, 50, 200)]
OUTPUTS = ["sampler_table.md", "sampler_table.json", "samples.png"]
EDM_ROWS = [("EDM Heun (rho = 7)", n) for n in (9, 19, 35, 49)]
FLOW_ROWS = [(f"flow ODE (OT path), {solver}", n) for solver in ("euler", "heun")
             for n in (10, 20, 50)]
REFERENCE = {"trained MLP": "ancestral (learned var)", "exact eps": "ancestral (beta-tilde var)"}


def load_script():
    spec = importlib.util.spec_from_file_location("sampler_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device: the script does not shard
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_script(outdir, *extra):
    proc = _run(f"--outdir={outdir}", "--train_steps=20", f"--num_samples={NUM_SAMPLES}",
                "--num_timesteps=200", "--hidden=16", "--depth=1", "--batch_size=32", *extra,
                timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sampler_table_runs_at_toy_size(tmp_path):
    (tmp_path / "samples.png").write_bytes(b"an earlier run's plot")
    run_script(tmp_path, "--overwrite")
    for name in OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0, name
    # --overwrite replaced the earlier plot with this run's.
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "sampler_table.json").read_text())
    assert {"exact eps", "trained MLP"} <= set(summary)
    header = (tmp_path / "sampler_table.md").read_text().splitlines()[0]
    assert header.startswith("ring8: ring mixture (8 x N(., 0.1768^2 I), radius 1.414);"), header

    want = [("DDIM", n) for n in (10, 20, 50)] + DPM_ROWS + EDM_ROWS + FLOW_ROWS
    for label, first in REFERENCE.items():
        rows = summary[label]
        got = [(r["sampler"], r["steps"]) for r in rows]
        assert got[0] == ("data (fresh sample)", 0)
        assert got[1] == (first, 200), got  # the reference chain, over every step
        assert [row for row in got if row in want] == want  # every row, in this order
        tsit5 = [n for name, n in got if name == "flow ODE (OT path), tsit5"]
        assert len(tsit5) == 1 and tsit5[0] > 6  # its own NFE
    # The trained MLP has had 20 steps: its samples may diverge (an eps model that has not
    # learned to cancel x_t's growth scales it by up to 1 / sqrt(abar_T)), so only the
    # exact eps's rows must be finite.
    for row in summary["exact eps"]:
        assert np.isfinite(row["mean_logp"]) and row["se_logp"] > 0, row
        assert np.isfinite(row["sliced_w1"]) and row["sliced_w1"] >= 0, row
    for row in summary["trained MLP"] + summary["exact eps"]:
        assert 0.0 <= row["off_modes"] <= 1.0, row
    # Mixture samples lie beyond 4 stds of every centre with probability exp(-8) = 3.4e-4:
    # at most a few of the 400 data points.
    assert summary["exact eps"][0]["off_modes"] <= 5 / NUM_SAMPLES

    # Exact eps, 200 DPM-Solver++ steps over a T = 200 schedule: samples of the data
    # distribution up to discretisation; the data's own mean log p is within 5 standard
    # errors of the difference (each s.e. about 0.05 nats at 400 samples).
    exact = {(r["sampler"], r["steps"]): r for r in summary["exact eps"]}
    data = exact[("data (fresh sample)", 0)]
    ode = exact[("DPM-Solver++(2M), time_quadratic", 200)]
    tol = 5.0 * np.hypot(data["se_logp"], ode["se_logp"])
    assert abs(ode["mean_logp"] - data["mean_logp"]) < tol, (ode, data, tol)
    # The same for EDM's Heun sampler at 49 evaluations and the exact velocity's adaptive
    # flow ODE: both are samplers of the data distribution up to discretisation.
    flow_tsit5 = next(r for r in summary["exact eps"] if r["sampler"].endswith("tsit5")
                      and r["sampler"].startswith("flow"))
    for row in (exact[("EDM Heun (rho = 7)", 49)], flow_tsit5):
        tol = 5.0 * np.hypot(data["se_logp"], row["se_logp"])
        assert abs(row["mean_logp"] - data["mean_logp"]) < tol, (row, data, tol)


def test_sampler_table_reference_and_dpm_rows(tmp_path):
    """--rows=reference_and_dpm (the seed study): the data, the reference chain and
    DPM-Solver++'s rows, nothing else; --data=ring8_sharp scores against that mixture."""
    run_script(tmp_path, "--rows=reference_and_dpm", "--data=ring8_sharp")
    summary = json.loads((tmp_path / "sampler_table.json").read_text())
    for label, first in REFERENCE.items():
        got = [(r["sampler"], r["steps"]) for r in summary[label]]
        assert got == [("data (fresh sample)", 0), (first, 200)] + DPM_ROWS, got
    header = (tmp_path / "sampler_table.md").read_text().splitlines()[0]
    assert header.startswith("ring8_sharp: ring mixture (8 x N(., 0.1^2 I), radius 1.4);"), header
    # The data row's mean log p is that of the sharp ring's own samples (about -0.31 nats;
    # the default ring8's is about -1.44), to a few standard errors at 400 samples.
    data_row = summary["exact eps"][0]
    assert abs(data_row["mean_logp"] + 0.31) < 5 * data_row["se_logp"], data_row


def run_bad_arguments(*args):
    proc = _run(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr  # argparse's usage error, before any work
    return proc.stderr


def test_sampler_table_rejects_an_unknown_data_set(tmp_path):
    stderr = run_bad_arguments(f"--outdir={tmp_path / 'out'}", "--data=moons")
    assert "invalid choice: 'moons'" in stderr and "ring8_sharp" in stderr, stderr
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are checked


@pytest.mark.parametrize("name", OUTPUTS)
def test_sampler_table_keeps_an_earlier_runs_outputs(tmp_path, name):
    (tmp_path / name).write_text("an earlier run")
    # Toy sizes: were the guard broken, the run would end in seconds and fail below.
    stderr = run_bad_arguments(
        f"--outdir={tmp_path}", "--train_steps=2", "--num_samples=8", "--num_timesteps=20",
        "--hidden=4", "--depth=1", "--batch_size=4", "--rows=reference_and_dpm")
    assert f"already holds {name}" in stderr and "--overwrite" in stderr, stderr
    assert (tmp_path / name).read_text() == "an earlier run"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_default_data_set_is_ffjords_eight_gaussians_halved():
    """ring8: FFJORD's 8gaussians (centres 4 (cos, sin)(k pi / 4), std 0.5, all divided by
    sqrt 2) divided by 2, about unit variance per coordinate."""
    from diffusion_jax.data import toy

    mixture = toy.ring_mixture(*load_script().DATASETS["ring8"])
    # FFJORD's centres: (+-1, 0), (0, +-1) and (+-1, +-1) / sqrt 2, times 4; then the data
    # / 1.414 (here / sqrt 2: 1.5e-4 apart).
    s = 1.0 / np.sqrt(2.0)
    centres = 4.0 * np.array([(1, 0), (s, s), (0, 1), (-s, s), (-1, 0), (-s, -s), (0, -1),
                              (s, -s)])
    np.testing.assert_allclose(mixture.means, centres / 1.414 / 2.0, rtol=2e-4, atol=1e-12)
    np.testing.assert_allclose(mixture.stds, 0.5 / 1.414 / 2.0, rtol=2e-4)
    variance = np.mean(mixture.means**2, axis=0) + mixture.stds[0] ** 2
    np.testing.assert_allclose(variance, 1.03125, rtol=1e-12)


def test_off_modes_counts_points_beyond_four_stds_of_every_centre():
    from diffusion_jax.data import toy

    off_modes = load_script().off_modes
    mixture = toy.ring_mixture()  # radius 1.4, std 0.1
    centre = mixture.means[0]
    radial = centre / np.linalg.norm(centre)
    x = np.stack([
        centre,                        # on a mode
        centre + 0.39 * radial,        # 3.9 stds out: still on it
        centre + 0.41 * radial,        # 4.1 stds out, far from every other centre
        np.zeros(2),                   # the ring's middle, 14 stds from every centre
    ])
    assert off_modes(x, mixture) == 0.5
    assert off_modes(x[:2], mixture) == 0.0
    assert off_modes(x, mixture, num_stds=3.0) == 0.75
