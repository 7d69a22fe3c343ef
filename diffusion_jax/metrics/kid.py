"""Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", Eq. 2 / App. D).

The unbiased estimate of the squared MMD with the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3`` (d: feature dimension), averaged over random subsets of
``m`` examples from each set, as clean-fid's ``kernel_distance`` and torch-fidelity's
``kid``:

    MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2

The estimate is unbiased: over subsets from one distribution its mean is 0 up to its
standard error (it can be negative).
"""

from __future__ import annotations

import numpy as np

__all__ = ["polynomial_kernel", "mmd2_unbiased", "kernel_inception_distance"]


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, d), (m, d) -> (n, m) float64 ``(x y^T / d + 1)^3``."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (equation above) between (m, d) samples ``x`` and ``y``."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(features_1, features_2, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of `mmd2_unbiased` over ``num_subsets`` pairs of
    subsets of ``min(subset_size, N_1, N_2)`` examples drawn without replacement.

    features_*: (N, d). Returns (mean, std over subsets), in kernel units (KID is often
    reported x 1000). The standard error of the mean is ``std / sqrt(num_subsets)``.
    """
    f1 = np.asarray(features_1, np.float64)
    f2 = np.asarray(features_2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (N, d) with the same d; got {f1.shape} and "
                         f"{f2.shape}.")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 examples; got {m}.")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)],
                            f2[rng.choice(len(f2), m, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))
