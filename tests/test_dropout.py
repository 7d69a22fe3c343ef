"""Hash dropout (`diffusion_jax.models.dropout`): the hash against a NumPy uint64
reference written from its definition, the statistics a dropout mask needs (keep rates,
neighbour and cross-key correlations, runs; each with a stated tolerance), sharding
invariance, the module against flax's ``nn.Dropout``, and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.models import UNet
from diffusion_jax.models.dropout import Dropout, hash_bits, hash_keep_mask

from tests.test_unet import TINY, _inputs, _param_shapes, _random_params

_MASK32 = 0xFFFFFFFF


def _numpy_fmix32(h):
    h = h.astype(np.uint64)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _numpy_hash_bits(key, shape):
    """The module doc's formula in uint64 NumPy arithmetic, reduced mod 2**32 by hand."""
    s0, s1 = (int(s) for s in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))
    index = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
    h = (index * 0x9E3779B9 + s0) & _MASK32
    return _numpy_fmix32(_numpy_fmix32(h) ^ s1).astype(np.uint32)


def test_hash_bits_match_the_numpy_reference():
    for seed, shape in [(0, (3, 5, 7, 4)), (1, (1000,)), (7, (2, 1, 3))]:
        key = jax.random.key(seed)
        np.testing.assert_array_equal(
            np.asarray(hash_bits(key, shape)), _numpy_hash_bits(key, shape))


def test_hash_bits_are_distinct_and_uniform():
    bits = np.asarray(hash_bits(jax.random.key(3), (64, 32, 32, 16))).ravel()  # 2**20
    assert np.unique(bits).size == bits.size  # a bijection of the index
    n = bits.size
    # Each of the 32 bits is set half the time: 5 binomial standard deviations.
    ones = np.array([((bits >> b) & 1).sum() for b in range(32)])
    assert np.all(np.abs(ones - n / 2) < 5 * np.sqrt(n / 4)), ones
    # The top byte is uniform over 256 values: chi-square with 255 degrees of freedom
    # (mean 255, sd 22.6) below 255 + 5 sd.
    counts = np.bincount(bits >> 24, minlength=256)
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
    assert chi2 < 255 + 5 * np.sqrt(2 * 255), chi2


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_keep_rate(keep_prob):
    mask = np.asarray(hash_keep_mask(jax.random.key(0), (64, 32, 32, 16), keep_prob))
    n = mask.size
    sd = np.sqrt(keep_prob * (1 - keep_prob) / n)
    assert abs(mask.mean() - keep_prob) < 5 * sd
    # Per example too (16,384 elements each): the keep rate does not drift along the
    # index, 5 sd of the per-example rate.
    per_example = mask.reshape(64, -1).mean(1)
    assert np.all(np.abs(per_example - keep_prob) < 5 * sd * np.sqrt(64))


def test_keep_prob_zero_and_one():
    key = jax.random.key(0)
    assert not np.asarray(hash_keep_mask(key, (4, 8), 0.0)).any()
    assert np.asarray(hash_keep_mask(key, (4, 8), 1.0)).all()


def _correlation(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return np.corrcoef(a, b)[0, 1]


def test_no_correlation_between_neighbours_or_keys():
    shape = (32, 32, 32, 32)  # 2**20 elements
    key = jax.random.key(5)
    mask = np.asarray(hash_keep_mask(key, shape, 0.5))
    tolerance = 5 / np.sqrt(mask.size / 2)  # 5 sd of a correlation of independent bits
    for axis in range(4):  # neighbours along every axis (strides 1, 32, 1024, 32768)
        first = np.take(mask, np.arange(shape[axis] - 1), axis=axis)
        second = np.take(mask, np.arange(1, shape[axis]), axis=axis)
        assert abs(_correlation(first, second)) < tolerance, axis
    # Masks of related keys (successive fold_ins, as successive train steps draw them)
    # agree on half the elements, as independent masks do.
    for other in (jax.random.fold_in(key, 1), jax.random.split(key)[0]):
        other_mask = np.asarray(hash_keep_mask(other, shape, 0.5))
        assert abs(_correlation(mask, other_mask)) < 5 / np.sqrt(mask.size)


def test_runs():
    # Wald-Wolfowitz: a sequence of n independent fair bits has 1 + (n - 1) / 2 runs on
    # average, with variance (n - 1) / 4; 5 sd.
    mask = np.asarray(hash_keep_mask(jax.random.key(9), (2**20,), 0.5))
    n = mask.size
    runs = 1 + np.count_nonzero(mask[1:] != mask[:-1])
    assert abs(runs - (1 + (n - 1) / 2)) < 5 * np.sqrt((n - 1) / 4)


def test_mask_does_not_depend_on_sharding():
    key = jax.random.key(2)
    shape = (8, 4, 4, 16)
    whole = hash_keep_mask(key, shape, 0.7)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = jax.jit(lambda k: hash_keep_mask(k, shape, 0.7),
                      out_shardings=NamedSharding(mesh, PartitionSpec("data")))(key)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(whole))


def test_dropout_module_hash():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
    key = jax.random.key(1)
    out = Dropout(0.3).apply({}, x, deterministic=False, rngs={"dropout": key})
    # The key the module draws is its 'dropout' stream's first key, as in flax.
    mask = Dropout(0.3).apply(
        {}, method=lambda m: hash_keep_mask(m.make_rng("dropout"), x.shape, 0.7),
        rngs={"dropout": key})
    np.testing.assert_allclose(np.asarray(out), np.where(mask, np.asarray(x) / 0.7, 0.0),
                               rtol=1e-6)
    assert 0.6 < float(np.mean(mask)) < 0.8
    # The gradient is the scaled mask.
    grad = jax.grad(lambda x_: Dropout(0.3).apply(
        {}, x_, deterministic=False, rngs={"dropout": key}).sum())(x)
    np.testing.assert_allclose(np.asarray(grad), np.where(mask, 1 / 0.7, 0.0), rtol=1e-6)
    # Deterministic, rate 0 and rate 1.
    np.testing.assert_array_equal(Dropout(0.3).apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(
        Dropout(0.0).apply({}, x, deterministic=False, rngs={"dropout": key}), x)
    np.testing.assert_array_equal(
        Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": key}),
        np.zeros_like(x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_module_jax_is_flax_dropout(dtype):
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32), dtype)
    rngs = {"dropout": jax.random.key(4)}
    ours = Dropout(0.25, rng="jax").apply({}, x, deterministic=False, rngs=rngs)
    flax_out = nn.Dropout(0.25).apply({}, x, deterministic=False, rngs=rngs)
    assert ours.dtype == flax_out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax_out))


class _Block(nn.Module):
    """A parent holding one dropout layer, auto-named as in the U-Net's residual block."""

    dropout: type

    @nn.compact
    def __call__(self, x):
        kwargs = {"rng": "jax"} if self.dropout is Dropout else {}
        return self.dropout(0.1, **kwargs)(nn.Dense(4)(x), deterministic=False)


def test_jax_rng_inside_a_module_draws_flax_masks():
    # The key of a layer's mask depends on its path in the module tree: our Dropout takes
    # flax's place and name ("Dropout_0"), so dropout_rng='jax' gives the masks the
    # U-Net drew with nn.Dropout.
    x = jax.random.normal(jax.random.key(0), (64, 16))
    variables = _Block(nn.Dropout).init(jax.random.key(1), x)
    rngs = {"dropout": jax.random.key(2)}
    ours = _Block(Dropout).apply(variables, x, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(ours),
                                  np.asarray(_Block(nn.Dropout).apply(variables, x, rngs=rngs)))
    assert 0 < np.mean(np.asarray(ours) == 0) < 0.5


def test_unet_dropout_forms_draw_other_masks_from_the_same_parameters():
    x, t = _inputs(jax.random.key(1))
    shapes = _param_shapes(UNet(**TINY), x, t)
    params = _random_params(shapes, seed=0)
    outputs = {}
    for rng in ("hash", "jax"):
        model = UNet(**TINY, dropout_rng=rng)
        assert jax.tree.map(jnp.shape, _param_shapes(model, x, t)) == jax.tree.map(
            jnp.shape, shapes)
        outputs[rng] = model.apply({"params": params}, x, t, train=True,
                                   rngs={"dropout": jax.random.key(1)})
    assert float(jnp.max(jnp.abs(outputs["hash"] - outputs["jax"]))) > 1e-3
    np.testing.assert_array_equal(  # train=False: no dropout, the same function
        UNet(**TINY, dropout_rng="hash").apply({"params": params}, x, t, train=False),
        UNet(**TINY, dropout_rng="jax").apply({"params": params}, x, t, train=False))


def test_bad_input():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"keep_prob must be in \[0, 1\]; got 1.5"):
        hash_keep_mask(key, (4,), 1.5)
    with pytest.raises(ValueError, match=r"at most 2\*\*32 elements.*\(65536, 65537\)"):
        hash_bits(key, (65536, 65537))
    # Exactly 2**32 elements is allowed, whatever the unit axes (traced only: 16 GB).
    for shape in [(2**32,), (1, 2**32), (2**16, 1, 2**16, 1)]:
        assert jax.eval_shape(lambda k, shape=shape: hash_bits(k, shape), key).shape == shape
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"Dropout rng must be one of \('hash', 'jax'\); "
                                         r"got 'philox'"):
        Dropout(0.1, rng="philox").apply({}, x, deterministic=False, rngs={"dropout": key})
    with pytest.raises(ValueError, match=r"Dropout rate must be in \[0, 1\]; got -0.1"):
        Dropout(-0.1).apply({}, x, deterministic=False, rngs={"dropout": key})
    with pytest.raises(ValueError, match=r"Dropout rng must be one of"):
        UNet(**TINY, dropout_rng="philox").init(
            key, jnp.ones((2, 8, 8, 3)), jnp.array([1, 2]), train=True)
