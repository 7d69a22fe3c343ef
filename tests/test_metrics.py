"""FID, KID, Inception Score, precision/recall, streaming statistics, sharded features and
the bad inputs of diffusion_jax.metrics, against float64 references written here."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import Mesh

from diffusion_jax.metrics import features, fid, inception, inception_score, kid
from diffusion_jax.metrics import precision_recall, weights


def _random_stats(rng, d, n):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


# --- Frechet distance ----------------------------------------------------------------------


def _reference_fid(mu1, s1, mu2, s2):
    """Eq. 6 of Heusel et al. with the symmetric form of the root: sqrt(s1) s2 sqrt(s1)."""
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * cross))


def test_frechet_distance_against_the_symmetric_formula(rng):
    for d in (1, 5, 40):
        a, b = _random_stats(rng, d, 200), _random_stats(rng, d, 200)
        np.testing.assert_allclose(fid.frechet_distance(*a, *b), _reference_fid(*a, *b),
                                   rtol=1e-8)


def test_frechet_distance_closed_form_for_diagonal_gaussians(rng):
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)),
                               expected, rtol=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero(rng):
    mu, sigma = _random_stats(rng, 30, 100)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_singular_covariances_as_pytorch_fid(rng, monkeypatch):
    # Rank-deficient covariances (N < D): scipy's root of the product is finite here (it
    # logs a warning); the result is the formula's.
    d = 8
    s1 = np.cov(rng.normal(size=(4, d)), rowvar=False)
    s2 = np.cov(rng.normal(size=(5, d)), rowvar=False)
    mu = rng.normal(size=d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _reference_fid(mu, s1, 0 * mu, s2)
    np.testing.assert_allclose(fid.frechet_distance(mu, s1, 0 * mu, s2), expected, rtol=1e-6)
    # A root that is not finite: pytorch-fid adds eps to both diagonals and takes it again.
    calls, sqrtm = [], scipy.linalg.sqrtm

    def first_not_finite(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", first_not_finite)
    got = fid.frechet_distance(mu, s1, 0 * mu, s2, eps=1e-3)
    offset = 1e-3 * np.eye(d)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    np.testing.assert_allclose(
        got, ((mu ** 2).sum() + np.trace(s1 + s2)
              - 2 * np.trace(sqrtm((s1 + offset) @ (s2 + offset)).real)), rtol=1e-12)


def test_a_complex_root_with_a_large_imaginary_diagonal_is_an_error(monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: np.eye(2) * (1 + 0.1j))
    with pytest.raises(ValueError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: np.eye(2) * (1 + 1e-5j))
    assert abs(fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))) < 1e-12


def test_frechet_distance_rejects_mismatched_statistics(rng):
    mu, sigma = _random_stats(rng, 4, 20)
    with pytest.raises(ValueError, match="different dimensions"):
        fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match=r"sigma \(D, D\)"):
        fid.frechet_distance(mu, sigma[:3], mu, sigma)


# --- statistics: files, streaming, the singular warning -------------------------------------


def test_running_statistics_equal_whole_array_statistics(rng):
    x = rng.normal(size=(1003, 7)) * 50 + 1e4  # a large offset: the one-pass trap
    running = fid.RunningStatistics(7)
    for chunk in np.array_split(x, [1, 2, 100, 357, 900]):
        running.update(chunk)
    mu, sigma = running.statistics()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    assert running.count == 1003


def test_statistics_files_round_trip_and_bad_files(tmp_path, rng):
    mu, sigma = _random_stats(rng, 5, 50)
    path = fid.save_statistics(tmp_path / "s.npz", mu, sigma, features=np.zeros((2, 5)))
    got_mu, got_sigma = fid.load_statistics(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    with np.load(path) as f:  # pytorch-fid reads exactly these two keys
        assert f["mu"].shape == (5,) and f["sigma"].shape == (5, 5)
    with pytest.raises(FileExistsError):
        fid.save_statistics(path, mu, sigma)
    np.savez(tmp_path / "no_sigma.npz", mu=mu)
    with pytest.raises(ValueError, match="lacks sigma"):
        fid.load_statistics(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "neither.npz", m=mu)
    with pytest.raises(ValueError, match="lacks mu and sigma"):
        fid.load_statistics(tmp_path / "neither.npz")
    with pytest.raises(FileNotFoundError, match="fid_stats"):
        fid.load_statistics(tmp_path / "missing.npz")


def test_fewer_examples_than_dimensions_warns(rng):
    with pytest.warns(fid.SingularCovarianceWarning, match="singular"):
        fid.feature_statistics(rng.normal(size=(10, 16)))
    running = fid.RunningStatistics(16)
    running.update(rng.normal(size=(10, 16)))
    with pytest.warns(fid.SingularCovarianceWarning):
        running.statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid.feature_statistics(rng.normal(size=(17, 16)))


# --- KID, IS, precision/recall -------------------------------------------------------------


def _mmd2_loops(x, y):
    """The unbiased MMD^2 written as explicit sums over index pairs."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / m**2


def test_mmd2_unbiased_equals_the_pair_sums(rng):
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.3
    np.testing.assert_allclose(kid.mmd2_unbiased(x, y), _mmd2_loops(x, y), rtol=1e-10)


def test_kid_is_unbiased_for_identical_distributions(rng):
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    mean, std = kid.kernel_inception_distance(a, b, num_subsets=50, subset_size=100)
    assert abs(mean) < 3 * std / np.sqrt(50), (mean, std)
    shifted, _ = kid.kernel_inception_distance(a, b + 0.5, num_subsets=50, subset_size=100)
    assert shifted > 10 * std / np.sqrt(50)


def test_inception_score_against_its_definition(rng):
    logits = rng.normal(size=(100, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 10):
        marginal = part.mean(0)
        scores.append(np.exp(np.mean([(q * np.log(q / marginal)).sum() for q in part])))
    mean, std = inception_score.inception_score(logits)
    np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
    # One-hot, balanced predictions: IS = the number of classes; constant ones: IS = 1.
    sharp = np.eye(5)[np.arange(50) % 5] * 100
    np.testing.assert_allclose(inception_score.inception_score(sharp)[0], 5, rtol=1e-6)
    np.testing.assert_allclose(inception_score.inception_score(np.zeros((50, 5)))[0], 1)


def _coverage_brute_force(manifold, queries, k):
    d_mm = np.linalg.norm(manifold[:, None] - manifold[None], axis=-1)
    radii = np.sort(d_mm, axis=1)[:, k]
    d_qm = np.linalg.norm(queries[:, None] - manifold[None], axis=-1)
    return np.mean((d_qm <= radii[None]).any(1))


def test_precision_recall_against_brute_force(rng):
    real = rng.normal(size=(60, 3))
    fake = rng.normal(size=(50, 3)) * 0.5 + 1.0
    p, r = precision_recall.precision_recall(real, fake, k=3)
    assert p == _coverage_brute_force(real, fake, 3)
    assert r == _coverage_brute_force(fake, real, 3)
    p_blocked = precision_recall.manifold_coverage(
        real, precision_recall.knn_radii(real, 3, block=7), fake, block=5)
    assert p_blocked == p
    assert precision_recall.precision_recall(real, real) == (1.0, 1.0)
    assert 0.0 < p < 1.0 and 0.0 < r < 1.0


# --- features: input checks, batching, sharding ---------------------------------------------


def test_image_checks_say_what_is_wrong():
    assert features.to_unit_range(np.full((1, 4, 4, 3), 255, np.uint8)).max() == 1.0
    with pytest.raises(ValueError, match=r"\[-1, 1\].*samples_to_unit_range"):
        features.to_unit_range(np.full((1, 4, 4, 3), -1.0, np.float32))
    with pytest.raises(ValueError, match="3 channels.*got 1"):
        features.to_unit_range(np.zeros((1, 4, 4, 1), np.float32), channels=3)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        features.to_unit_range(np.zeros((4, 4, 3), np.float32))
    levels = features.samples_to_unit_range(np.array([-1.0, -0.999, 0.0, 1.0, 1.5]))
    np.testing.assert_allclose(levels * 255, [0, 0, 128, 255, 255])


def _toy_apply(w, images):
    x = images.reshape(images.shape[0], -1)
    return {"f": jnp.tanh(x @ w), "sum": x.sum(1)}


def test_batches_and_a_partial_last_batch_equal_one_call(rng):
    w = rng.normal(size=(48, 5)).astype(np.float32)
    images = rng.random((23, 4, 4, 3), dtype=np.float32)
    one_device = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    ext = features.FeatureExtractor(_toy_apply, w, batch_size=6, mesh=one_device)
    out = ext(images)  # 3 whole batches and one of 5: not a multiple of the batch
    expected = np.tanh(images.reshape(23, -1).astype(np.float64) @ w)
    np.testing.assert_allclose(out["f"], expected, rtol=1e-5, atol=1e-6)
    assert out["sum"].shape == (23,)
    streamed = fid.RunningStatistics(5)
    for part in ext.iter_batches([images[:10], images[10:]]):
        streamed.update(part["f"])
    np.testing.assert_allclose(streamed.statistics()[1], np.cov(out["f"], rowvar=False),
                               rtol=1e-10, atol=1e-12)


def test_eight_devices_give_the_features_of_one(rng):
    assert jax.device_count() == 8
    w = rng.normal(size=(48, 5)).astype(np.float32)
    images = rng.random((37, 4, 4, 3), dtype=np.float32)
    one = features.FeatureExtractor(_toy_apply, w, 16,
                                     mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    eight = features.FeatureExtractor(_toy_apply, w, 12)  # rounded up to 16
    assert eight.batch_size == 16 and eight.mesh.devices.size == 8
    a, b = one(images), eight(images)
    np.testing.assert_allclose(b["f"], a["f"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b["sum"], a["sum"], rtol=1e-6)


# --- weights: conversion layout, missing file -----------------------------------------------


def test_missing_weights_name_the_file_the_source_and_the_command(tmp_path):
    path = tmp_path / "nowhere" / "inception.npz"
    with pytest.raises(weights.InceptionWeightsNotFoundError) as e:
        weights.load_inception_variables(path)
    message = str(e.value)
    assert str(path) in message
    assert weights.WEIGHTS_URL in message
    assert "python -m diffusion_jax.metrics.convert" in message


def test_converted_weights_fit_the_flax_model(tmp_path, rng):
    """A state dict with pytorch-fid's names and layouts (made from the Flax shapes
    backwards) converts to exactly the Flax tree; the .npz loads without PyTorch."""
    shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, 75, 75, 3)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    state_dict = {}
    for path, leaf in flat:
        names = [p.key for p in path]
        collection, module, leaf_name = names[0], ".".join(names[1:-1]), names[-1]
        value = rng.normal(size=leaf.shape).astype(np.float32)
        if leaf_name == "kernel" and len(leaf.shape) == 4:
            state_dict[f"{module}.weight"] = value.transpose(3, 2, 0, 1)
        elif leaf_name == "kernel":
            state_dict[f"{module}.weight"] = value.T
        else:
            torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                          "var": "running_var"}[leaf_name]
            state_dict[f"{module}.{torch_name}"] = value
        if module.endswith(".bn") and leaf_name == "var":
            state_dict[f"{module}.num_batches_tracked"] = np.array(0)
        del collection
    converted = weights.convert_state_dict(state_dict)
    saved = weights.save_variables(converted, tmp_path / "w.npz")
    loaded = weights.load_inception_variables(saved)
    assert jax.tree.structure(loaded) == jax.tree.structure(shapes)
    for (path, want), got in zip(flat, jax.tree.leaves(loaded)):
        assert got.shape == want.shape, path
    with pytest.raises(FileExistsError):
        weights.save_variables(converted, saved)
    with pytest.raises(ValueError, match="Unexpected entry"):
        weights.convert_state_dict({"Mixed_5b.extra.thing": np.zeros(3)})
