"""The probability-flow ODE likelihood against the closed form of Gaussian data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import likelihood, ode, schedules, sde as sde_lib, sde_losses
from tests import sde_reference as ref

MU, S = 0.3, 0.5
SDES = {"vp": sde_lib.VPSDE(0.1, 20.0, 1000), "subvp": sde_lib.subVPSDE(0.1, 20.0, 1000),
        "ve": sde_lib.VESDE(0.01, 50.0, 1000)}


def _exact_score(sde, scale, x, t):
    alpha, std = sde.marginal_coeffs(t)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return -scale * (x - alpha.reshape(shape) * MU) / (alpha**2 * S**2 + std**2).reshape(shape)


def _expected_logp(sde, x, out):
    """log N(x; mu, s^2 I) corrected for the prior's mismatch at T, float64.

    The flow is exact, but p_T = N(0, I) is not the data's marginal at T, N(a mu, a^2 s^2 +
    std^2) (for VP(0.1, 20) a = 0.0066: about 2e-3 nats/dim for mu = 0.3). The ODE value
    is log p_T(z) + log q_eps(x) - log q_T(z) with q the true marginals (q_eps differs
    from N(mu, s^2) by 4e-4 nats/dim for VE, whose std at eps is sigma_min = 0.01).
    """

    def log_q(t, y):
        a, sd = (float(v[0]) for v in sde.marginal_coeffs(jnp.full((1,), t)))
        var = a**2 * S**2 + sd**2
        return (-0.5 * y.shape[1] * np.log(2 * np.pi * var)
                - 0.5 * np.sum((y - a * MU) ** 2, axis=1) / var)

    z = np.asarray(out["z"], np.float64)
    return (log_q(1e-5, np.asarray(x, np.float64)) + np.asarray(out["prior_logp"], np.float64)
            - log_q(1.0, z))


def _x(n, d, seed=0):
    return jnp.asarray(MU + S * np.random.default_rng(seed).standard_normal((n, d)), jnp.float32)


@pytest.mark.parametrize("name", sorted(SDES))
def test_exact_divergence_gives_the_closed_form(name):
    sde, x = SDES[name], _x(6, 3)
    out = likelihood.ode_likelihood(sde, Partial(_exact_score, sde, 1.0), x, rtol=1e-6,
                                    atol=1e-6)
    want = _expected_logp(sde, x, out)
    np.testing.assert_allclose(np.asarray(out["logp"]) / 3, want / 3, atol=1e-4)  # nats/dim
    # And the plain closed form, within the mismatches at eps and T (1e-2 nats/dim).
    plain = ref.gaussian_logp(np.asarray(x, np.float64), MU, S)
    np.testing.assert_allclose(np.asarray(out["logp"]) / 3, plain / 3, atol=1e-2)
    assert out["nfe"].shape == (6,) and np.all(np.asarray(out["nfe"]) > 10)


COV = np.array([[1.0, 0.6, 0.0], [0.6, 0.8, -0.3], [0.0, -0.3, 0.5]])  # correlated data


def _correlated_score(sde, x, t):
    """Exact score of N(0, COV) data at t: -(a^2 COV + std^2 I)^{-1} x (a full Jacobian, so
    Hutchinson's estimate is not exact, not even with Rademacher probes)."""
    alpha, std = sde.marginal_coeffs(t)
    cov = (alpha[:, None, None] ** 2 * jnp.asarray(COV, jnp.float32)[None]
           + (std**2)[:, None, None] * jnp.eye(3)[None])
    return -jnp.linalg.solve(cov, x[..., None])[..., 0]


def test_hutchinson_is_unbiased_and_replayable():
    sde = SDES["vp"]
    x = jnp.asarray(np.random.default_rng(1).multivariate_normal(np.zeros(3), COV, 128),
                    jnp.float32)
    score = Partial(_correlated_score, sde)
    exact = likelihood.ode_likelihood(sde, score, x)["logp"]
    key = jax.random.key(3)
    hutch = likelihood.ode_likelihood(sde, score, x, divergence="hutchinson", key=key)["logp"]
    diff = np.asarray(hutch, np.float64) - np.asarray(exact, np.float64)
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(diff.size)  # 4 standard errors
    assert diff.std() > 1e-3  # it is an estimate, not the exact value
    probes = ode.draw_probes(key, x.shape, "rademacher")
    replay = likelihood.ode_likelihood(sde, score, x, divergence="hutchinson", probes=probes)
    np.testing.assert_array_equal(replay["logp"], hutch)
    gauss = likelihood.ode_likelihood(sde, score, x, divergence="hutchinson",
                                      key=key, probe="gaussian")["logp"]
    diff = np.asarray(gauss, np.float64) - np.asarray(exact, np.float64)
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(diff.size)


def _interp_log_abar(betas):
    return np.concatenate([[0.0], np.cumsum(np.log1p(-np.asarray(betas, np.float64)))])


def test_ddpm_eps_model_through_its_vp_sde():
    # (In t, beta(t) of a DDPM schedule jumps at every grid time and the adaptive solve was
    # off by O(1/N): 5e-4 nats/dim for N = 1000, 3e-3 for N = 50; the solve in
    # r = -log alpha^2 is smooth.)
    # The exact eps of Gaussian data for a DDPM network called at float steps s = tN - 1:
    # abar(s) by linear interpolation of log abar between integer steps (abar(-1) = 1).
    schedule = schedules.get_schedule("linear", 1000)
    log_abar = jnp.asarray(_interp_log_abar(schedule.betas), jnp.float32)
    steps = jnp.arange(-1.0, 1000.0)

    def eps_model(x, s):
        abar = jnp.exp(jnp.interp(s, steps, log_abar))[:, None]
        return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * MU) / (abar * S**2 + 1 - abar)

    sde = sde_lib.DDPMVPSDE.from_schedule(schedule)
    score = sde_losses.score_fn_from_model(sde, eps_model, "eps")
    x = _x(6, 3, seed=2)
    out = likelihood.ode_likelihood(sde, score, x, rtol=1e-6, atol=1e-6)
    want = _expected_logp(sde, x, out)
    np.testing.assert_allclose(np.asarray(out["logp"]) / 3, want / 3, atol=1e-4)


def test_a_wrong_score_is_detected():
    sde, x = SDES["vp"], _x(6, 3)
    out = likelihood.ode_likelihood(sde, Partial(_exact_score, sde, 0.9), x)
    want = ref.gaussian_logp(np.asarray(x, np.float64), MU, S)
    assert np.max(np.abs(np.asarray(out["logp"]) - want)) / 3 > 1e-2


def test_one_compilation_and_no_host_callback():
    sde, x = SDES["vp"], _x(4, 2)
    traces = []

    def score(scale, x, t):
        traces.append(1)
        return _exact_score(sde, scale, x, t)

    likelihood.ode_likelihood(sde, Partial(score, jnp.float32(1.0)), x)
    first = len(traces)
    likelihood.ode_likelihood(sde, Partial(score, jnp.float32(0.9)), x + 0.1)
    assert len(traces) == first
    jaxpr = str(jax.make_jaxpr(lambda s, x: likelihood._ode_likelihood(
        sde, Partial(score, s), x, jnp.zeros((4, 1, 2)), divergence="exact", solver="tsit5",
        rtol=1e-5, atol=1e-5, max_steps=64, eps=1e-5))(jnp.float32(1.0), x))
    assert "callback" not in jaxpr


def test_bits_per_dim_of_dequantized_images():
    sde = SDES["vp"]
    rng = np.random.default_rng(4)
    k = rng.integers(0, 256, (4, 2, 2, 1))
    images = jnp.asarray(k / 127.5 - 1.0, jnp.float32)
    # Per-example bin widths: 2 / 256 in [-1, 1] units; dequantized values stay in the bin.
    u = jax.random.uniform(jax.random.key(0), images.shape)
    deq = np.asarray(likelihood.dequantize(images, u), np.float64)
    np.testing.assert_array_less(2 * k / 256 - 1 - 1e-6, deq)
    np.testing.assert_array_less(deq, 2 * (k + 1) / 256 - 1 + 1e-6)
    score = Partial(_exact_score, sde, 1.0)
    out = likelihood.ode_bpd(sde, score, images, key=jax.random.key(1), num_dequant=2)
    assert out["bpd_draws"].shape == (2, 4) and out["nfe"].shape == (2, 4)
    assert np.all(np.asarray(out["bpd_iw"]) <= np.asarray(out["bpd"]) + 1e-6)
    # The closed form at the bin centres; within a bin log p changes by at most
    # |x - mu| / s^2 * (1/128) nats per dimension.
    centres = (2 * k + 1) / 256 - 1
    flat = centres.reshape(4, -1)
    want = -ref.gaussian_logp(flat, MU, S) / (4 * math.log(2)) + 7.0
    slack = np.max(np.abs(flat - MU)) / S**2 / 128 / math.log(2) + 1e-4
    np.testing.assert_allclose(out["bpd"], want, atol=slack)


def test_bad_inputs():
    sde, x = SDES["vp"], _x(2, 2)
    score = Partial(_exact_score, sde, 1.0)
    with pytest.raises(ValueError, match="'exact', 'hutchinson'"):
        likelihood.ode_likelihood(sde, score, x, divergence="skilling")
    with pytest.raises(ValueError, match="probes must have shape"):
        likelihood.ode_likelihood(sde, score, x, divergence="hutchinson", probes=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="exactly one of `key` and `probes`"):
        likelihood.ode_likelihood(sde, score, x, divergence="hutchinson")
    with pytest.raises(ValueError, match="rtol must be a finite number > 0"):
        likelihood.ode_likelihood(sde, score, x, rtol=0.0)
    with pytest.raises(ode.ODEBudgetExhaustedError, match="max_steps = 2"):
        likelihood.ode_likelihood(sde, score, x, max_steps=2)
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):
        likelihood.ode_bpd(sde, score, jnp.full((1, 2, 2, 1), 1.5), key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_dequant must be a positive int"):
        likelihood.ode_bpd(sde, score, jnp.zeros((1, 2, 2, 1)), key=jax.random.key(0),
                           num_dequant=0)
