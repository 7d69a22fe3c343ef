"""An independent float64 NumPy reference of flow matching on affine paths.

[L23] Lipman, Chen, Ben-Hamu, Nickel, Le 2023, "Flow Matching for Generative Modeling"
(arXiv:2210.02747): the conditional OT path (Eq. 20-23) and the CFM loss (Eq. 9);
[L24] Lipman et al. 2024, "Flow Matching Guide and Code" (arXiv:2412.06264): affine paths
x_t = alpha_t x_1 + sigma_t x_0 (Sec. 4.8), the cosine and VP schedulers, the conversions
between velocity, x_1 (data), x_0 (noise) and score (Sec. 4.8.1-4.8.3). Noise at t = 0,
data at t = 1. Never imported by the library.
"""

from __future__ import annotations

import math

import numpy as np


def path_coeffs(name, t, beta_min=0.1, beta_max=20.0):
    """alpha_t, sigma_t and their t-derivatives (derived by hand; checked by finite
    differences in the tests)."""
    t = np.asarray(t, np.float64)
    if name == "cond_ot":
        return t, 1 - t, np.ones_like(t), -np.ones_like(t)
    if name == "cosine":
        h = math.pi / 2
        return np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t)
    s = 1 - t  # score_sde time; B(s) = int_0^s beta
    big_b = beta_min * s + 0.5 * (beta_max - beta_min) * s**2
    beta = beta_min + s * (beta_max - beta_min)  # dB/ds; dB/dt = -beta
    alpha = np.exp(-0.5 * big_b)
    sigma = np.sqrt(1 - np.exp(-big_b))
    return alpha, sigma, 0.5 * beta * alpha, -0.5 * beta * np.exp(-big_b) / sigma


def _b(c, x):
    return np.asarray(c).reshape(np.shape(c) + (1,) * (x.ndim - np.ndim(c)))


def xt_and_target(name, x1, x0, t):
    a, s, da, ds = (_b(c, x1) for c in path_coeffs(name, t))
    return a * x1 + s * x0, da * x1 + ds * x0


def all_parameterizations(name, x1, x0, t):
    """For x_t built from (x1, x0): the exact velocity, data, noise and score outputs."""
    a, s, da, ds = (_b(c, x1) for c in path_coeffs(name, t))
    return {"velocity": da * x1 + ds * x0, "data": x1, "noise": x0, "score": -x0 / s}


def gaussian_velocity(name, x, t, mu, std):
    """v(x, t) = E[u_t | x_t = x] for x_1 ~ N(mu, std^2 I), x_0 ~ N(0, I):
    alpha' mu + (alpha alpha' std^2 + sigma sigma') / (alpha^2 std^2 + sigma^2) (x - alpha mu)."""
    a, s, da, ds = (_b(c, x) for c in path_coeffs(name, t))
    var = a**2 * std**2 + s**2
    return da * mu + (a * da * std**2 + s * ds) / var * (x - a * mu)


def gaussian_logp(x, mu, std):
    """log N(x; mu, std^2 I) per example, nats."""
    d = x[0].size
    z = ((x - mu) / std).reshape(len(x), -1)
    return -0.5 * d * math.log(2 * math.pi) - d * math.log(std) - 0.5 * (z**2).sum(1)
