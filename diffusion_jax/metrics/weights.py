"""pytorch-fid's Inception weights: PyTorch state dict -> NumPy .npz -> Flax variables.

The weights are pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (TensorFlow's 2015
Inception graph, ported). Convert them once, on any machine with PyTorch::

    python -m diffusion_jax.metrics.convert pt_inception-2015-12-05-6726825d.pth \
        ~/.cache/diffusion_jax/pt_inception-2015-12-05.npz

`load_inception_variables` reads the .npz with NumPy only (no PyTorch needed).

Layout changes: convolution kernels OIHW -> HWIO, the fc matrix (out, in) -> (in, out);
batch-norm ``weight``/``bias`` -> ``params/.../bn/scale``/``bias`` and
``running_mean``/``running_var`` -> ``batch_stats/.../bn/mean``/``var``.
``num_batches_tracked`` counters are dropped.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import numpy as np

__all__ = ["WEIGHTS_URL", "WEIGHTS_FILENAME", "default_weights_path", "convert_state_dict",
           "save_variables", "unflatten_variables", "load_inception_variables",
           "InceptionWeightsNotFoundError"]

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_FILENAME = "pt_inception-2015-12-05.npz"
_SEP = "/"


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The converted Inception weights are not where they were looked for."""


def default_weights_path() -> pathlib.Path:
    """``$DIFFUSION_JAX_INCEPTION`` if set, else ``~/.cache/diffusion_jax/`` + the .npz name."""
    env = os.environ.get("DIFFUSION_JAX_INCEPTION")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/diffusion_jax").expanduser() / WEIGHTS_FILENAME


def _convert_one(name: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
    """One state-dict entry -> (flat Flax path, array), or None for entries to drop."""
    module, _, leaf = name.rpartition(".")
    path = module.replace(".", _SEP)
    value = np.asarray(value, dtype=np.float32)
    if leaf == "num_batches_tracked":
        return None
    if module.endswith(".conv") and leaf == "weight":
        return f"params{_SEP}{path}{_SEP}kernel", value.transpose(2, 3, 1, 0)
    if module.endswith(".bn"):
        collection, flax_leaf = {
            "weight": ("params", "scale"), "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
        }[leaf]
        return f"{collection}{_SEP}{path}{_SEP}{flax_leaf}", value
    if module == "fc":
        return (f"params{_SEP}fc{_SEP}kernel", value.T) if leaf == "weight" else (
            f"params{_SEP}fc{_SEP}bias", value)
    raise ValueError(f"Unexpected entry {name!r} (shape {value.shape}) in the state dict: "
                     "expected pytorch-fid's fid_inception_v3() weights.")


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid ``fid_inception_v3().state_dict()`` (values as NumPy arrays) -> flat
    ``{'params/Mixed_5b/branch1x1/conv/kernel': array, ...}`` float32 (the .npz layout)."""
    flat = {}
    for name, value in state_dict.items():
        if name.startswith("AuxLogits."):
            continue
        converted = _convert_one(name, value)
        if converted is not None:
            flat[converted[0]] = converted[1]
    return flat


def save_variables(flat: Mapping[str, np.ndarray], path) -> pathlib.Path:
    """Writes the flat arrays to ``path`` (.npz); refuses to overwrite an existing file."""
    path = pathlib.Path(path).expanduser()
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it first or choose another name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **flat)
    return path


def unflatten_variables(flat: Mapping[str, np.ndarray]) -> dict:
    """Flat ``{'params/a/b': array}`` -> nested ``{'params': {'a': {'b': array}}}``."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(_SEP)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _missing_message(path: pathlib.Path) -> str:
    return (
        f"Inception weights not found: {path} does not exist. They are pytorch-fid's FID "
        f"Inception weights (TensorFlow's 2015 Inception), converted to .npz once:\n"
        f"  1. download {WEIGHTS_URL}\n"
        f"  2. on a machine with PyTorch: python -m diffusion_jax.metrics.convert "
        f"pt_inception-2015-12-05-6726825d.pth {path}\n"
        f"Then pass that path, or set DIFFUSION_JAX_INCEPTION to it "
        f"(default: ~/.cache/diffusion_jax/{WEIGHTS_FILENAME})."
    )


def load_inception_variables(path=None) -> dict:
    """Flax variables ``{'params': ..., 'batch_stats': ...}`` of `InceptionV3` from the
    converted .npz (default: `default_weights_path`). NumPy only.

    Raises:
      InceptionWeightsNotFoundError: no file at ``path`` (the message says where to get
        the weights and the convert command).
      ValueError: the file is not a converted Inception (no ``params/fc/kernel``).
    """
    path = pathlib.Path(path).expanduser() if path is not None else default_weights_path()
    if not path.exists():
        raise InceptionWeightsNotFoundError(_missing_message(path))
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
    if f"params{_SEP}fc{_SEP}kernel" not in flat:
        raise ValueError(f"{path} holds no converted Inception weights (no 'params/fc/kernel'"
                         f"; keys: {sorted(flat)[:5]}...). Convert pytorch-fid's .pth with "
                         "python -m diffusion_jax.metrics.convert.")
    return unflatten_variables(flat)
