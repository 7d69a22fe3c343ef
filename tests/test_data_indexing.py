"""The global index stream: permutations, process slices, resumption, flips."""

import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import indexing

MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def py_splitmix64(z: int) -> int:
    """SplitMix64's finaliser in Python integers (independent of the NumPy code)."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def py_permutation(seed: int, epoch: int, n: int) -> list[int]:
    key = seed & MASK
    for word in (indexing.PERMUTATION_STREAM, epoch):
        key = py_splitmix64(py_splitmix64((key + word * GAMMA) & MASK))
    hashes = [py_splitmix64((key + (i + 1) * GAMMA) & MASK) for i in range(n)]
    return sorted(range(n), key=lambda i: hashes[i])


@pytest.mark.parametrize("seed,epoch,n", [(0, 0, 10), (0, 1, 10), (7, 3, 257), (-5, 0, 64)])
def test_epoch_permutation_matches_python_reference(seed, epoch, n):
    np.testing.assert_array_equal(
        indexing.epoch_permutation(seed, epoch, n), py_permutation(seed, epoch, n)
    )


def test_epoch_permutation_is_pinned():
    # Exact resumption across releases depends on these orders never changing.
    assert indexing.epoch_permutation(0, 0, 10).tolist() == [3, 5, 2, 8, 9, 7, 4, 1, 6, 0]
    assert indexing.epoch_permutation(0, 1, 10).tolist() == [6, 9, 8, 7, 3, 0, 5, 1, 4, 2]
    assert indexing.epoch_permutation(1, 0, 10).tolist() == [7, 9, 0, 4, 3, 1, 2, 8, 5, 6]


@pytest.mark.parametrize("n", [1, 2, 10, 1000])
def test_each_epoch_is_a_permutation(n):
    for epoch in range(4):
        perm = indexing.epoch_permutation(3, epoch, n)
        assert perm.dtype == np.int64
        np.testing.assert_array_equal(np.sort(perm), np.arange(n))


def test_epochs_and_seeds_give_different_orders():
    n = 1000
    orders = {tuple(indexing.epoch_permutation(s, e, n)) for s in range(3) for e in range(3)}
    assert len(orders) == 9


def test_process_slices_tile_the_global_batch():
    b, count = 5, 4
    for step in (0, 1, 17):
        global_positions = indexing.process_positions(
            step, per_process_batch=b * count, process_index=0, process_count=1
        )
        slices = [
            indexing.process_positions(
                step, per_process_batch=b, process_index=p, process_count=count
            )
            for p in range(count)
        ]
        np.testing.assert_array_equal(np.concatenate(slices), global_positions)
        np.testing.assert_array_equal(global_positions, step * b * count + np.arange(b * count))


def test_stream_visits_every_example_once_per_epoch():
    n, b, count, seed = 24, 3, 2, 11
    steps_per_epoch = n // (b * count)
    for epoch in range(3):
        seen = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            for p in range(count):
                positions = indexing.process_positions(
                    step, per_process_batch=b, process_index=p, process_count=count
                )
                seen.extend(indexing.positions_to_indices(positions, seed=seed, num_examples=n))
        np.testing.assert_array_equal(seen, indexing.epoch_permutation(seed, epoch, n))


def test_batches_straddle_epochs_without_dropping():
    n, seed = 10, 2
    positions = np.arange(7, 14)  # epoch 0 offsets 7..9, epoch 1 offsets 0..3
    expected = np.concatenate(
        [indexing.epoch_permutation(seed, 0, n)[7:], indexing.epoch_permutation(seed, 1, n)[:4]]
    )
    np.testing.assert_array_equal(
        indexing.positions_to_indices(positions, seed=seed, num_examples=n), expected
    )


def test_flip_decisions_are_fair_and_seeded():
    positions = np.arange(20_000)
    flips = indexing.flip_decisions(positions, seed=0)
    assert flips.dtype == np.bool_
    # Binomial(20000, 1/2): std 71; 500 is 7 standard deviations.
    assert abs(int(flips.sum()) - 10_000) < 500
    np.testing.assert_array_equal(flips, indexing.flip_decisions(positions, seed=0))
    assert (flips != indexing.flip_decisions(positions, seed=1)).any()
    # A flip belongs to a position, not to where the position sits in a batch.
    np.testing.assert_array_equal(
        indexing.flip_decisions(positions[100:200], seed=0), flips[100:200]
    )


def _distinct_images_source(n=40, size=4):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
    return data.ArraySource(images, np.arange(n) % 10, num_classes=10)


def _batch_fn(source, *, b, p=0, count=1, seed=0, flip=True):
    return data.make_image_batch_fn(
        source,
        seed=seed,
        per_process_batch=b,
        process_index=p,
        process_count=count,
        random_flip=flip,
    )


def test_image_batches_follow_the_stream_and_flips():
    source = _distinct_images_source()
    batch_fn = _batch_fn(source, b=8, seed=4)
    for step in (0, 6):
        batch = batch_fn(step)
        positions = step * 8 + np.arange(8)
        indices = indexing.positions_to_indices(positions, seed=4, num_examples=len(source))
        flips = indexing.flip_decisions(positions, seed=4)
        expected = source.images[indices].copy()
        expected[flips] = expected[flips][:, :, ::-1]
        np.testing.assert_array_equal(batch["image"], expected.astype(np.float32) / 127.5 - 1)
        np.testing.assert_array_equal(batch["label"], source.labels[indices])
        assert flips.any() and not flips.all()


def test_process_batches_concatenate_to_the_single_process_batch():
    source = _distinct_images_source()
    single = _batch_fn(source, b=12)
    parts = [_batch_fn(source, b=3, p=p, count=4) for p in range(4)]
    for step in (0, 1, 9):
        whole = single(step)
        pieces = [part(step) for part in parts]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in pieces]), whole[key])


def test_different_seeds_give_different_batches():
    source = _distinct_images_source()
    first = _batch_fn(source, b=8, seed=0)(3)
    second = _batch_fn(source, b=8, seed=1)(3)
    assert not np.array_equal(first["image"], second["image"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(per_process_batch=0, process_index=0, process_count=1),
        dict(per_process_batch=2, process_index=2, process_count=2),
        dict(per_process_batch=2, process_index=0, process_count=0),
        dict(per_process_batch=2.0, process_index=0, process_count=1),
    ],
)
def test_bad_process_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="per_process_batch|process_index|process_count"):
        indexing.process_positions(0, **kwargs)
