"""Input pipelines: TFDS image sets (tfds.data_source + grain), embedded digits, 2-D toys.

The training code needs two functions::

    info = data.dataset_info(config.data)          # shape, num_examples, num_classes
    batches = data.create_data_iterator(
        config.data, per_process_batch=B, seed=config.seed, start_step=step,
        process_index=jax.process_index(), process_count=jax.process_count())

Images come out as ``{'image': float32 (B, H, W, C) in [-1, 1], 'label': int32 (B,)}``,
toy data as ``{'x': float32 (B, D)}`` (D = 2; 20 for the binary heartbeat). The batch of
global step s is a pure function of (seed, s, process_index, process_count) (see
`indexing`), so resuming at step s needs nothing but s. This package does not import
TensorFlow, and ``import diffusion_jax`` does not import it.
"""

from diffusion_jax.data.embedded import digits_source, load_digits_uint8
from diffusion_jax.data.images import (
    ArraySource,
    SequenceSource,
    check_uint8_images,
    make_image_batch_fn,
    uint8_to_float,
)
from diffusion_jax.data.indexing import (
    epoch_permutation,
    flip_decisions,
    positions_to_indices,
    process_positions,
)
from diffusion_jax.data.pipeline import (
    EMBEDDED_NAMES,
    DataConfig,
    DataInfo,
    create_data_iterator,
    dataset_info,
    make_batch_fn,
    open_image_source,
    parse_data_config,
)
from diffusion_jax.data.tfds_source import open_tfds_source, prepare_command
from diffusion_jax.data.toy import (
    GaussianMixture,
    ring_mixture,
    sample_heartbeat,
    sample_swiss_roll,
    toy_dim,
    toy_heldout_set,
    toy_mixture,
)

__all__ = [
    "EMBEDDED_NAMES",
    "ArraySource",
    "DataConfig",
    "DataInfo",
    "GaussianMixture",
    "SequenceSource",
    "check_uint8_images",
    "create_data_iterator",
    "dataset_info",
    "digits_source",
    "epoch_permutation",
    "flip_decisions",
    "load_digits_uint8",
    "make_batch_fn",
    "make_image_batch_fn",
    "open_image_source",
    "open_tfds_source",
    "parse_data_config",
    "positions_to_indices",
    "prepare_command",
    "process_positions",
    "ring_mixture",
    "sample_heartbeat",
    "sample_swiss_roll",
    "toy_dim",
    "toy_heldout_set",
    "toy_mixture",
    "uint8_to_float",
]
