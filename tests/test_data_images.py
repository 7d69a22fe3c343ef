"""Image pipelines: TFDS through mock_data and through real array_record files, the
embedded digits, resumption, process splits and the errors for bad data or configs."""

import itertools
import json
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data
from diffusion_jax.data import indexing


def iterate(cfg, *, per_process_batch, seed, start_step=0, process_index=0, process_count=1):
    return data.create_data_iterator(
        cfg,
        per_process_batch=per_process_batch,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
    )


TINY_SHAPE = (6, 5, 3)
TINY_TRAIN = 13


def tiny_images(num: int, offset: int) -> np.ndarray:
    """The images the tiny builder writes: uint8 (num, 6, 5, 3), all distinct."""
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, (num, *TINY_SHAPE), dtype=np.uint8)


class DiffusionJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    """A tiny image data set written as real array_record files, without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=TINY_SHAPE),
                "label": tfds.features.ClassLabel(num_classes=4),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(TINY_TRAIN, 0),
            "test": self._generate_examples(5, 1),
        }

    def _generate_examples(self, num, offset):
        for i, image in enumerate(tiny_images(num, offset)):
            # PIL images are PNG-encoded by Pillow; NumPy arrays would need TensorFlow.
            yield i, {"image": PIL.Image.fromarray(image), "label": i % 4}


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = DiffusionJaxTinyImages(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return data_dir


def config(**fields):
    defaults = dict(
        name="digits",
        split="train",
        data_dir=None,
        random_flip=False,
        image_size=None,
        mock=False,
        prefetch=2,
    )
    return ml_collections.ConfigDict({**defaults, **fields})


def take(iterator, num):
    return list(itertools.islice(iterator, num))


def check_image_batch(batch, shape, num_classes):
    assert set(batch) == {"image", "label"}
    assert batch["image"].dtype == np.float32 and batch["image"].shape == shape
    assert batch["label"].dtype == np.int32 and batch["label"].shape == shape[:1]
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    # Every value is a uint8 level k / 127.5 - 1.
    levels = (batch["image"].astype(np.float64) + 1.0) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert batch["label"].min() >= 0 and batch["label"].max() < num_classes


# --- TFDS through tfds.testing.mock_data ---------------------------------------------


@pytest.mark.parametrize("name,shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_mocked_tfds_sets(name, shape):
    cfg = config(name=name, mock=True, mock_num_examples=20)
    info = data.dataset_info(cfg)
    assert info == data.DataInfo(name, "image", shape, 20, 10)
    batches = take(iterate(cfg, per_process_batch=8, seed=0), 4)
    for batch in batches:
        check_image_batch(batch, (8, *shape), 10)
    assert batches[0]["image"].std() > 0.3  # random pixels, not a constant image


def test_mocked_flips_are_deterministic():
    flipped = config(name="cifar10", mock=True, mock_num_examples=16, random_flip=True)
    plain = config(name="cifar10", mock=True, mock_num_examples=16, random_flip=False)
    first = take(iterate(flipped, per_process_batch=8, seed=5), 3)
    again = take(iterate(flipped, per_process_batch=8, seed=5), 3)
    unflipped = take(iterate(plain, per_process_batch=8, seed=5), 3)
    for step, (a, b, c) in enumerate(zip(first, again, unflipped, strict=True)):
        np.testing.assert_array_equal(a["image"], b["image"])
        flips = indexing.flip_decisions(step * 8 + np.arange(8), seed=5)
        np.testing.assert_array_equal(a["image"][flips], c["image"][flips][:, :, ::-1])
        np.testing.assert_array_equal(a["image"][~flips], c["image"][~flips])
    assert not np.array_equal(first[0]["image"], unflipped[0]["image"])


def test_mock_is_used_without_any_files(tmp_path):
    cfg = config(name="mnist", mock=True, data_dir=str(tmp_path), mock_num_examples=4)
    batch = next(iterate(cfg, per_process_batch=4, seed=0))
    assert batch["image"].shape == (4, 28, 28, 1)
    assert list(tmp_path.iterdir()) == []


# --- TFDS from real array_record files -------------------------------------------------


def test_real_array_record_files_are_read_exactly(tiny_data_dir):
    cfg = config(
        name="diffusion_jax_tiny_images", data_dir=str(tiny_data_dir), random_flip=True
    )
    info = data.dataset_info(cfg)
    assert info == data.DataInfo(
        "diffusion_jax_tiny_images", "image", TINY_SHAPE, TINY_TRAIN, 4
    )
    generated = tiny_images(TINY_TRAIN, 0)
    # TFDS shuffles records when writing: find which generated image each record holds.
    records = tfds.data_source(
        "diffusion_jax_tiny_images", split="train", data_dir=str(tiny_data_dir)
    )
    order = np.array([_find(generated, records[k]["image"]) for k in range(TINY_TRAIN)])
    assert sorted(order) == list(range(TINY_TRAIN))
    images, labels = generated[order], order % 4
    batches = take(iterate(cfg, per_process_batch=5, seed=3), 4)
    for step, batch in enumerate(batches):  # 20 examples: crosses an epoch boundary
        check_image_batch(batch, (5, *TINY_SHAPE), 4)
        positions = step * 5 + np.arange(5)
        indices = indexing.positions_to_indices(positions, seed=3, num_examples=TINY_TRAIN)
        expected = images[indices].copy()
        flips = indexing.flip_decisions(positions, seed=3)
        expected[flips] = expected[flips][:, :, ::-1]
        np.testing.assert_array_equal(batch["image"], expected / np.float32(127.5) - 1)
        np.testing.assert_array_equal(batch["label"], labels[indices])


def _find(images, image):
    (matches,) = np.nonzero((images == image).all(axis=(1, 2, 3)))
    assert len(matches) == 1
    return matches[0]


def test_unknown_split_lists_the_splits(tiny_data_dir):
    cfg = config(name="diffusion_jax_tiny_images", data_dir=str(tiny_data_dir), split="valid")
    with pytest.raises(ValueError, match=r"no split 'valid'.*'test', 'train'"):
        iterate(cfg, per_process_batch=2, seed=0)


def test_tfrecord_only_data_says_array_record_is_needed(tiny_data_dir, tmp_path):
    shutil.copytree(
        tiny_data_dir / "diffusion_jax_tiny_images", tmp_path / "diffusion_jax_tiny_images"
    )
    info_file = tmp_path / "diffusion_jax_tiny_images" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["fileFormat"] = "tfrecord"
    info_file.write_text(json.dumps(info))
    cfg = config(name="diffusion_jax_tiny_images", data_dir=str(tmp_path))
    with pytest.raises(ValueError) as error:
        iterate(cfg, per_process_batch=2, seed=0)
    message = str(error.value)
    assert "'tfrecord'" in message and "array_record" in message and str(tmp_path) in message
    assert "tfds build diffusion_jax_tiny_images --file_format=array_record" in message


@pytest.mark.parametrize("call", ["iterator", "info"])
def test_unprepared_data_fails_fast_with_instructions(tmp_path, call):
    cfg = config(name="cifar10", data_dir=str(tmp_path))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        if call == "iterator":
            iterate(cfg, per_process_batch=2, seed=0)
        else:
            data.dataset_info(cfg)
    assert time.monotonic() - start < 30  # no download attempts or retries
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in message
    assert list(tmp_path.iterdir()) == []  # nothing was written either


def test_unknown_name_mentions_embedded_sets_and_tfds():
    with pytest.raises(ValueError, match=r"'no_such_images'.*digits.*swiss_roll.*TFDS"):
        data.dataset_info(config(name="no_such_images"))


def test_non_image_tfds_set_is_rejected():
    with pytest.raises(ValueError, match="no 'image' feature"):
        data.dataset_info(config(name="imdb_reviews", mock=True))


def test_image_size_is_digits_only():
    with pytest.raises(ValueError, match="only digits can be resized"):
        data.dataset_info(config(name="cifar10", mock=True, image_size=64))


def test_tensorflow_is_never_imported():
    code = (
        "import sys, diffusion_jax\n"
        "assert 'diffusion_jax.data' not in sys.modules\n"
        "assert 'tensorflow_datasets' not in sys.modules and 'grain' not in sys.modules\n"
        "from diffusion_jax import data\n"
        "cfg = dict(name='cifar10', mock=True, mock_num_examples=4)\n"
        "next(data.create_data_iterator(cfg, per_process_batch=2, seed=0, start_step=0,\n"
        "                               process_index=0, process_count=1))\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- embedded digits ------------------------------------------------------------------


def test_digits_values_and_splits():
    images, labels = data.load_digits_uint8()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(10))
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(np.unique(images).tolist()) <= allowed and images.max() == 255
    train, test, whole = (data.digits_source(s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(whole)) == (1500, 297, 1797)
    # The held-out split is the fixed tail: disjoint from train, together all of them.
    np.testing.assert_array_equal(np.concatenate([train.images, test.images]), whole.images)
    np.testing.assert_array_equal(test.labels, labels[1500:])


def test_digits_batches():
    cfg = config(name="digits", random_flip=True)
    assert data.dataset_info(cfg) == data.DataInfo("digits", "image", (8, 8, 1), 1500, 10)
    batches = take(iterate(cfg, per_process_batch=64, seed=0), 3)
    for batch in batches:
        check_image_batch(batch, (64, 8, 8, 1), 10)
    assert batches[0]["image"].min() == -1.0 and batches[0]["image"].max() == 1.0


def test_digits_image_sizes():
    native = data.digits_source("test").images
    nearest = data.digits_source("test", image_size=32).images
    assert nearest.shape == (297, 32, 32, 1) and nearest.dtype == np.uint8
    np.testing.assert_array_equal(nearest[:, ::4, ::4], native)  # 4x4 constant blocks
    np.testing.assert_array_equal(nearest[:, 3::4, 1::4], native)
    padded = data.digits_source("test", image_size=12, resize="pad").images
    assert padded.shape == (297, 12, 12, 1)
    np.testing.assert_array_equal(padded[:, 2:10, 2:10], native)
    assert padded.sum() == native.sum()  # the border is zero
    bilinear = data.digits_source("test", image_size=16, resize="bilinear").images
    assert bilinear.shape == (297, 16, 16, 1) and bilinear.dtype == np.uint8
    assert abs(bilinear.astype(float).mean() - native.astype(float).mean()) < 3
    assert data.dataset_info(config(name="digits", image_size=16)).shape == (16, 16, 1)


@pytest.mark.parametrize(
    "fields,pattern",
    [
        (dict(image_size=12), "multiple of 8"),
        (dict(image_size=4), ">= 8"),
        (dict(image_size=16, resize="cubic"), "unknown resize"),
        (dict(split="validation"), "unknown split"),
    ],
)
def test_bad_digits_options(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        iterate(config(name="digits", **fields), per_process_batch=2, seed=0)


# --- resumption and processes through the full iterator ------------------------------


def test_starting_at_a_step_equals_iterating_to_it():
    cfg = config(name="digits", random_flip=True)
    from_zero = take(iterate(cfg, per_process_batch=100, seed=1), 20)
    resumed = take(iterate(cfg, per_process_batch=100, seed=1, start_step=17), 3)
    for a, b in zip(from_zero[17:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_two_processes_see_the_one_process_batch_bit_for_bit():
    cfg = config(name="digits", random_flip=True, prefetch=0)
    whole = take(iterate(cfg, per_process_batch=64, seed=2, start_step=20), 3)
    halves = [
        take(
            iterate(
                cfg,
                per_process_batch=32,
                seed=2,
                start_step=20,
                process_index=p,
                process_count=2,
            ),
            3,
        )
        for p in range(2)
    ]
    for step in range(3):
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[step][key]
            )
        assert not np.array_equal(halves[0][step]["image"], halves[1][step]["image"])


def test_seeds_change_the_order():
    cfg = config(name="digits")
    a = next(iterate(cfg, per_process_batch=16, seed=0))
    b = next(iterate(cfg, per_process_batch=16, seed=1))
    assert not np.array_equal(a["label"], b["label"]) or not np.array_equal(
        a["image"], b["image"]
    )


# --- bad data and configs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "images,pattern",
    [
        (np.full((2, 4, 4, 1), 0.5, np.float32), r"float32 with values in \[0.5, 0.5\]"),
        (np.full((2, 4, 4, 1), 300, np.int64), r"int64 with values in \[300, 300\]"),
        (np.full((2, 4, 4, 1), -1, np.int8), r"int8 with values in \[-1, -1\]"),
    ],
)
def test_non_uint8_images_are_rejected(images, pattern):
    with pytest.raises(ValueError, match=pattern) as error:
        data.ArraySource(images)
    assert "expected uint8 images with values in [0, 255]" in str(error.value)
    with pytest.raises(ValueError, match=pattern):
        data.uint8_to_float(images)


def test_bad_shapes_and_labels_are_rejected():
    images = np.zeros((3, 4, 4, 1), np.uint8)
    with pytest.raises(ValueError, match=r"NHWC.*\(4, 4, 1\)"):
        data.ArraySource(images[0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), found \[0, 5\]"):
        data.ArraySource(images, [0, 1, 5], num_classes=2)
    with pytest.raises(ValueError, match="labels must be integers, found dtype float64"):
        data.ArraySource(images, [0.0, 1.0, 1.0])


def test_sequence_source_checks_each_example():
    good = {"image": np.zeros((4, 4, 1), np.uint8), "label": 1}
    wrong_dtype = {"image": np.zeros((4, 4, 1), np.float32), "label": 1}
    wrong_shape = {"image": np.zeros((4, 5, 1), np.uint8), "label": 1}
    for bad, pattern in [(wrong_dtype, "found dtype float32"), (wrong_shape, r"\(4, 5, 1\)")]:
        source = data.SequenceSource(
            [good, bad], image_shape=(4, 4, 1), has_labels=True, num_classes=2
        )
        source.gather([0])
        with pytest.raises(ValueError, match=pattern):
            source.gather([0, 1])


def test_uint8_to_float_endpoints():
    values = data.uint8_to_float(np.array([0, 1, 127, 128, 254, 255], np.uint8))
    assert values.dtype == np.float32
    np.testing.assert_allclose(
        values, np.array([0, 1, 127, 128, 254, 255]) / 127.5 - 1, rtol=0, atol=1e-7
    )
    assert values[0] == -1.0 and values[-1] == 1.0


@pytest.mark.parametrize(
    "fields,pattern",
    [
        (dict(name=""), "data.name must be a non-empty string"),
        (dict(random_flip="yes"), "data.random_flip must be a bool"),
        (dict(prefetch=-1), "data.prefetch must be an int >= 0"),
        (dict(image_size=8.0), "data.image_size must be None or an int"),
        (dict(name="swiss_roll", random_flip=True), "apply to images only"),
    ],
)
def test_bad_config_fields(fields, pattern):
    with pytest.raises(ValueError, match=pattern):
        data.parse_data_config(config(**fields))


def test_plain_objects_and_missing_optional_fields_work():
    class Minimal:
        name = "digits"

    parsed = data.parse_data_config(Minimal())
    assert parsed == data.DataConfig(name="digits")
    batch = next(iterate(Minimal(), per_process_batch=4, seed=0))
    assert batch["image"].shape == (4, 8, 8, 1)
