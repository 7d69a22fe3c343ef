"""scikit-learn's handwritten digits: a real image data set that needs no download.

``sklearn.datasets.load_digits`` ships 1797 grey 8x8 images with values 0..16 (UCI
optical digits) and labels 0..9. They are mapped to uint8 by ``round(v * 255 / 16)``, so
every value lands on one of 17 levels in [0, 255], and exposed as an `ArraySource` of
shape (N, H, W, 1).

Splits are fixed, not shuffled: 'train' is the first 1500 images, 'test' the last 297,
'all' all 1797.

Sizes: the DDPM U-Net halves the resolution ``levels - 1`` times, so H and W must be
divisible by ``2**(levels - 1)``; 8 allows at most 4 levels. Larger ``image_size`` values
are made by one of (``resize``):

- 'nearest' (default): pixel replication by an integer factor (image_size = 8k). Every
  pixel keeps one of the 17 original values, so the data stays exactly discrete and the
  discretised decoder likelihood of the model means what it says; the digits just look
  blocky.
- 'pad': the 8x8 image centred on a zero (black, the digits' own background) canvas,
  offset ``(image_size - 8) // 2``; any image_size >= 8. Pixels are untouched.
- 'bilinear': Pillow's bilinear resize to any size >= 8; smooth digits, but new pixel
  values between the 17 levels appear.
"""

from __future__ import annotations

import functools

import numpy as np

from diffusion_jax.data.images import ArraySource

NATIVE_SIZE = 8
NUM_DIGITS = 1797
NUM_TEST = 297
NUM_TRAIN = NUM_DIGITS - NUM_TEST
NUM_CLASSES = 10
SPLITS = ("train", "test", "all")
RESIZE_METHODS = ("nearest", "pad", "bilinear")


@functools.lru_cache(maxsize=1)
def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits.

    Returns:
      images: uint8 (1797, 8, 8, 1), values ``round(v * 255 / 16)`` in [0, 255].
      labels: int32 (1797,), values in [0, 10).
      Both read-only (they are cached).
    """
    from sklearn.datasets import load_digits  # only this data set needs scikit-learn

    digits = load_digits()
    values = np.asarray(digits.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    images = np.round(values * 255.0 / 16.0).astype(np.uint8)[..., None]
    labels = np.asarray(digits.target, dtype=np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_slice(split: str) -> slice:
    """The fixed slice of the 1797 digits that forms ``split`` ('train', 'test', 'all')."""
    slices = {
        "train": slice(0, NUM_TRAIN),
        "test": slice(NUM_TRAIN, NUM_DIGITS),
        "all": slice(0, NUM_DIGITS),
    }
    if split not in slices:
        raise ValueError(f"digits: unknown split {split!r}; valid splits are {list(SPLITS)}.")
    return slices[split]


def resize_digits(
    images: np.ndarray, image_size: int | None, resize: str = "nearest"
) -> np.ndarray:
    """Brings 8x8 digits to ``image_size`` x ``image_size`` (see the module docstring).

    Args:
      images: uint8 (N, 8, 8, 1).
      image_size: None or 8 (unchanged), or a larger size.
      resize: 'nearest' (image_size a multiple of 8), 'pad' or 'bilinear'.

    Returns:
      uint8 (N, image_size, image_size, 1).
    """
    check_image_size(image_size, resize)
    if image_size is None or image_size == NATIVE_SIZE:
        return images
    if resize == "nearest":
        factor = image_size // NATIVE_SIZE
        return np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)
    if resize == "pad":
        before = (image_size - NATIVE_SIZE) // 2
        after = image_size - NATIVE_SIZE - before
        return np.pad(images, ((0, 0), (before, after), (before, after), (0, 0)))
    return _bilinear(images, image_size)


def _bilinear(images: np.ndarray, image_size: int) -> np.ndarray:
    from PIL import Image

    resized = [
        np.asarray(
            Image.fromarray(image[..., 0]).resize((image_size, image_size), Image.BILINEAR)
        )
        for image in images
    ]
    return np.stack(resized)[..., None].astype(np.uint8)


def check_image_size(image_size: int | None, resize: str) -> None:
    """Raises ValueError unless (image_size, resize) is a valid combination."""
    if resize not in RESIZE_METHODS:
        raise ValueError(f"digits: unknown resize {resize!r}; valid: {list(RESIZE_METHODS)}.")
    if image_size is None:
        return
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size < NATIVE_SIZE
    ):
        raise ValueError(
            f"digits: image_size must be None or an int >= {NATIVE_SIZE}, got {image_size!r}."
        )
    if resize == "nearest" and image_size % NATIVE_SIZE:
        raise ValueError(
            f"digits: resize='nearest' needs image_size to be a multiple of {NATIVE_SIZE}, "
            f"got {image_size}; use resize='pad' or 'bilinear' for other sizes."
        )


def digits_source(
    split: str = "train", image_size: int | None = None, resize: str = "nearest"
) -> ArraySource:
    """The digits as an `ArraySource`: uint8 (N, S, S, 1) images and int32 labels in [0, 10).

    Args:
      split: 'train' (first 1500), 'test' (last 297) or 'all' (1797).
      image_size: None/8 for native 8x8, or a larger size S (see `resize_digits`).
      resize: 'nearest', 'pad' or 'bilinear'.
    """
    images, labels = load_digits_uint8()
    where = split_slice(split)
    images = resize_digits(images[where], image_size, resize)
    return ArraySource(images, labels[where], num_classes=NUM_CLASSES, name="digits")


def digits_shape(image_size: int | None) -> tuple[int, int, int]:
    """(S, S, 1) for ``image_size`` S (None means 8), without loading the data."""
    check_image_size(image_size, "pad")
    size = NATIVE_SIZE if image_size is None else int(image_size)
    return (size, size, 1)


def digits_num_examples(split: str) -> int:
    """The number of digits in ``split``, without loading the data."""
    return len(range(NUM_DIGITS)[split_slice(split)])
