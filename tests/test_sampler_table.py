"""experiments/sampler_table.py at toy size: it runs end to end, writes its table, JSON and
plot, scores every sampler for both models, and with the exact eps of the mixture the
probability-flow ODE solved finely reproduces the data's average log-density.

The full-size figures belong to the script (25 minutes); this only guards it from rot."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "sampler_table.py"
NUM_SAMPLES = 400


def run_script(outdir, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device: the script does not shard
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), f"--outdir={outdir}", "--train_steps=20",
         f"--num_samples={NUM_SAMPLES}", "--num_timesteps=200", "--hidden=16", "--depth=1",
         "--batch_size=32", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_sampler_table_runs_at_toy_size(tmp_path):
    run_script(tmp_path)
    for name in ("sampler_table.md", "sampler_table.json", "samples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "sampler_table.json").read_text())
    assert sorted(summary) == ["exact eps", "trained MLP"]

    want = [("DDIM", n) for n in (10, 20, 50)] + [
        (f"DPM-Solver++(2M), {grid}", n)
        for grid in ("logsnr", "time_quadratic") for n in (10, 20, 50, 200)]
    for label, first in (("trained MLP", "ancestral (learned var)"),
                         ("exact eps", "ancestral (beta-tilde var)")):
        rows = summary[label]
        got = [(r["sampler"], r["steps"]) for r in rows]
        assert got[0] == ("data (fresh sample)", 0)
        assert got[1] == (first, 200), got  # the reference chain, over every step
        assert got[-len(want):] == want
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


def test_sampler_table_reference_and_dpm_rows(tmp_path):
    """--rows=reference_and_dpm (the seed study): the data, the reference chain and
    DPM-Solver++'s rows, nothing else."""
    run_script(tmp_path, "--rows=reference_and_dpm")
    summary = json.loads((tmp_path / "sampler_table.json").read_text())
    dpm = [(f"DPM-Solver++(2M), {grid}", n)
           for grid in ("logsnr", "time_quadratic") for n in (10, 20, 50, 200)]
    for label, first in (("trained MLP", "ancestral (learned var)"),
                         ("exact eps", "ancestral (beta-tilde var)")):
        got = [(r["sampler"], r["steps"]) for r in summary[label]]
        assert got == [("data (fresh sample)", 0), (first, 200)] + dpm, got
