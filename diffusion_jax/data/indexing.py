"""The global index stream: which example every process reads at every step.

Exact resumption needs the batch of global step ``s`` to be a pure function of
``(seed, s, process_index, process_count)``, so that an iterator can start at any step
without replaying the earlier ones. The stream is defined as follows:

- Epoch ``e`` is a permutation ``perm_e`` of ``[0, N)`` derived from ``(seed, e)`` only.
- The global stream is the concatenation ``perm_0, perm_1, ...``: global position ``g``
  holds example ``perm_{g // N}[g % N]``. Epochs never end early: a batch may straddle two
  epochs, and no example is dropped.
- Global batch ``s`` takes positions ``[s * G, (s + 1) * G)`` with
  ``G = per_process_batch * process_count``; process ``p`` takes the contiguous slice
  ``[s * G + p * B, s * G + (p + 1) * B)``. The processes' slices are disjoint and their
  concatenation in process order is the 1-process global batch.
- Per-example random choices (the horizontal flip) are functions of ``(seed, g)``, so the
  global batch does not depend on the process count either.

The hash behind all of this is SplitMix64 (Steele, Lea and Flood 2014) written out in NumPy
uint64 arithmetic, so the stream depends on no library's random-number generator and does
not change between NumPy versions. A permutation is the stable argsort of 64-bit hashes
of ``(seed, epoch, i)``.
"""

from __future__ import annotations

import functools

import numpy as np

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1

# Distinct streams drawn from one seed: any change here changes every data order.
PERMUTATION_STREAM = 1
FLIP_STREAM = 2


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, applied elementwise.

    Args:
      values: uint64 array of any shape.

    Returns:
      uint64 array of the same shape: well-mixed 64-bit hashes.
    """
    z = np.asarray(values, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def stream_key(seed: int, *words: int) -> np.uint64:
    """A 64-bit key from a seed and a sequence of integers (stream tags, epochs...).

    Args:
      seed: any Python int (taken modulo 2**64, so negative seeds are allowed).
      *words: further non-negative ints folded into the key in order.

    Returns:
      a NumPy uint64 scalar.
    """
    key = np.array([int(seed) & _MASK64], dtype=np.uint64)
    for word in words:
        with np.errstate(over="ignore"):
            key = splitmix64(
                key + np.array([int(word) & _MASK64], dtype=np.uint64) * _GOLDEN_GAMMA
            )
        key = splitmix64(key)
    return key[0]


def hash_positions(key: np.uint64, positions: np.ndarray) -> np.ndarray:
    """Hashes of ``positions`` under ``key``: element ``i`` of SplitMix64's stream.

    Args:
      key: uint64 scalar from `stream_key`.
      positions: int64 array of non-negative positions, any shape.

    Returns:
      uint64 array of the same shape as ``positions``.
    """
    positions = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        state = np.uint64(key) + (positions + np.uint64(1)) * _GOLDEN_GAMMA
    return splitmix64(state)


@functools.lru_cache(maxsize=4)
def _cached_permutation(key: int, num_examples: int) -> np.ndarray:
    hashes = hash_positions(np.uint64(key), np.arange(num_examples, dtype=np.int64))
    permutation = np.argsort(hashes, kind="stable").astype(np.int64)
    permutation.setflags(write=False)
    return permutation


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the examples in epoch ``epoch``.

    Args:
      seed: the data seed (any int).
      epoch: non-negative epoch number.
      num_examples: N > 0, the number of examples.

    Returns:
      int64 array of shape (N,): a permutation of [0, N). Read-only (it is cached).
    """
    if num_examples <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}.")
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}.")
    key = stream_key(seed, PERMUTATION_STREAM, epoch)
    return _cached_permutation(int(key), int(num_examples))


def process_positions(
    step: int, *, per_process_batch: int, process_index: int, process_count: int
) -> np.ndarray:
    """Global stream positions read by one process at one step.

    Args:
      step: global step s >= 0.
      per_process_batch: B > 0.
      process_index: p in [0, process_count).
      process_count: P > 0.

    Returns:
      int64 array of shape (B,): ``s * B * P + p * B + arange(B)``.
    """
    check_process_args(per_process_batch, process_index, process_count)
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}.")
    global_batch = per_process_batch * process_count
    start = int(step) * global_batch + process_index * per_process_batch
    return start + np.arange(per_process_batch, dtype=np.int64)


def positions_to_indices(positions: np.ndarray, *, seed: int, num_examples: int) -> np.ndarray:
    """Example indices at global stream positions.

    Args:
      positions: int64 array of non-negative positions, shape (B,).
      seed: the data seed.
      num_examples: N > 0.

    Returns:
      int64 array of shape (B,) with values in [0, N):
      ``epoch_permutation(seed, g // N, N)[g % N]`` for each position g.
    """
    positions = np.asarray(positions, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):  # a batch spans at most a few epochs
        where = epochs == epoch
        indices[where] = epoch_permutation(seed, int(epoch), num_examples)[offsets[where]]
    return indices


def flip_decisions(positions: np.ndarray, *, seed: int) -> np.ndarray:
    """Whether the example at each global position is flipped horizontally.

    Args:
      positions: int64 array of non-negative positions, any shape.
      seed: the data seed.

    Returns:
      bool array of the same shape; each entry is True with probability 1/2,
      independently of the process count.
    """
    key = stream_key(seed, FLIP_STREAM)
    return (hash_positions(key, positions) >> np.uint64(63)).astype(bool)


def check_process_args(per_process_batch: int, process_index: int, process_count: int) -> None:
    """Raises ValueError unless B > 0, P > 0 and 0 <= p < P (all ints)."""
    for name, value in (
        ("per_process_batch", per_process_batch),
        ("process_index", process_index),
        ("process_count", process_count),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {value!r}.")
    if per_process_batch <= 0:
        raise ValueError(f"per_process_batch must be positive, got {per_process_batch}.")
    if process_count <= 0:
        raise ValueError(f"process_count must be positive, got {process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
