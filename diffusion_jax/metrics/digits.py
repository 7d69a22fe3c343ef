"""Digits FID: the Frechet distance on the features of a small digits classifier.

An offline sample-quality number for the embedded 8x8 digits (no Inception weights needed).
It is NOT comparable with Inception FID: other network, other features (64-d), other data.
Its units are those of this network's features; only differences between runs of this
project (and against the floor below) mean something.

The network: an MLP on the 64 pixels in [0, 1] (64 -> 128 ReLU -> 64 linear "features"
-> ReLU -> 10 logits), trained deterministically (fixed seed, full-batch AdamW, 400 steps,
one compiled loop: a few seconds on a CPU) on the 1,500 training digits; its accuracy on
the 297 held-out digits is reported with it. Digits FID is `fid.frechet_distance` of
the 64-d features.

The floor (`digits_fid_report`). A model fit to the training digits is measured against
the distribution it was fit to, as CIFAR-10 FID is measured against the training set:
the 1,500 training digits are split at random (a fixed seed) into a reference half and a
comparison half; samples are scored against the reference half, and the floor is the
score of as many digits of the comparison half, drawn from the same distribution as the
reference but not in it (what a model that samples the training distribution exactly
would score, estimation bias included; a model that copies reference digits can score
below it). The held-out digits are the data set's last 297, and its order is not random
(contiguous parts differ far more than random parts, as different writers would), so a
model can score closer to them than the training digits do: that comparison is reported
beside the floor, not as one.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.data import embedded
from diffusion_jax.metrics import fid

__all__ = ["DigitsNet", "apply_digits_net", "DigitsClassifier", "train_digits_classifier",
           "digits_fid", "digits_fid_report", "reference_halves", "FEATURE_DIM"]

FEATURE_DIM = 64
_TRAIN_STEPS = 400
_LR = 5e-3
_WEIGHT_DECAY = 1e-4
_HALVES_SEED = 0


class DigitsNet(nn.Module):
    """(B, 8, 8, 1) in [0, 1] -> {'features': (B, 64), 'logits': (B, 10)}."""

    @nn.compact
    def __call__(self, images):
        x = images.reshape(images.shape[0], -1)
        x = nn.relu(nn.Dense(128)(x))
        features = nn.Dense(FEATURE_DIM)(x)
        logits = nn.Dense(embedded.NUM_CLASSES)(nn.relu(features))
        return {"features": features, "logits": logits}


def apply_digits_net(params, images01) -> dict:
    """`DigitsNet` on (B, 8k, 8k, 1) images in [0, 1] (8k x 8k: averaged over k x k blocks
    first, which undoes the 'nearest' enlargement of the digits data)."""
    return DigitsNet().apply({"params": params}, _to_native(images01))


class DigitsClassifier(NamedTuple):
    params: dict
    held_out_accuracy: float

    def features(self, images01) -> np.ndarray:
        """(N, 64) float64 features of (N, 8k, 8k, 1) images in [0, 1]."""
        out = jax.jit(apply_digits_net)(self.params, jnp.asarray(images01, jnp.float32))
        return np.asarray(out["features"], np.float64)


def _to_native(images):
    b, h, w, c = images.shape
    if c != 1 or h != w or h % embedded.NATIVE_SIZE:
        raise ValueError(f"The digits network takes grey (B, 8k, 8k, 1) images; got "
                         f"{images.shape}.")
    k = h // embedded.NATIVE_SIZE
    return images.reshape(b, embedded.NATIVE_SIZE, k, embedded.NATIVE_SIZE, k, 1).mean((2, 4))


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, 8, 8, 1) in [0, 1], labels) of 'train' (1,500) or 'test' (297)."""
    images, labels = embedded.load_digits_uint8()
    part = slice(0, embedded.NUM_TRAIN) if split == "train" else slice(embedded.NUM_TRAIN, None)
    return images[part].astype(np.float32) / 255.0, np.asarray(labels[part])


@functools.lru_cache(maxsize=1)
def train_digits_classifier(seed: int = 0) -> DigitsClassifier:
    """The classifier trained on the training digits (cached per process): deterministic
    for a given seed on a given backend."""
    x, y = digits_split("train")
    model = DigitsNet()
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
    opt = optax.adamw(_LR, weight_decay=_WEIGHT_DECAY)

    def loss(p):
        logits = model.apply({"params": p}, x)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(_, carry):
        p, s = carry
        updates, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, _TRAIN_STEPS, step, (p, opt.init(p))))(
        params)
    x_test, y_test = digits_split("test")
    predicted = np.argmax(model.apply({"params": params}, x_test)["logits"], axis=-1)
    return DigitsClassifier(params, float(np.mean(predicted == y_test)))


def digits_fid(images_1, images_2, classifier: DigitsClassifier | None = None) -> float:
    """Digits FID between two sets of (N, 8k, 8k, 1) images in [0, 1] (N > 64 each)."""
    classifier = classifier or train_digits_classifier()
    s1 = fid.feature_statistics(classifier.features(images_1))
    s2 = fid.feature_statistics(classifier.features(images_2))
    return fid.frechet_distance(*s1, *s2)


def reference_halves() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training digits' reference half and comparison half (750 each), a
    fixed random split (seed 0): each half draws from every part of the (not randomly
    ordered) training digits."""
    order = np.random.default_rng(_HALVES_SEED).permutation(embedded.NUM_TRAIN)
    half = embedded.NUM_TRAIN // 2
    return np.sort(order[:half]), np.sort(order[half:])


def digits_fid_report(samples01, seed: int = 0, floor_draws: int = 5) -> dict[str, float]:
    """Digits FID of N samples (in [0, 1]) and its floor, both against the reference half
    of the training digits (`reference_halves`):

    - ``digits_fid``: the samples against the reference half;
    - ``digits_fid_floor`` (``_std``): min(N, 750) digits of the comparison half against
      the reference half, the mean (and standard deviation) over ``floor_draws`` random
      subsets drawn with ``seed``: the score of exact samples of the training
      distribution at this N, its estimation bias included (which grows as N falls:
      compare runs at equal N);
    - ``digits_fid_held_out``: the samples against the 297 held-out digits (other writers);
    - ``digits_fid_held_out_train``: min(N, 1,500) training digits against the held-out
      digits (mean over the draws): not a floor, as samples can score below it;
    - ``digits_classifier_accuracy``, ``digits_fid_num_samples``, ``digits_fid_floor_num``.
    """
    classifier = train_digits_classifier()
    samples = classifier.features(samples01)
    n = len(samples)
    train = classifier.features(digits_split("train")[0])
    reference_idx, comparison_idx = reference_halves()
    reference = fid.feature_statistics(train[reference_idx])
    held_out = fid.feature_statistics(classifier.features(digits_split("test")[0]))
    rng = np.random.default_rng(seed)
    n_floor = min(n, len(comparison_idx))
    floors, held_out_train = [], []
    for _ in range(floor_draws):
        subset = train[rng.choice(comparison_idx, n_floor, replace=False)]
        floors.append(fid.frechet_distance(*fid.feature_statistics(subset), *reference))
        subset = train[rng.choice(len(train), min(n, len(train)), replace=False)]
        held_out_train.append(fid.frechet_distance(*fid.feature_statistics(subset), *held_out))
    stats = fid.feature_statistics(samples)
    return {
        "digits_fid": fid.frechet_distance(*stats, *reference),
        "digits_fid_floor": float(np.mean(floors)),
        "digits_fid_floor_std": float(np.std(floors)),
        "digits_fid_held_out": fid.frechet_distance(*stats, *held_out),
        "digits_fid_held_out_train": float(np.mean(held_out_train)),
        "digits_classifier_accuracy": classifier.held_out_accuracy,
        "digits_fid_num_samples": n,
        "digits_fid_floor_num": n_floor,
    }
