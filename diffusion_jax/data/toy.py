"""Toy data: the swiss roll, a Gaussian mixture with a known density, binary heartbeats.

Sohl-Dickstein et al. (2015), Appendix D.1.1, trains on a "swiss roll" without saying
which one. The generator used here, exactly:

    t   ~ U(1.5 pi, 4.5 pi)                        (sklearn's make_swiss_roll range)
    r   = (t cos t, t sin t)                        (a spiral of 1.5 turns)
    z   = (r - mu) / sigma                          (per coordinate; mu, sigma are the exact
                                                     mean and std of r under t, computed by
                                                     128-point Gauss-Legendre quadrature)
    x   = (z + noise * eps) / sqrt(1 + noise**2),   eps ~ N(0, I_2)

so each coordinate of x has mean 0 and variance exactly 1 for any ``noise`` (default
0.05 before the final rescaling, i.e. about 1/20 of the roll's spread).

The Gaussian mixture has equal weights and isotropic components whose means sit evenly on
a circle: mean k = radius * (cos(2 pi k / K), sin(2 pi k / K)). Defaults K = 8,
radius = 1.4, std = 0.1: the per-coordinate variance is radius**2 / 2 + std**2 = 0.99.
Its exact log-density (`GaussianMixture.log_prob`) scores model samples.

The binary heartbeat (Sohl-Dickstein et al. 2015, Appendix D.1.2) is a sequence of
HEARTBEAT_LENGTH = 20 bins with a 1 in every HEARTBEAT_PERIOD = 5th bin and 0 elsewhere;
the phase (the first 1) is uniform over the first five bins:

    phase ~ U{0, ..., 4},    x_k = 1 if k % 5 == phase else 0,   k = 0..19

so there are 5 equally likely sequences (log2(1/5) = -2.322 bits per sequence is the true
log-likelihood), each with exactly 4 ones: every bin is on with probability 0.2, the mean
activity the paper's binomial prior uses. Returned as float32 {0, 1} arrays (B, 20).

Training batches are fresh samples each step: the global batch of step s is drawn from a
NumPy generator seeded with (seed, stream, s), and process p takes its contiguous slice,
so the global batch does not depend on the process count. The held-out set is drawn
from a separate generator stream, so it is not any step's training batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from diffusion_jax.data import indexing

SWISS_ROLL_T_RANGE = (1.5 * np.pi, 4.5 * np.pi)
SWISS_ROLL_NOISE = 0.05
MIXTURE_COMPONENTS = 8
MIXTURE_RADIUS = 1.4
MIXTURE_STD = 0.1
HEARTBEAT_LENGTH = 20
HEARTBEAT_PERIOD = 5
TOY_NAMES = ("swiss_roll", "gaussian_mixture", "heartbeat")

_TRAIN_STREAM = 11
_HELDOUT_STREAM = 12
_TEST_BATCH_STREAM = 13
TOY_SPLITS = ("train", "test")
_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=1)
def swiss_roll_moments() -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and std of r = (t cos t, t sin t) for t ~ U(1.5 pi, 4.5 pi).

    Returns:
      mean: float64 (2,); std: float64 (2,). Gauss-Legendre quadrature with 128 nodes
      (the integrands are smooth and span 1.5 periods, so this is exact to rounding).
    """
    low, high = SWISS_ROLL_T_RANGE
    nodes, weights = np.polynomial.legendre.leggauss(128)
    t = 0.5 * (high - low) * nodes + 0.5 * (high + low)
    w = 0.5 * weights  # weights of the uniform density on [low, high]: sum(w) == 1
    r = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1)
    mean = w @ r
    var = w @ (r - mean) ** 2
    return mean, np.sqrt(var)


def sample_swiss_roll(
    rng: np.random.Generator, num: int, *, noise: float = SWISS_ROLL_NOISE
) -> np.ndarray:
    """Swiss roll samples (generator in the module docstring).

    Args:
      rng: NumPy generator.
      num: number of samples.
      noise: std of the Gaussian noise added to the standardised roll (before the final
        rescaling by 1 / sqrt(1 + noise**2)); >= 0.

    Returns:
      float32 (num, 2), each coordinate with mean 0 and variance 1.
    """
    if noise < 0:
        raise ValueError(f"swiss_roll: noise must be >= 0, got {noise}.")
    mean, std = swiss_roll_moments()
    t = rng.uniform(*SWISS_ROLL_T_RANGE, size=num)
    r = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1)
    z = (r - mean) / std
    x = (z + noise * rng.standard_normal((num, 2))) / np.sqrt(1.0 + noise**2)
    return x.astype(np.float32)


def sample_heartbeat(rng: np.random.Generator, num: int) -> np.ndarray:
    """Binary heartbeats (module docstring): float32 (num, 20) of 0s and 1s.

    A 1 every HEARTBEAT_PERIOD bins, the phase uniform over the first HEARTBEAT_PERIOD.
    """
    phase = rng.integers(0, HEARTBEAT_PERIOD, size=num)
    bins = np.arange(HEARTBEAT_LENGTH)
    return (bins[None, :] % HEARTBEAT_PERIOD == phase[:, None]).astype(np.float32)


def toy_dim(name: str) -> int:
    """The length D of a toy data set's vectors: 2 for the 2-D sets, 20 for heartbeat."""
    if name not in TOY_NAMES:
        raise ValueError(f"unknown toy data set {name!r}; valid: {list(TOY_NAMES)}.")
    return HEARTBEAT_LENGTH if name == "heartbeat" else 2


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """A mixture of isotropic Gaussians in D dimensions.

    Attributes:
      means: float64 (K, D).
      stds: float64 (K,), > 0.
      weights: float64 (K,), >= 0, summing to 1.
    """

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    def sample(self, rng: np.random.Generator, num: int) -> np.ndarray:
        """float32 (num, D) samples."""
        components = rng.choice(len(self.weights), size=num, p=self.weights)
        eps = rng.standard_normal((num, self.means.shape[1]))
        x = self.means[components] + self.stds[components, None] * eps
        return x.astype(np.float32)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """Exact log-density in nats.

        log p(x) = logsumexp_k [log w_k - |x - m_k|^2 / (2 s_k^2) - D log(s_k) - D/2 log(2 pi)]

        Args:
          x: array (..., D), any float dtype (computed in float64).

        Returns:
          float64 (...,), nats per example (not per dimension).
        """
        x = np.asarray(x, dtype=np.float64)
        dim = self.means.shape[1]
        if x.shape[-1] != dim:
            raise ValueError(f"log_prob: x has shape {x.shape}; last axis must be {dim}.")
        sq_dist = np.sum((x[..., None, :] - self.means) ** 2, axis=-1)  # (..., K)
        with np.errstate(divide="ignore"):
            log_weights = np.log(self.weights)
        terms = (
            log_weights
            - sq_dist / (2.0 * self.stds**2)
            - dim * np.log(self.stds)
            - 0.5 * dim * np.log(2.0 * np.pi)
        )
        peak = np.max(terms, axis=-1, keepdims=True)
        return peak[..., 0] + np.log(np.sum(np.exp(terms - peak), axis=-1))


def ring_mixture(
    num_components: int = MIXTURE_COMPONENTS,
    radius: float = MIXTURE_RADIUS,
    std: float = MIXTURE_STD,
) -> GaussianMixture:
    """K equal-weight 2-D Gaussians with means evenly on a circle (module docstring)."""
    if num_components < 1 or radius < 0 or std <= 0:
        raise ValueError(
            "gaussian_mixture: need num_components >= 1, radius >= 0, std > 0; got "
            f"{num_components}, {radius}, {std}."
        )
    angles = 2.0 * np.pi * np.arange(num_components) / num_components
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    stds = np.full(num_components, float(std))
    weights = np.full(num_components, 1.0 / num_components)
    return GaussianMixture(means=means, stds=stds, weights=weights)


def toy_sampler(name: str, **options) -> Callable[[np.random.Generator, int], np.ndarray]:
    """``sample(rng, num) -> float32 (num, D)`` for a toy data set (D from `toy_dim`).

    Args:
      name: 'swiss_roll' (option: noise), 'gaussian_mixture' (options:
        num_components, radius, component_std) or 'heartbeat' (no options).
    """
    if name == "swiss_roll":
        noise = options.get("noise")
        noise = SWISS_ROLL_NOISE if noise is None else float(noise)
        return lambda rng, num: sample_swiss_roll(rng, num, noise=noise)
    if name == "gaussian_mixture":
        return toy_mixture(**options).sample
    if name == "heartbeat":
        return sample_heartbeat
    raise ValueError(f"unknown toy data set {name!r}; valid: {list(TOY_NAMES)}.")


def toy_mixture(**options) -> GaussianMixture:
    """The `ring_mixture` that config options (num_components, radius, component_std) name."""
    defaults = {
        "num_components": MIXTURE_COMPONENTS,
        "radius": MIXTURE_RADIUS,
        "component_std": MIXTURE_STD,
    }
    values = {k: defaults[k] if options.get(k) is None else options[k] for k in defaults}
    return ring_mixture(
        int(values["num_components"]), float(values["radius"]), float(values["component_std"])
    )


def _rng(seed: int, stream: int, counter: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & _MASK64, stream, int(counter)])


def make_toy_batch_fn(
    name: str,
    *,
    seed: int,
    per_process_batch: int,
    process_index: int,
    process_count: int,
    split: str = "train",
    **options,
) -> Callable[[int], dict[str, np.ndarray]]:
    """``batch_fn(step) -> {'x': float32 (B, D)}``, a pure function of (seed, step, p, P).

    The global batch of B * P samples is drawn from a generator seeded with (seed, split,
    step); process p returns rows [p * B, (p + 1) * B). ``split='train'`` gives the
    training batches, ``split='test'`` batches from another stream, never a training batch
    (what ``--mode=eval`` scores).
    """
    indexing.check_process_args(per_process_batch, process_index, process_count)
    if split not in TOY_SPLITS:
        raise ValueError(
            f"toy data set {name!r}: split must be one of {list(TOY_SPLITS)} ('test' draws "
            f"from a stream no training batch uses); got {split!r}."
        )
    stream = _TRAIN_STREAM if split == "train" else _TEST_BATCH_STREAM
    sample = toy_sampler(name, **options)
    start = process_index * per_process_batch

    def batch_fn(step: int) -> dict[str, np.ndarray]:
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}.")
        x = sample(_rng(seed, stream, step), per_process_batch * process_count)
        return {"x": x[start : start + per_process_batch]}

    return batch_fn


def toy_heldout_set(
    name: str, num_examples: int = 10_000, *, seed: int = 0, **options
) -> np.ndarray:
    """A fixed held-out set: float32 (num_examples, D), the same for the same arguments.

    Drawn from a stream the training batches never use.
    """
    return toy_sampler(name, **options)(_rng(seed, _HELDOUT_STREAM, 0), num_examples)
