"""The one entry point the training code calls: config -> iterator of per-process batches.

``create_data_iterator`` returns an iterator whose k-th batch is the batch of global step
``start_step + k`` for this process. Each batch is ``batch_fn(step)`` from
`make_batch_fn`, a pure function of (seed, step, process_index, process_count), so a run
restarted at step s sees exactly the batches it would have seen (see `indexing`). grain
runs ``batch_fn`` in reader threads and keeps ``prefetch`` batches ready, so the train
step does not wait for input.

Config fields (``ml_collections.ConfigDict`` or any object with attributes; missing
optional fields take the defaults):

- ``name`` (required): 'digits', 'swiss_roll', 'gaussian_mixture', 'heartbeat' (binary
  sequences of length 20), or any TFDS image data set ('cifar10', 'mnist', ...).
- ``split`` ('train'): for TFDS any split string; for digits 'train' | 'test' | 'all';
  for the toy sets 'train' | 'test' (fresh samples from a stream no training batch uses).
- ``data_dir`` (None): the TFDS data directory; None means TFDS's default.
- ``random_flip`` (False): horizontal flips, images only.
- ``image_size`` (None): digits only: None/8 or larger (see `embedded`); for TFDS sets
  only None or the native size is accepted.
- ``resize`` ('nearest'): digits resizing method, 'nearest' | 'pad' | 'bilinear'.
- ``mock`` (False): TFDS sets only: ``tfds.testing.mock_data`` examples instead of files.
- ``mock_num_examples`` (128): size of the mocked split.
- ``prefetch`` (4): batches prepared ahead by up to 8 reader threads; 0 = read in the
  calling thread.
- toy options: ``noise`` (swiss_roll); ``num_components``, ``radius``, ``component_std``
  (gaussian_mixture); None means the defaults in `toy`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from diffusion_jax.data import embedded, images, indexing, tfds_source, toy

EMBEDDED_NAMES = tfds_source.EMBEDDED_NAMES
MAX_READER_THREADS = 8

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A validated data config (see the module docstring for the fields)."""

    name: str
    split: str = "train"
    data_dir: str | None = None
    random_flip: bool = False
    image_size: int | None = None
    resize: str = "nearest"
    mock: bool = False
    mock_num_examples: int = tfds_source.DEFAULT_MOCK_EXAMPLES
    prefetch: int = 4
    noise: float | None = None
    num_components: int | None = None
    radius: float | None = None
    component_std: float | None = None

    @property
    def is_toy(self) -> bool:
        return self.name in toy.TOY_NAMES

    @property
    def toy_options(self) -> dict[str, Any]:
        return {
            "noise": self.noise,
            "num_components": self.num_components,
            "radius": self.radius,
            "component_std": self.component_std,
        }


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a data set looks like.

    Attributes:
      name: the config name.
      kind: 'image' (batches {'image', 'label'?}) or 'vector' (batches {'x'}).
      shape: per-example shape: (H, W, C) for images, (D,) for vectors.
      num_examples: examples in the split; None for the toy sets (fresh samples).
      num_classes: number of label classes, or None when there are no labels.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    num_examples: int | None
    num_classes: int | None


def _get(config: Any, field: str, default: Any) -> Any:
    if isinstance(config, dict):
        value = config.get(field, default)
    else:
        value = getattr(config, field, default)
    return default if value is None and default is not None else value


def _check_type(field: str, value: Any, types: tuple[type, ...], description: str) -> None:
    if isinstance(value, bool) and bool not in types:
        raise ValueError(f"data.{field} must be {description}, got {value!r}.")
    if not isinstance(value, types):
        raise ValueError(f"data.{field} must be {description}, got {value!r}.")


def parse_data_config(config: Any) -> DataConfig:
    """Reads and validates a data config; raises ValueError naming the bad field."""
    if isinstance(config, DataConfig):
        return config
    name = _get(config, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"data.name must be a non-empty string: one of the embedded data sets "
            f"{list(EMBEDDED_NAMES)} or a TFDS image data set name; got {name!r}."
        )
    values = {f.name: _get(config, f.name, f.default) for f in dataclasses.fields(DataConfig)}
    _check_type("split", values["split"], (str,), "a split name string")
    if values["data_dir"] is not None:
        values["data_dir"] = str(values["data_dir"])
    _check_type("random_flip", values["random_flip"], (bool,), "a bool")
    _check_type("mock", values["mock"], (bool,), "a bool")
    _check_type("prefetch", values["prefetch"], (int,), "an int >= 0")
    _check_type("mock_num_examples", values["mock_num_examples"], (int,), "an int > 0")
    if values["prefetch"] < 0:
        raise ValueError(f"data.prefetch must be an int >= 0, got {values['prefetch']}.")
    if values["mock_num_examples"] <= 0:
        raise ValueError(
            f"data.mock_num_examples must be > 0, got {values['mock_num_examples']}."
        )
    if values["image_size"] is not None:
        _check_type("image_size", values["image_size"], (int,), "None or an int")
    parsed = DataConfig(**values)
    if parsed.is_toy and (parsed.random_flip or parsed.image_size is not None):
        raise ValueError(
            f"data.random_flip and data.image_size apply to images only; {name!r} is 2-D "
            "toy data: set random_flip=False and image_size=None."
        )
    if parsed.is_toy and parsed.split not in toy.TOY_SPLITS:
        raise ValueError(
            f"data.split for the toy data set {name!r} must be one of {list(toy.TOY_SPLITS)} "
            f"('test' draws from a stream no training batch uses); got {parsed.split!r}."
        )
    if parsed.name == "digits":
        embedded.check_image_size(parsed.image_size, parsed.resize)
        embedded.split_slice(parsed.split)
    return parsed


def _check_tfds_image_size(config: DataConfig, shape: tuple[int, int, int]) -> None:
    if config.image_size is not None and (config.image_size, config.image_size) != shape[:2]:
        raise ValueError(
            f"data.image_size={config.image_size} is not supported for TFDS data set "
            f"{config.name!r} (native {shape[0]}x{shape[1]}): only digits can be resized; "
            "set image_size=None."
        )


def dataset_info(data_config: Any) -> DataInfo:
    """Shape, number of examples and classes, from metadata only (no examples read).

    For TFDS sets this needs the data prepared in data_dir (unless mock=True) and raises
    the same errors as `create_data_iterator`.
    """
    config = parse_data_config(data_config)
    if config.is_toy:
        return DataInfo(config.name, "vector", (toy.toy_dim(config.name),), None, None)
    if config.name == "digits":
        shape = embedded.digits_shape(config.image_size)
        count = embedded.digits_num_examples(config.split)
        return DataInfo("digits", "image", shape, count, embedded.NUM_CLASSES)
    info = tfds_source.tfds_image_info(
        config.name,
        split=config.split,
        data_dir=config.data_dir,
        mock=config.mock,
        mock_num_examples=config.mock_num_examples,
    )
    _check_tfds_image_size(config, info.image_shape)
    return DataInfo(config.name, "image", info.image_shape, info.num_examples, info.num_classes)


def open_image_source(data_config: Any) -> images.ImageSource:
    """The image source (digits or TFDS) that a config names."""
    config = parse_data_config(data_config)
    if config.is_toy:
        raise ValueError(f"{config.name!r} is toy vector data, not an image data set.")
    if config.name == "digits":
        return embedded.digits_source(config.split, config.image_size, config.resize)
    source = tfds_source.open_tfds_source(
        config.name,
        split=config.split,
        data_dir=config.data_dir,
        mock=config.mock,
        mock_num_examples=config.mock_num_examples,
    )
    _check_tfds_image_size(config, source.image_shape)
    return source


def make_batch_fn(
    data_config: Any,
    *,
    per_process_batch: int,
    seed: int,
    process_index: int,
    process_count: int,
) -> Callable[[int], Batch]:
    """``batch_fn(step)``: this process's batch of global step ``step``, a pure function.

    Returns:
      for images: ``step -> {'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}``
      ('label' only when the data set has labels); for toy data:
      ``step -> {'x': float32 (B, D)}`` (D = 2, or 20 for heartbeat).
    """
    config = parse_data_config(data_config)
    indexing.check_process_args(per_process_batch, process_index, process_count)
    process_args = dict(
        seed=seed,
        per_process_batch=per_process_batch,
        process_index=process_index,
        process_count=process_count,
    )
    if config.is_toy:
        return toy.make_toy_batch_fn(
            config.name, split=config.split, **process_args, **config.toy_options
        )
    source = open_image_source(config)
    return images.make_image_batch_fn(source, random_flip=config.random_flip, **process_args)


def create_data_iterator(
    data_config: Any,
    *,
    per_process_batch: int,
    seed: int,
    start_step: int,
    process_index: int,
    process_count: int,
) -> Iterator[Batch]:
    """An endless iterator of this process's batches, starting at global step ``start_step``.

    Args:
      data_config: the data config (module docstring).
      per_process_batch: B; the global batch is B * process_count.
      seed: the data seed (shuffling, flips, toy samples).
      start_step: the global step of the first batch (resumption: no replay).
      process_index: this process, ``jax.process_index()``.
      process_count: ``jax.process_count()``.

    Returns:
      a grain iterator; batch k equals ``make_batch_fn(...)(start_step + k)``:
      ``{'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}`` for images
      (no 'label' if the data set has none), ``{'x': float32 (B, D)}`` for toy data.
    """
    if (
        isinstance(start_step, bool)
        or not isinstance(start_step, (int, np.integer))
        or start_step < 0
    ):
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}.")
    config = parse_data_config(data_config)
    batch_fn = make_batch_fn(
        config,
        per_process_batch=per_process_batch,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    # Steps up to here keep every stream position below 2**62, inside int64.
    last_step = 2**62 // (per_process_batch * process_count)
    if start_step >= last_step:
        raise ValueError(f"start_step must be below {last_step}, got {start_step}.")
    num_threads = min(config.prefetch, MAX_READER_THREADS)
    read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=config.prefetch
    )
    dataset = grain.MapDataset.range(int(start_step), last_step).map(batch_fn)
    return iter(dataset.to_iter_dataset(read_options))
