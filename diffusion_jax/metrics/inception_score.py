"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", Sec. 4):

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y) = E_x p(y|x),

computed as that paper's code and torch-fidelity: softmax of the Inception logits (without
the fc bias: `InceptionV3`'s ``logits_unbiased``), the examples cut into ``splits`` (10)
consecutive parts, one score per part with p(y) its own mean; the mean and the standard
deviation (ddof 0) over the parts.
"""

from __future__ import annotations

import numpy as np
import scipy.special

__all__ = ["inception_score"]


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` parts of (N, classes) logits."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"logits must be (N, classes) with N >= splits = {splits}; got "
                         f"{logits.shape}.")
    log_p = scipy.special.log_softmax(logits, axis=1)
    n, scores = logits.shape[0], []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
