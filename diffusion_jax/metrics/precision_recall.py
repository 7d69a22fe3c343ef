"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models", Eq. 1-3).

Each set's manifold is the union of balls around its feature vectors, each ball's radius
the distance to that vector's k-th nearest neighbour in its own set (k = 3, itself not
counted). Precision: the share of generated vectors inside the real manifold; recall: the
share of real vectors inside the generated manifold (``<=`` on the radius, as the
authors' code). Distances are Euclidean, in float64, computed in row blocks (memory
O(block x N)).
"""

from __future__ import annotations

import numpy as np

__all__ = ["knn_radii", "manifold_coverage", "precision_recall"]


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d2, 0.0)


def knn_radii(features, k: int = 3, block: int = 1024) -> np.ndarray:
    """(N,) distance from each vector to its k-th nearest other vector of the same set."""
    f = np.asarray(features, np.float64)
    if f.shape[0] <= k:
        raise ValueError(f"Need more than k = {k} vectors for k-NN radii; got {f.shape[0]}.")
    radii = np.empty(f.shape[0])
    for start in range(0, f.shape[0], block):
        d2 = _squared_distances(f[start:start + block], f)
        # index k of the sorted row: index 0 is the vector itself (distance 0).
        radii[start:start + block] = np.sqrt(np.partition(d2, k, axis=1)[:, k])
    return radii


def manifold_coverage(manifold, radii, queries, block: int = 1024) -> float:
    """Share of ``queries`` (M, d) within ``radii`` of some vector of ``manifold`` (N, d)."""
    manifold = np.asarray(manifold, np.float64)
    queries = np.asarray(queries, np.float64)
    inside = 0
    for start in range(0, queries.shape[0], block):
        d2 = _squared_distances(queries[start:start + block], manifold)
        inside += int((d2 <= radii[None, :] ** 2).any(axis=1).sum())
    return inside / queries.shape[0]


def precision_recall(real, generated, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of ``generated`` against ``real`` features, both (N, d)."""
    real = np.asarray(real, np.float64)
    generated = np.asarray(generated, np.float64)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"features must be (N, d) with the same d; got {real.shape} and "
                         f"{generated.shape}.")
    precision = manifold_coverage(real, knn_radii(real, k), generated)
    recall = manifold_coverage(generated, knn_radii(generated, k), real)
    return precision, recall
