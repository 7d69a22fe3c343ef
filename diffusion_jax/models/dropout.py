"""Dropout whose mask comes from a counter-based hash instead of ``jax.random.bernoulli``.

``flax.linen.Dropout`` draws one threefry2x32 word per element (``jax.random.bernoulli``).
On the CPU that costs about 10 ns an element: 44 ms for one (32, 32, 32, 128) mask on the
2-core x86 machine of the README's Performance section, where the mask below and its
select take 1 ms. The DDPM CIFAR U-Net draws a mask in each of its 22 residual blocks
(dropout 0.1); with hash masks its train step ran 6-11 % faster there, the 4.4M U-Net's
10 % (two rounds each, the forms alternated). On GPUs and TPUs threefry is cheap, and
either form is fine.

The mask (``hash_keep_mask``): a 64-bit seed (two uint32 words ``s0, s1``) is drawn from
the key with ``jax.random.bits``; element ``i`` (its row-major index in the whole array)
gets the hash ``h = fmix32(fmix32(i * 0x9E3779B9 + s0) ^ s1)``, where ``fmix32`` is
MurmurHash3's 32-bit finaliser, and is kept where ``h < round(keep_prob * 2**32)``. For a
fixed seed, ``i -> h`` is a bijection of uint32 (multiplication by an odd constant, the
additions, xors and ``fmix32`` are all invertible), so no two elements of one mask share a
hash value. It is a statistical hash, not a cryptographic generator: what dropout needs is
the keep rate, no visible correlation between elements and independent masks for
different keys, which ``tests/test_dropout.py`` checks (rates against binomial
tolerances, neighbour and cross-key correlations, the distribution of runs).

The index is global, so a mask does not depend on how the array is sharded over devices
(the counters are iotas, which XLA's partitioner computes per shard).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DROPOUT_RNGS = ("hash", "jax")

_GOLDEN = np.uint32(0x9E3779B9)  # 2**32 / golden ratio, odd: i -> i * _GOLDEN is a bijection
_FMIX_1 = np.uint32(0x85EBCA6B)
_FMIX_2 = np.uint32(0xC2B2AE35)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * _FMIX_1
    h = h ^ (h >> 13)
    h = h * _FMIX_2
    return h ^ (h >> 16)


def _global_index(shape: Sequence[int]) -> jax.Array:
    """uint32 row-major index of every element of an array of ``shape``, as a sum of
    per-axis iotas (so a sharded array computes only its own shard's indices)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        if shape[axis] > 1:  # (a unit axis adds nothing; its stride may be 2**32 itself)
            iota = jax.lax.broadcasted_iota(jnp.uint32, tuple(shape), axis)
            index = index + iota * np.uint32(stride)
        stride *= shape[axis]
    return index


def hash_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """uint32 hash of every element's row-major index under a seed drawn from ``key``
    (module doc): ``fmix32(fmix32(i * 0x9E3779B9 + s0) ^ s1)`` with
    ``(s0, s1) = jax.random.bits(key, (2,), uint32)``. Distinct elements get distinct
    values (a bijection of the index for a fixed key).

    Args:
      key: a JAX PRNG key (typed or raw uint32).
      shape: the output's shape; at most 2**32 elements.

    Raises:
      ValueError: more than 2**32 elements.
    """
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    if size > 2**32:
        raise ValueError(
            f"hash_bits: at most 2**32 elements can be indexed; shape {shape} has {size}. "
            "Use dropout_rng='jax' for arrays this large."
        )
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    return _fmix32(_fmix32(_global_index(shape) * _GOLDEN + seeds[0]) ^ seeds[1])


def hash_keep_mask(key: jax.Array, shape: Sequence[int], keep_prob: float) -> jax.Array:
    """A boolean mask of ``shape``, each element True with probability ``keep_prob``
    (rounded to a multiple of 2**-32): ``hash_bits(key, shape) < keep_prob * 2**32``.

    Args:
      key: a JAX PRNG key (typed or raw uint32).
      shape: the mask's shape; at most 2**32 elements.
      keep_prob: in [0, 1].

    Raises:
      ValueError: ``keep_prob`` outside [0, 1], or more than 2**32 elements.
    """
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"hash_keep_mask: keep_prob must be in [0, 1]; got {keep_prob}")
    bits = hash_bits(key, shape)
    if keep_prob == 1.0:
        return jnp.ones(bits.shape, bool)
    # threshold in [0, 2**32 - 1]: keep_prob == 0 keeps nothing, the rest round to 2**-32.
    threshold = np.uint32(min(round(keep_prob * 2.0**32), 2**32 - 1))
    return bits < threshold


class Dropout(nn.Module):
    """``flax.linen.Dropout`` (inverted dropout: kept elements are scaled by
    ``1 / (1 - rate)``) with the mask drawn by ``rng``:

    - 'hash' (default): `hash_keep_mask`, a counter-based hash; fast on every backend.
    - 'jax': ``jax.random.bernoulli``, exactly what ``flax.linen.Dropout`` computes (the
      same mask, for the same key, as an ``nn.Dropout`` of the same name and place).

    The mask's key comes from the ``rng_collection`` stream (``'dropout'``), one per call.
    Input and output have the same shape and dtype.
    """

    rate: float
    deterministic: bool | None = None
    rng: str = "hash"
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        if self.rng not in DROPOUT_RNGS:
            raise ValueError(f"Dropout rng must be one of {DROPOUT_RNGS}; got {self.rng!r}.")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1]; got {self.rate}.")
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        key = self.make_rng(self.rng_collection)
        if self.rng == "jax":
            keep = jax.random.bernoulli(key, p=keep_prob, shape=x.shape)
        else:
            keep = hash_keep_mask(key, x.shape, keep_prob)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
