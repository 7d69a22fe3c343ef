"""2-D toy data: swiss roll moments and shape, Gaussian mixture density, batch streams."""

import itertools

import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import toy


def iterate(cfg, *, per_process_batch, seed, start_step=0, process_index=0, process_count=1):
    return data.create_data_iterator(
        cfg,
        per_process_batch=per_process_batch,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )


def test_swiss_roll_moments_match_closed_form():
    # E[t cos t] = [cos t + t sin t] / L and E[t sin t] = [sin t - t cos t] / L over
    # [1.5 pi, 4.5 pi], L = 3 pi: (6 pi / 3 pi, 2 / 3 pi).
    mean, std = toy.swiss_roll_moments()
    np.testing.assert_allclose(mean, [2.0, 2.0 / (3.0 * np.pi)], rtol=1e-12)
    t = np.linspace(1.5 * np.pi, 4.5 * np.pi, 2_000_001)  # trapezoid check of the stds
    r = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1)
    np.testing.assert_allclose(std, np.sqrt(np.mean((r - mean) ** 2, axis=0)), rtol=1e-5)


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.5])
def test_swiss_roll_has_unit_variance(noise):
    x = toy.sample_swiss_roll(np.random.default_rng(0), 200_000, noise=noise)
    assert x.dtype == np.float32 and x.shape == (200_000, 2)
    # Monte Carlo: the std error of the variance is about 0.003 here; tolerance 0.02.
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(x.var(axis=0), 1.0, atol=0.02)


def test_noiseless_swiss_roll_lies_on_the_spiral():
    x = toy.sample_swiss_roll(np.random.default_rng(1), 1000, noise=0.0).astype(np.float64)
    mean, std = toy.swiss_roll_moments()
    r = x * std + mean
    t = np.linalg.norm(r, axis=-1)
    assert t.min() >= 1.5 * np.pi - 1e-4 and t.max() <= 4.5 * np.pi + 1e-4
    np.testing.assert_allclose(r, np.stack([t * np.cos(t), t * np.sin(t)], axis=-1), atol=1e-3)


def numpy_mixture_density(x, means, stds, weights):
    """p(x) = sum_k w_k N(x; m_k, s_k^2 I) in float64, written directly."""
    dim = means.shape[1]
    total = np.zeros(x.shape[0])
    for m, s, w in zip(means, stds, weights, strict=True):
        sq = np.sum((x - m) ** 2, axis=-1)
        total += w * np.exp(-sq / (2 * s**2)) / (2 * np.pi * s**2) ** (dim / 2)
    return total


def test_mixture_log_prob_matches_numpy_formula():
    rng = np.random.default_rng(0)
    mixture = toy.GaussianMixture(
        means=rng.normal(size=(3, 3)),
        stds=np.array([0.5, 1.0, 2.0]),
        weights=np.array([0.2, 0.3, 0.5]),
    )
    x = rng.normal(size=(100, 3)) * 2
    expected = np.log(numpy_mixture_density(x, mixture.means, mixture.stds, mixture.weights))
    np.testing.assert_allclose(mixture.log_prob(x), expected, rtol=1e-12)
    ring = data.ring_mixture()
    points = ring.sample(rng, 50)
    expected = np.log(
        numpy_mixture_density(points.astype(np.float64), ring.means, ring.stds, ring.weights)
    )
    np.testing.assert_allclose(ring.log_prob(points), expected, rtol=1e-10)


def test_mixture_density_integrates_to_one():
    ring = data.ring_mixture()
    h = 0.01
    grid = np.arange(-3.0, 3.0, h) + h / 2
    xx, yy = np.meshgrid(grid, grid)
    density = np.exp(ring.log_prob(np.stack([xx, yy], axis=-1)))
    assert density.shape == xx.shape
    np.testing.assert_allclose(density.sum() * h * h, 1.0, atol=1e-4)


def test_mixture_log_prob_is_stable_far_away_and_checks_shapes():
    ring = data.ring_mixture()
    far = ring.log_prob(np.array([[100.0, 100.0]]))
    assert np.isfinite(far).all() and far[0] < -1e5
    with pytest.raises(ValueError, match="last axis must be 2"):
        ring.log_prob(np.zeros((4, 3)))


def test_mixture_samples_have_the_documented_moments():
    ring = data.ring_mixture()
    x = ring.sample(np.random.default_rng(2), 200_000)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(x.var(axis=0), 1.4**2 / 2 + 0.1**2, atol=0.02)


@pytest.mark.parametrize("name", ["swiss_roll", "gaussian_mixture"])
def test_toy_iterator_is_a_pure_function_of_the_step(name):
    cfg = {"name": name}
    assert data.dataset_info(cfg) == data.DataInfo(name, "vector", (2,), None, None)
    from_zero = list(itertools.islice(iterate(cfg, per_process_batch=16, seed=0), 6))
    resumed = next(iterate(cfg, per_process_batch=16, seed=0, start_step=5))
    assert from_zero[0]["x"].dtype == np.float32 and from_zero[0]["x"].shape == (16, 2)
    np.testing.assert_array_equal(from_zero[5]["x"], resumed["x"])
    assert not np.array_equal(from_zero[0]["x"], from_zero[1]["x"])  # fresh samples
    other_seed = next(iterate(cfg, per_process_batch=16, seed=1))
    assert not np.array_equal(from_zero[0]["x"], other_seed["x"])
    parts = [
        data.make_batch_fn(cfg, per_process_batch=4, seed=0, process_index=p, process_count=4)(
            3
        )
        for p in range(4)
    ]
    np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts]), from_zero[3]["x"])


def test_toy_options_reach_the_generator():
    cfg = {
        "name": "gaussian_mixture",
        "num_components": 2,
        "radius": 3.0,
        "component_std": 0.01,
    }
    x = next(iterate(cfg, per_process_batch=256, seed=0))["x"]
    np.testing.assert_allclose(np.abs(x[:, 0]), 3.0, atol=0.1)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        data.make_batch_fn(
            {"name": "swiss_roll", "noise": -1.0},
            per_process_batch=2,
            seed=0,
            process_index=0,
            process_count=1,
        )(0)


def test_heldout_set_is_fixed_and_not_a_training_batch():
    first = data.toy_heldout_set("swiss_roll", 1000)
    np.testing.assert_array_equal(first, data.toy_heldout_set("swiss_roll", 1000))
    assert first.shape == (1000, 2) and first.dtype == np.float32
    train = data.make_batch_fn(
        {"name": "swiss_roll"}, per_process_batch=1000, seed=0, process_index=0, process_count=1
    )(0)["x"]
    assert not np.isin(first, train).any()
    assert not np.array_equal(first, data.toy_heldout_set("swiss_roll", 1000, seed=1))


@pytest.mark.parametrize("name", ["swiss_roll", "heartbeat"])
def test_test_split_batches_are_never_training_batches(name):
    def batches(split, steps):
        fn = data.make_batch_fn({"name": name, "split": split}, per_process_batch=64, seed=0,
                                process_index=0, process_count=1)
        return np.concatenate([fn(s)["x"] for s in steps])

    test = batches("test", range(3))
    np.testing.assert_array_equal(test, batches("test", range(3)))  # fixed
    train = batches("train", range(50))
    if name == "swiss_roll":  # continuous: no point in common
        assert not np.isin(test, train).any()
    else:  # 5 possible sequences: different draws, same law
        assert not np.array_equal(test[:64], train[:64])
    with pytest.raises(ValueError, match=r"data.split for the toy data set .* \['train', 'test'\].*got 'validation'"):
        data.dataset_info({"name": name, "split": "validation"})
