"""An independent float64 NumPy reference of the score-SDE math.

Written from the paper's formulas (and score_sde's stated conventions), never from the
library:

* [S21] Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021, "Score-Based Generative
  Modeling through Stochastic Differential Equations" (arXiv:2011.13456): the VE SDE
  (Eq. 9), VP SDE (Eq. 11), sub-VP SDE (Eq. 12), their perturbation kernels (Eq. 29,
  Appendix B), the reverse SDE (Eq. 6), the probability-flow ODE (Eq. 13), the DDPM and
  SMLD discretizations (Eqs. 7, 8), the predictors and correctors of Appendix F and G
  (Algorithms 2-5).

Time t in [0, 1], t = 0 data. Arrays (B, ...) with per-example t of shape (B,). float64.
"""

from __future__ import annotations

import numpy as np


def _b(c, x):
    c = np.asarray(c, np.float64)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


# --- VP [S21] Eq. 11: beta(t) = b0 + t (b1 - b0); int_0^t beta = b0 t + (b1 - b0) t^2 / 2.
def vp_integral(b0, b1, t):
    return b0 * t + 0.5 * (b1 - b0) * t**2


def vp_sde(b0, b1, x, t):
    beta = b0 + t * (b1 - b0)
    return -0.5 * _b(beta, x) * x, np.sqrt(beta)


def vp_marginal(b0, b1, x, t):
    """[S21] Eq. 29: mean = exp(-B/2) x, var = 1 - exp(-B)."""
    B = vp_integral(b0, b1, t)
    return _b(np.exp(-0.5 * B), x) * x, np.sqrt(1.0 - np.exp(-B))


def subvp_sde(b0, b1, x, t):
    beta = b0 + t * (b1 - b0)
    B = vp_integral(b0, b1, t)
    return -0.5 * _b(beta, x) * x, np.sqrt(beta * (1.0 - np.exp(-2.0 * B)))


def subvp_marginal(b0, b1, x, t):
    """[S21] Eq. 29: mean = exp(-B/2) x, std = 1 - exp(-B)."""
    B = vp_integral(b0, b1, t)
    return _b(np.exp(-0.5 * B), x) * x, 1.0 - np.exp(-B)


def ve_sde(smin, smax, x, t):
    sigma = smin * (smax / smin) ** t
    return np.zeros_like(x), sigma * np.sqrt(2.0 * np.log(smax / smin))


def ve_marginal(smin, smax, x, t):
    return x.copy(), smin * (smax / smin) ** t


def grid_index(t, N):
    """score_sde's index of t in the N-step grid: floor(t (N - 1))."""
    return np.floor(np.asarray(t) * (N - 1)).astype(int)


def vp_discretize(b0, b1, N, x, t):
    """[S21] Eq. 8 (DDPM): x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z, beta_i = b(i)/N."""
    betas = np.linspace(b0 / N, b1 / N, N)
    beta = betas[grid_index(t, N)]
    return _b(np.sqrt(1.0 - beta), x) * x - x, np.sqrt(beta)


def subvp_discretize(b0, b1, N, x, t):
    drift, g = subvp_sde(b0, b1, x, t)
    return drift / N, g / np.sqrt(N)


def ve_sigmas(smin, smax, N):
    return np.exp(np.linspace(np.log(smin), np.log(smax), N))


def ve_discretize(smin, smax, N, x, t):
    """[S21] Eq. 7 (SMLD): x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z, sigma_{-1} = 0."""
    sig = ve_sigmas(smin, smax, N)
    i = grid_index(t, N)
    prev = np.where(i == 0, 0.0, sig[np.maximum(i - 1, 0)])
    return np.zeros_like(x), np.sqrt(sig[i] ** 2 - prev**2)


def reverse_drift(drift, g, score, x, probability_flow):
    """[S21] Eq. 6 (f - g^2 score) and Eq. 13 (f - g^2 score / 2)."""
    w = 0.5 if probability_flow else 1.0
    return drift - _b(g**2, x) * score * w


# --- Gaussian data N(mu, s^2 I) pushed through p_0t (mean a x0, std sd): N(a mu, a^2 s^2 + sd^2).
def gaussian_score(x, mu, s, a, sd):
    var = _b(a**2 * s**2 + sd**2, x)
    return -(x - _b(a, x) * mu) / var


def gaussian_logp(x, mu, s):
    d = x[0].size
    return (-0.5 * d * np.log(2 * np.pi * s**2)
            - 0.5 * np.sum(((x - mu) / s) ** 2, axis=tuple(range(1, x.ndim))))


# --- One step of each predictor and corrector ([S21] Appendix E-G; score_sde's grid).
def reverse_diffusion_step(f, G, score, x, z):
    """[S21] Eq. 46: x_mean = x - (f - G^2 s), x = x_mean + G z."""
    x_mean = x - (f - _b(G**2, x) * score)
    return x_mean + _b(G, x) * z, x_mean


def euler_maruyama_step(drift, g, score, x, z, N):
    """Reverse SDE, dt = -1/N: x_mean = x + (f - g^2 s) dt, x = x_mean + g sqrt(|dt|) z."""
    dt = -1.0 / N
    x_mean = x + (drift - _b(g**2, x) * score) * dt
    return x_mean + _b(g, x) * np.sqrt(-dt) * z, x_mean


def vp_ancestral_step(beta, score, x, z):
    """[S21] Eq. 47 (DDPM's sampler with the score): (x + beta s) / sqrt(1 - beta) + sqrt(beta) z."""
    x_mean = (x + _b(beta, x) * score) / _b(np.sqrt(1.0 - beta), x)
    return x_mean + _b(np.sqrt(beta), x) * z, x_mean


def ve_ancestral_step(sigma, sigma_prev, score, x, z):
    """[S21] Eq. 48: x + (s_i^2 - s_{i-1}^2) s + sqrt(s_{i-1}^2 (s_i^2 - s_{i-1}^2) / s_i^2) z."""
    d = sigma**2 - sigma_prev**2
    x_mean = x + _b(d, x) * score
    return x_mean + _b(np.sqrt(sigma_prev**2 * d / sigma**2), x) * z, x_mean


def langevin_step(score, x, z, snr, alpha):
    """[S21] Algorithm 4 with score_sde's batch-averaged norms: eps = 2 alpha (r ||z|| / ||s||)^2."""
    B = x.shape[0]
    gn = np.mean(np.linalg.norm(score.reshape(B, -1), axis=1))
    zn = np.mean(np.linalg.norm(z.reshape(B, -1), axis=1))
    step = 2.0 * alpha * (snr * zn / gn) ** 2
    x_mean = x + _b(step, x) * score
    return x_mean + _b(np.sqrt(2.0 * step), x) * z, x_mean


def ald_step(score, x, z, snr, std, alpha):
    """Annealed Langevin (Song & Ermon 2019): step = 2 alpha (snr std)^2."""
    step = 2.0 * alpha * (snr * std) ** 2
    x_mean = x + _b(step, x) * score
    return x_mean + _b(np.sqrt(2.0 * step), x) * z, x_mean
