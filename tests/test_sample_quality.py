"""Digits FID (the offline metric) and the fid_stats / fid modes on a toy digits run."""

import importlib.util
import json

import numpy as np
import pytest

from diffusion_jax.metrics import digits, weights
from diffusion_jax.training import sample_quality, train

from helpers import ROOT


def _digits_config(steps):
    spec = importlib.util.spec_from_file_location("digits_config", ROOT / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.model.cpu_kernels = "none"
    c.train.num_steps, c.train.batch_size, c.optim.lr, c.optim.ema_decay = steps, 32, 2e-3, 0.99
    c.train.log_every, c.train.checkpoint_every, c.train.sample_every = steps, steps, steps
    c.sample.num_samples, c.sample.sampler, c.sample.num_steps = 100, "ddim", 20
    return c


def test_digits_classifier_is_accurate_and_deterministic():
    classifier = digits.train_digits_classifier()
    assert classifier.held_out_accuracy > 0.9
    again = digits.train_digits_classifier.__wrapped__()
    for a, b in zip(*(np.asarray(x) for x in
                      (classifier.params["Dense_0"]["kernel"], again.params["Dense_0"]["kernel"]))):
        np.testing.assert_array_equal(a, b)


def test_digits_fid_training_vs_held_out_is_small_and_noise_is_large():
    train_digits, _ = digits.digits_split("train")
    held_out, _ = digits.digits_split("test")
    noise = np.random.default_rng(0).random((297, 8, 8, 1), dtype=np.float32)
    shift = digits.digits_fid(train_digits, held_out)
    assert shift < 30  # measured: 15.8
    assert digits.digits_fid(noise, held_out) > 8 * shift  # measured: 377
    # Enlarged ('nearest') digits give the same features as the native ones.
    big = np.repeat(np.repeat(held_out, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(digits.train_digits_classifier().features(big),
                               digits.train_digits_classifier().features(held_out), rtol=1e-5)


def test_digits_fid_floor_is_what_exact_samples_of_the_training_distribution_score():
    """The report's floor: digits of the comparison half against the reference half.
    Exact samples of the training distribution that are not reference digits score about
    the floor; corrupted digits and digits of other writers (the held-out ones) above it."""
    reference_idx, comparison_idx = digits.reference_halves()
    assert len(reference_idx) == len(comparison_idx) == 750
    assert len(np.union1d(reference_idx, comparison_idx)) == 1500
    # Both halves hold every part of the writer-ordered data (150 of each 300 expected).
    assert all(100 < np.sum((reference_idx >= b) & (reference_idx < b + 300)) < 200
               for b in range(0, 1500, 300))
    train_digits, _ = digits.digits_split("train")
    rng = np.random.default_rng(7)
    n = 500
    exact = train_digits[rng.choice(comparison_idx, n, replace=False)]
    report = digits.digits_fid_report(exact, seed=1)
    floor, std = report["digits_fid_floor"], report["digits_fid_floor_std"]
    assert report["digits_fid_num_samples"] == report["digits_fid_floor_num"] == n
    assert floor < 6  # measured: 2.8 +- 0.2 (seed 0), 3.9 +- 0.9 (seed 1) at N = 500
    assert abs(report["digits_fid"] - floor) < 4 * std + 0.5  # a draw of the same kind
    noisy = np.clip(exact + 0.3 * rng.standard_normal(exact.shape), 0, 1).astype(np.float32)
    assert digits.digits_fid_report(noisy)["digits_fid"] > 2 * floor
    held_out, _ = digits.digits_split("test")
    other_writers = digits.digits_fid_report(held_out)
    assert other_writers["digits_fid"] > other_writers["digits_fid_floor"] + 5  # 18.5 vs 5.6
    assert other_writers["digits_fid_held_out"] < 1e-6


def test_toy_digits_run_quick_start_figures_and_fid_modes(tmp_path):
    """One toy run (150 steps of a tiny model, so its samples are digit-like but imperfect)
    for all of: the training log's digits FID, fid_stats, fid and their errors."""
    workdir = tmp_path / "run"
    config = _digits_config(150)
    train.train_and_evaluate(config, workdir)
    _check_quick_start_report(workdir)
    config.fid.num_examples, config.fid.num_samples, config.fid.batch_size = 297, 100, 64
    config.fid.kid_subset_size, config.fid.kid_subsets = 50, 10
    config.sample.batch_size = 104  # the training run's padded draw: its compiled program
    stats = _check_fid_modes(config, workdir)
    _check_bad_networks(config, workdir, stats, tmp_path)


def _check_quick_start_report(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    report = next(x for x in lines if "digits_fid" in x)
    assert report["digits_fid_num_samples"] == 100
    train_digits, _ = digits.digits_split("train")
    reference = train_digits[digits.reference_halves()[0]]
    noise = np.random.default_rng(1).random((100, 8, 8, 1), dtype=np.float32)
    noise_fid = digits.digits_fid(noise, reference)
    # floor < samples < noise (at 150 steps of the tiny model, 100 samples)
    assert report["digits_fid_floor"] < report["digits_fid"] < noise_fid / 2


def _check_fid_modes(config, workdir):
    with pytest.raises(FileNotFoundError, match="--mode=fid_stats first"):
        sample_quality.fid_of_checkpoint(config, workdir)
    path = sample_quality.compute_reference_statistics(config, workdir)
    with np.load(path) as f:
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64)
        assert f["features"].shape == (297, 64) and int(f["num_examples"]) == 297
        held_out, _ = digits.digits_split("test")
        expected = digits.train_digits_classifier().features(held_out)
        np.testing.assert_allclose(f["mu"], expected.mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError):
        sample_quality.compute_reference_statistics(config, workdir)
    results = sample_quality.fid_of_checkpoint(config, workdir)
    line = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert line == results
    assert (line["sampler"], line["sampler_steps"], line["num_samples"]) == ("ddim", 20, 100)
    assert line["feature_network"] == "digits" and "fid" not in line  # never read as Inception
    assert 0 < line["digits_fid"] < 500 and 0 <= line["digits_precision"] <= 1
    assert {"digits_kid", "digits_kid_std", "digits_recall"} <= set(line)
    return path


def _check_bad_networks(config, workdir, digits_stats, tmp_path):
    config.fid.network, config.fid.stats = "inception", str(digits_stats)
    with pytest.raises(ValueError, match="holds digits statistics, but fid.network is "
                                         "'inception'"):
        sample_quality.fid_of_checkpoint(config, workdir)
    config.fid.weights = str(tmp_path / "absent.npz")
    config.fid.stats = str(tmp_path / "stats.npz")
    with pytest.raises(weights.InceptionWeightsNotFoundError, match="absent.npz"):
        sample_quality.compute_reference_statistics(config, workdir)
    config.fid.network = "inceptionv3"
    with pytest.raises(ValueError, match="'inception', 'digits'"):
        sample_quality.compute_reference_statistics(config, workdir)
    config.fid.network, config.fid.num_samples, config.fid.stats = "digits", 1, str(digits_stats)
    with pytest.raises(ValueError, match="fid.num_samples must be an int >= 2; got 1"):
        sample_quality.fid_of_checkpoint(config, workdir)


def test_feature_throughput_benchmark_reports_images_per_second(capsys):
    from experiments import benchmark_fid

    assert benchmark_fid.main(["--network=digits", "--batch=12", "--repeats=1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["network"] == "digits" and out["batch"] == 16 and out["devices"] == 8
    assert out["images_per_sec"] > 0 and out["platform"] == "cpu"
