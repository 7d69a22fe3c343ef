"""Image sources, validation and the batch function for global step ``s``.

A *source* is a random-access collection of examples that can gather a batch:

- `ArraySource`: uint8 images held in memory (the embedded digits, user arrays);
- `SequenceSource`: any sequence of ``{'image': uint8 (H, W, C), 'label': int}`` dicts,
  such as a ``tfds.data_source`` (array_record files, read on demand).

`make_image_batch_fn` turns a source into ``batch_fn(step) -> batch``, a pure function of
``(seed, step, process_index, process_count)`` built on `indexing`; the pipeline runs it
in grain's reader threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from diffusion_jax.data import indexing

Batch = dict[str, np.ndarray]


class ImageSource(Protocol):
    """What the batch function needs from a source of images."""

    image_shape: tuple[int, int, int]
    has_labels: bool

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray) -> Batch:
        """uint8 images (B, H, W, C) and, if `has_labels`, int32 labels (B,)."""
        ...


def check_uint8_images(images: Any, *, what: str = "images") -> np.ndarray:
    """Returns ``images`` as a uint8 NumPy array, or raises a ValueError saying why not.

    Only uint8 is accepted: values are then in [0, 255] by construction, and the
    conversion to [-1, 1] is exact at both ends. Floats in [0, 1] or [0, 255], int64
    pixel counts and the like are rejected with their dtype and value range, rather than
    silently rescaled by a guess.

    Args:
      images: array-like of images, (..., H, W, C).
      what: a name for the error message (e.g. the data set).

    Returns:
      the same data as a uint8 ``np.ndarray``.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8:
        value_range = _describe_range(array)
        raise ValueError(
            f"{what}: expected uint8 images with values in [0, 255], found dtype "
            f"{array.dtype} with {value_range}. Convert them yourself, e.g. "
            "np.round(x * 255).astype(np.uint8) for floats in [0, 1]."
        )
    return array


def _describe_range(array: np.ndarray) -> str:
    if array.size == 0:
        return "no values"
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        return "non-numeric values"
    return f"values in [{array.min()}, {array.max()}]"


def check_labels(
    labels: Any, *, num_examples: int, num_classes: int | None, what: str
) -> np.ndarray:
    """Returns labels as int32 (N,), or raises ValueError naming the dtype/range found.

    Args:
      labels: array-like of shape (N,), integer dtype.
      num_examples: N.
      num_classes: if given, labels must lie in [0, num_classes).
      what: a name for the error message.
    """
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, found dtype {array.dtype}.")
    if array.shape != (num_examples,):
        raise ValueError(
            f"{what}: labels must have shape ({num_examples},), found {array.shape}."
        )
    upper = num_classes if num_classes is not None else np.iinfo(np.int32).max
    if array.size and (array.min() < 0 or array.max() >= upper):
        raise ValueError(
            f"{what}: labels must lie in [0, {upper}), found [{array.min()}, {array.max()}]."
        )
    return array.astype(np.int32)


def uint8_to_float(images: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to float32 in [-1, 1] (DDPM's convention: x / 127.5 - 1).

    Args:
      images: uint8 array, any shape.

    Returns:
      float32 array of the same shape; 0 -> -1.0 and 255 -> 1.0 exactly.
    """
    images = check_uint8_images(images)
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class ArraySource:
    """uint8 images in memory, with optional labels.

    Args:
      images: uint8 array of shape (N, H, W, C).
      labels: optional integer array of shape (N,).
      num_classes: optional number of classes; labels must lie in [0, num_classes).
      name: a name for error messages.
    """

    def __init__(
        self,
        images: Any,
        labels: Any = None,
        *,
        num_classes: int | None = None,
        name: str = "images",
    ):
        images = check_uint8_images(images, what=name)
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(
                f"{name}: expected a non-empty NHWC array (N, H, W, C), found shape "
                f"{images.shape}."
            )
        self.images = images
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        self.has_labels = labels is not None
        self.labels = (
            check_labels(labels, num_examples=len(images), num_classes=num_classes, what=name)
            if self.has_labels
            else None
        )
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.images)

    def gather(self, indices: np.ndarray) -> Batch:
        batch = {"image": self.images[indices]}
        if self.has_labels:
            batch["label"] = self.labels[indices]
        return batch


class SequenceSource:
    """A random-access sequence of example dicts, e.g. a ``tfds.data_source``.

    Each example is ``{'image': uint8 (H, W, C), 'label': int, ...}``; other keys are
    ignored. Batches are read with ``__getitems__`` when the sequence has it (array_record
    reads a batch of records at once).

    Args:
      examples: the sequence (``__len__`` and ``__getitem__``).
      image_shape: (H, W, C) every image must have.
      has_labels: whether examples carry a 'label'.
      num_classes: labels must lie in [0, num_classes) when given.
      name: a name for error messages (the data set).
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        *,
        image_shape: tuple[int, int, int],
        has_labels: bool,
        num_classes: int | None = None,
        name: str = "images",
    ):
        self.examples = examples
        self.image_shape = tuple(int(d) for d in image_shape)
        self.has_labels = has_labels
        self.num_classes = num_classes
        self.name = name
        if len(examples) == 0:
            raise ValueError(f"{name}: the data source is empty.")

    def __len__(self) -> int:
        return len(self.examples)

    def _read(self, indices: np.ndarray) -> list[dict[str, Any]]:
        keys = [int(i) for i in indices]
        getitems = getattr(self.examples, "__getitems__", None)
        if getitems is not None:
            return list(getitems(keys))
        return [self.examples[key] for key in keys]

    def gather(self, indices: np.ndarray) -> Batch:
        records = self._read(indices)
        if "image" not in records[0]:
            raise ValueError(
                f"{self.name}: examples have no 'image' feature; found keys "
                f"{sorted(records[0])}."
            )
        images = [check_uint8_images(r["image"], what=self.name) for r in records]
        for image in images:
            if image.shape != self.image_shape:
                raise ValueError(
                    f"{self.name}: expected images of shape {self.image_shape}, found "
                    f"{image.shape}."
                )
        batch = {"image": np.stack(images)}
        if self.has_labels:
            labels = np.array([r["label"] for r in records])
            batch["label"] = check_labels(
                labels, num_examples=len(records), num_classes=self.num_classes, what=self.name
            )
        return batch


def make_image_batch_fn(
    source: ImageSource,
    *,
    seed: int,
    per_process_batch: int,
    process_index: int,
    process_count: int,
    random_flip: bool,
) -> Callable[[int], Batch]:
    """The batch of global step ``s`` for one process, as a pure function of ``s``.

    Args:
      source: an `ImageSource` with N examples.
      seed: the data seed: sets the epoch permutations and the flips.
      per_process_batch: B, examples per process per step.
      process_index: p in [0, process_count).
      process_count: P; the global batch is B * P.
      random_flip: flip each image horizontally with probability 1/2, decided by
        ``indexing.flip_decisions(seed, global position)``.

    Returns:
      ``batch_fn(step) -> {'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}``
      ('label' only if the source has labels).
    """
    indexing.check_process_args(per_process_batch, process_index, process_count)
    num_examples = len(source)

    def batch_fn(step: int) -> Batch:
        positions = indexing.process_positions(
            step,
            per_process_batch=per_process_batch,
            process_index=process_index,
            process_count=process_count,
        )
        indices = indexing.positions_to_indices(positions, seed=seed, num_examples=num_examples)
        raw = source.gather(indices)
        images = check_uint8_images(raw["image"])
        if random_flip:
            flips = indexing.flip_decisions(positions, seed=seed)
            images = np.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
        batch = {"image": uint8_to_float(images)}
        if "label" in raw:
            batch["label"] = np.asarray(raw["label"], dtype=np.int32)
        return batch

    return batch_fn
