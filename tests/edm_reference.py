"""An independent float64 NumPy reference of EDM's formulas, written from the paper.

[K22] Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (arXiv:2206.00364): Table 1 (VP, VE and "ours" columns: sigma(t),
c_skip, c_out, c_in, c_noise, lambda, p_train), Eq. 5 (the time steps), Algorithm 2
(the stochastic sampler; Algorithm 1 is its S_churn = 0 case). Never imported by the library.
"""

from __future__ import annotations

import math

import numpy as np


def edm_coefficients(sigma, sigma_data=0.5):
    """[K22] Table 1, "ours": c_skip, c_out, c_in, c_noise."""
    s = np.asarray(sigma, np.float64)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / np.sqrt(sigma_data**2 + s**2)
    c_in = 1.0 / np.sqrt(s**2 + sigma_data**2)
    return c_skip, c_out, c_in, 0.25 * np.log(s)


def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """[K22] Table 1, VP: sigma(t) = sqrt(e^{beta_d t^2 / 2 + beta_min t} - 1)."""
    return np.sqrt(np.exp(0.5 * beta_d * t**2 + beta_min * t) - 1.0)


def vp_coefficients(sigma, beta_d=19.9, beta_min=0.1, M=1000):
    """[K22] Table 1, VP: c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise (M-1) t."""
    s = np.asarray(sigma, np.float64)
    # t solves beta_d t^2 / 2 + beta_min t = log(1 + sigma^2): the positive root.
    t = (-beta_min + np.sqrt(beta_min**2 + 2.0 * beta_d * np.log(1.0 + s**2))) / beta_d
    return np.ones_like(s), -s, 1.0 / np.sqrt(s**2 + 1.0), (M - 1) * t


def ve_coefficients(sigma):
    """[K22] Table 1, VE: c_skip 1, c_out sigma, c_in 1, c_noise log(sigma / 2)."""
    s = np.asarray(sigma, np.float64)
    return np.ones_like(s), s, np.ones_like(s), np.log(0.5 * s)


def edm_lambda(sigma, sigma_data=0.5):
    """[K22] Table 1, "ours": lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def time_steps(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """[K22] Eq. 5, i = 0..N-1, and t_N = 0."""
    out = []
    for i in range(n):
        out.append(
            (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho)))
            ** rho
        )
    return np.array(out + [0.0], np.float64)


def gaussian_denoiser(x, sigma, mu, s):
    """E[y | y + sigma n = x] for y ~ N(mu, s^2 I): mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    return mu + s**2 / (s**2 + sigma**2) * (x - mu)


def algorithm2_step(denoise, x, t_cur, t_next, gamma, z, s_noise, last):
    """[K22] Algorithm 2, lines 4-11, one iteration in float64 (scalar times)."""
    t_hat = t_cur + gamma * t_cur
    x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * z
    d = (x_hat - denoise(x_hat, t_hat)) / t_hat
    x_next = x_hat + (t_next - t_hat) * d
    if last:  # t_{i+1} = 0: Euler only
        return x_next
    d2 = (x_next - denoise(x_next, t_next)) / t_next
    return x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
