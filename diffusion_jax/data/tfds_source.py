"""TFDS image data sets read through ``tfds.data_source`` (array_record), no TensorFlow.

Real data must be prepared beforehand: these machines cannot download, and TFDS would
otherwise sit in download retries. `open_tfds_source` therefore checks that the data set
is prepared in ``data_dir`` (and in a random-access file format) *before* asking TFDS for
it, and fails at once with a message that says how to prepare it::

    # on a machine with internet access (TensorFlow is not needed for array_record):
    pip install tensorflow-datasets array_record
    tfds build cifar10 --file_format=array_record --data_dir=/path/to/tensorflow_datasets
    # then copy /path/to/tensorflow_datasets/cifar10 into data_dir on the training machines

With ``mock=True`` the examples come from ``tfds.testing.mock_data``: random uint8 images
of the data set's real feature shape and labels in [0, num_classes), generated from the
builder's code, never from files. The feature specification still comes from TFDS's code
for the data set, so shapes and class counts are the real ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from diffusion_jax.data.images import SequenceSource

DEFAULT_MOCK_EXAMPLES = 128
EMBEDDED_NAMES = ("digits", "swiss_roll", "gaussian_mixture")


@dataclasses.dataclass(frozen=True)
class TfdsImageInfo:
    """What a TFDS image data set looks like, from its metadata (no examples read)."""

    name: str
    image_shape: tuple[int, int, int]
    num_examples: int
    num_classes: int | None
    data_dir: str


def _tfds():
    import tensorflow_datasets as tfds  # imported on first use: toy and digits runs skip it

    return tfds


def prepare_command(name: str, data_dir: str) -> str:
    return f"tfds build {name} --file_format=array_record --data_dir={data_dir}"


def _builder(name: str, data_dir: str | None):
    tfds = _tfds()
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"unknown data set {name!r}: it is not one of the embedded data sets "
            f"{list(EMBEDDED_NAMES)}, and TFDS does not know it either (other names are "
            f"looked up in TFDS; see tfds.list_builders()). TFDS said: "
            f"{str(error).splitlines()[0]}"
        ) from error


def _check_prepared(builder: Any, name: str) -> None:
    """Raises FileNotFoundError / ValueError unless the data is on disk as array_record."""
    tfds = _tfds()
    data_dir = str(builder.data_dir_root)  # the root the user passed, or TFDS's default
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS data set {name!r} is not prepared in data_dir={data_dir!r} (looked for "
            f"{builder.data_path}/dataset_info.json); this pipeline never downloads. "
            f"Prepare it on a machine with internet access with\n  "
            f"{prepare_command(name, data_dir)}\n"
            f"then copy the directory {builder.name}/ into {data_dir} here "
            "(or set data.data_dir to where it is)."
        )
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    available = builder.info.available_file_formats()
    if not available & random_access:
        found = sorted(f.value for f in available) or ["none recorded"]
        raise ValueError(
            f"TFDS data set {name!r} in data_dir={data_dir!r} is prepared as {found}, but "
            "tfds.data_source needs random access: the array_record file format. Rebuild it "
            f"with\n  {prepare_command(name, data_dir)}\n"
            "(this does not need TensorFlow), or convert the existing files."
        )


def _image_features(builder: Any, name: str) -> tuple[tuple[int, int, int], int | None]:
    """(H, W, C) of the 'image' feature and the number of classes of 'label' (or None)."""
    tfds = _tfds()
    features = builder.info.features
    if features is None or "image" not in features:
        keys = sorted(features.keys()) if features is not None else []
        raise ValueError(
            f"TFDS data set {name!r} has no 'image' feature (features: {keys}); only image "
            "data sets with an 'image' feature are supported."
        )
    image = features["image"]
    shape = tuple(image.shape)
    if len(shape) != 3 or any(d is None for d in shape):
        raise ValueError(
            f"TFDS data set {name!r} has images of shape {shape}; only fixed-size (H, W, C) "
            "images are supported (no resizing or cropping is implemented)."
        )
    dtype = np.dtype(image.np_dtype)
    if dtype != np.uint8:
        raise ValueError(
            f"TFDS data set {name!r} has images of dtype {dtype}; expected uint8 "
            "(values in [0, 255])."
        )
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
    return tuple(int(d) for d in shape), num_classes


def _num_examples(builder: Any, name: str, split: str) -> int:
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"TFDS data set {name!r} has no split {split!r}; available splits: "
            f"{sorted(builder.info.splits.keys())}."
        ) from error


class _ItemwiseSequence:
    """Hides ``__getitems__``: tfds 4.9's mocked data source breaks it (the mock sets it
    as an unbound attribute, so calls lack ``self``), while ``__getitem__`` works."""

    def __init__(self, examples: Any):
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> Any:
        return self._examples[index]


def tfds_image_info(
    name: str,
    *,
    split: str,
    data_dir: str | None,
    mock: bool,
    mock_num_examples: int = DEFAULT_MOCK_EXAMPLES,
) -> TfdsImageInfo:
    """Shape, size and class count of a TFDS image split, from metadata only.

    Raises:
      FileNotFoundError / ValueError: as `open_tfds_source` (the same checks).
    """
    builder = _builder(name, data_dir)
    image_shape, num_classes = _image_features(builder, name)
    if mock:
        num_examples = mock_num_examples
    else:
        _check_prepared(builder, name)
        num_examples = _num_examples(builder, name, split)
    return TfdsImageInfo(
        name, image_shape, num_examples, num_classes, str(builder.data_dir_root)
    )


def open_tfds_source(
    name: str,
    *,
    split: str,
    data_dir: str | None,
    mock: bool,
    mock_num_examples: int = DEFAULT_MOCK_EXAMPLES,
) -> SequenceSource:
    """A TFDS image split as a `SequenceSource` of uint8 (H, W, C) images and int labels.

    Args:
      name: a TFDS name ('cifar10', 'mnist', 'name/config:version', ...).
      split: a TFDS split ('train', 'test', 'train[:90%]', ...).
      data_dir: the TFDS data directory; None means TFDS's default (TFDS_DATA_DIR or
        ~/tensorflow_datasets).
      mock: read ``tfds.testing.mock_data`` examples instead of files.
      mock_num_examples: the size of the mocked split.

    Raises:
      ValueError: unknown name, no 'image' feature, variable image shape, non-uint8
        images, unknown split, or data prepared without a random-access file format.
      FileNotFoundError: the data set is not prepared in data_dir.
    """
    tfds = _tfds()
    if mock:
        with tfds.testing.mock_data(
            num_examples=mock_num_examples, policy=tfds.testing.MockPolicy.USE_CODE
        ):
            builder = _builder(name, data_dir)
            image_shape, num_classes = _image_features(builder, name)
            examples = _ItemwiseSequence(builder.as_data_source(split=split))
    else:
        builder = _builder(name, data_dir)
        image_shape, num_classes = _image_features(builder, name)
        _check_prepared(builder, name)
        _num_examples(builder, name, split)  # validates the split name
        examples = builder.as_data_source(split=split)
    source = SequenceSource(
        examples,
        image_shape=image_shape,
        has_labels=num_classes is not None,
        num_classes=num_classes,
        name=name,
    )
    source.gather([0])  # fail now, not in a reader thread, if examples are malformed
    return source
