"""Frechet distance between Gaussians fitted to features, and the statistics it needs.

FID (Heusel et al. 2017, Eq. 6 of "GANs Trained by a Two Time-Scale Update Rule Converge
to a Local Nash Equilibrium"):

    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

computed as pytorch-fid's ``calculate_frechet_distance``: float64, ``scipy.linalg.sqrtm``
of the product; where that is not finite (a singular product), ``eps`` (1e-6) is added to
both diagonals and the root taken again; a complex root whose diagonal has an imaginary
part above 1e-3 is an error, otherwise its real part is used.

Statistics: ``mu`` is the mean of the features and ``sigma`` their covariance with the
``N - 1`` denominator (``np.cov(features, rowvar=False)``), stored as pytorch-fid's .npz
(keys ``mu`` and ``sigma``). `RunningStatistics` accumulates them batch by batch in float64
(Chan, Golub and LeVeque 1979's pairwise update), so memory does not grow with N.
"""

from __future__ import annotations

import logging
import pathlib
import warnings

import numpy as np
import scipy.linalg

__all__ = ["frechet_distance", "feature_statistics", "RunningStatistics", "save_statistics",
           "load_statistics", "SingularCovarianceWarning"]

_logger = logging.getLogger(__name__)


class SingularCovarianceWarning(UserWarning):
    """Fewer examples than feature dimensions: the covariance is singular."""


def _check_statistics(mu, sigma, what: str):
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{what}: mu must be (D,) and sigma (D, D); got mu {mu.shape} and "
                         f"sigma {sigma.shape}.")
    return mu, sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm``; its LinAlgWarning (a singular matrix: the root may be
    inaccurate) goes to the log, as pytorch-fid lets it print, instead of being raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    for w in caught:
        if issubclass(w.category, scipy.linalg.LinAlgWarning):
            _logger.warning("FID: scipy.linalg.sqrtm: %s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return root


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Eq. 6 above),
    as pytorch-fid. mu: (D,), sigma: (D, D). Returns a float (units of feature^2)."""
    mu1, sigma1 = _check_statistics(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"The statistics have different dimensions: {mu1.shape} and "
                         f"{mu2.shape}.")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        _logger.warning("FID: singular product; adding %g to the diagonal of the covariances.",
                        eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the square root of the covariance product has an "
                             f"imaginary component {np.max(np.abs(covmean.imag)):.3g}.")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _warn_if_singular(n: int, dim: int):
    if n <= dim:
        warnings.warn(f"{n} examples for {dim}-dimensional features: the covariance is "
                      f"singular (rank <= {n - 1}); FID needs N > {dim} (50,000 is the "
                      "convention).", SingularCovarianceWarning, stacklevel=3)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 of (N, D) features: mean and ``np.cov(rowvar=False)``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2; got {features.shape}.")
    _warn_if_singular(*features.shape)
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningStatistics:
    """Mean and covariance of features seen batch by batch, in float64.

    Each batch is centred on its own mean and merged with the totals by Chan et al.'s
    pairwise rule (``M2 = M2_a + M2_b + delta delta^T n_a n_b / n``), which keeps the
    precision of a two-pass computation: memory O(D^2) whatever the number of examples.
    """

    def __init__(self, dim: int):
        self.dim, self.count = dim, 0
        self._mean = np.zeros(dim)
        self._m2 = np.zeros((dim, dim))

    def update(self, features) -> None:
        """Adds (B, D) features."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}); got {x.shape}.")
        if x.shape[0] == 0:
            return
        n_b, mean_b = x.shape[0], x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        n = self.count + n_b
        delta = mean_b - self._mean
        self._m2 += m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self._mean += delta * (n_b / n)
        self.count = n

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma), sigma with the N - 1 denominator as ``np.cov``."""
        if self.count < 2:
            raise ValueError(f"Need at least 2 examples for a covariance; have {self.count}.")
        _warn_if_singular(self.count, self.dim)
        return self._mean.copy(), self._m2 / (self.count - 1)


def save_statistics(path, mu, sigma, **extra) -> pathlib.Path:
    """Writes pytorch-fid's statistics file (``mu``, ``sigma``; ``extra`` arrays beside
    them, which pytorch-fid ignores). Refuses to overwrite an existing file."""
    mu, sigma = _check_statistics(mu, sigma, "statistics")
    path = pathlib.Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it first or choose another name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)
    return path


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid statistics .npz.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file lacks ``mu`` or ``sigma`` (the keys it has are listed), or
        their shapes do not match.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No statistics file {path}. Make one with "
                                "launch.py --mode=fid_stats, or use pytorch-fid's "
                                "--save-stats.")
    with np.load(path) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"{path} is not a FID statistics file: it lacks "
                             f"{' and '.join(missing)} (it has {sorted(f.files)}); expected "
                             "pytorch-fid's .npz with 'mu' (D,) and 'sigma' (D, D).")
        mu, sigma = f["mu"], f["sigma"]
    return _check_statistics(mu, sigma, str(path))
