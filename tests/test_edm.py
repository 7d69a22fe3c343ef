"""EDM: Table 1's coefficients, Eq. 5's grid, Algorithm 2's step, the sampler on Gaussian data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import edm_reference as ref
from diffusion_jax import edm
from diffusion_jax.sampling import edm as edm_sampling

SIGMAS = np.array([0.002, 0.03, 0.5, 1.0, 2.7, 80.0])
MU, S = 0.3, 0.7  # Gaussian data N(MU, S^2 I)


def _denoiser(mu, s, x, sigma):
    return mu + s**2 / (s**2 + jnp.square(sigma)[:, None]) * (x - mu)


GAUSSIAN_D = Partial(_denoiser, MU, S)


@pytest.mark.parametrize("name,want", [
    ("edm", ref.edm_coefficients), ("vp", ref.vp_coefficients), ("ve", ref.ve_coefficients)])
def test_coefficients_match_table_1(name, want):
    got = edm.get_preconditioning(name).coefficients(jnp.asarray(SIGMAS, jnp.float32))
    for g, w, label in zip(got, want(SIGMAS), ("c_skip", "c_out", "c_in", "c_noise")):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6, err_msg=label)


def test_vp_sigma_inverse_range_and_loss_weights():
    vp = edm.VPPrecond()
    t = np.array([1e-5, 0.01, 0.3, 1.0])
    np.testing.assert_allclose(vp.sigma(jnp.asarray(t, jnp.float32)), ref.vp_sigma(t), rtol=1e-5)
    np.testing.assert_allclose(vp.sigma_inv(vp.sigma(jnp.float32(0.3))), 0.3, rtol=1e-5)
    np.testing.assert_allclose(vp.sigma_range, (ref.vp_sigma(1e-5), ref.vp_sigma(1.0)), rtol=1e-5)
    assert edm.VEPrecond().sigma_range == (0.02, 100.0)
    sig = jnp.asarray(SIGMAS, jnp.float32)
    np.testing.assert_allclose(edm.EDMPrecond().loss_weight(sig), ref.edm_lambda(SIGMAS), rtol=1e-5)
    np.testing.assert_allclose(vp.loss_weight(sig), SIGMAS**-2.0, rtol=1e-5)


def test_ddpm_preconditioning_runs_an_eps_model_on_its_own_steps():
    """For Gaussian data and DDPM's exact eps, D at every grid sigma is the exact denoiser:
    x_edm = x_t / sqrt(abar) and D = x_edm - sigma eps(x_edm / sqrt(1 + sigma^2), j)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    precond = edm.DDPMPrecond.from_alphas_cumprod(abar)
    sig64 = np.sqrt((1 - abar) / abar)
    np.testing.assert_allclose(precond.sigma_range, (sig64[0], sig64[-1]), rtol=1e-6)
    j = np.array([0, 17, 500, 999])
    sigma = jnp.asarray(sig64[j] * (1 + 1e-4), jnp.float32)  # off the grid: rounds back
    np.testing.assert_array_equal(precond.coefficients(sigma)[3], j)

    def exact_eps(x_t, t):  # E[eps | x_t] for x_0 ~ N(MU, S^2), x_t = sqrt(a) x_0 + sqrt(1-a) eps
        a = jnp.asarray(abar, jnp.float32)[t][:, None]
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)

    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 2)) * 3, jnp.float32)
    got = edm.denoise(precond, exact_eps, x, jnp.asarray(sig64[j], jnp.float32))
    want = ref.gaussian_denoiser(np.asarray(x, np.float64), sig64[j][:, None], MU, S)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_sigma_steps_match_eq_5_with_the_appended_zero():
    got = edm.sigma_steps(18)
    np.testing.assert_allclose(got, ref.time_steps(18), rtol=1e-13)
    assert got.shape == (19,) and got[0] == 80.0 and got[-1] == 0.0
    np.testing.assert_allclose(got[-2], 0.002, rtol=1e-12)
    np.testing.assert_allclose(edm.sigma_steps(5, sigma_min=0.02, sigma_max=100, rho=3),
                               ref.time_steps(5, 0.02, 100.0, 3.0), rtol=1e-13)
    grid = np.array([0.01, 1.0, 10.0, 100.0])
    np.testing.assert_array_equal(edm.sigma_steps(4, sigma_max=80.0, grid=grid),
                                  [100.0, 10.0, 0.01, 0.01, 0.0])


def test_step_gammas_follow_algorithm_2():
    sig = ref.time_steps(10)
    g = edm.step_gammas(sig, S_churn=4.0, S_min=0.05, S_max=50.0)
    want = np.where((sig[:-1] >= 0.05) & (sig[:-1] <= 50.0), 0.4, 0.0)
    np.testing.assert_allclose(g, want)
    assert np.all(edm.step_gammas(sig, S_churn=100.0) == math.sqrt(2) - 1)


@pytest.mark.parametrize("gamma,last", [(0.0, False), (0.3, False), (0.0, True), (0.3, True)])
def test_one_step_matches_algorithm_2_in_float64(gamma, last):
    rng = np.random.default_rng(1)
    x, z = rng.normal(size=(2, 3, 2)) * 2.0
    t_cur, t_next = 2.5, (0.0 if last else 1.7)
    s_noise = 1.007
    want = ref.algorithm2_step(lambda y, s: ref.gaussian_denoiser(y, s, MU, S),
                               x, t_cur, t_next, gamma, z, s_noise, last)
    got = edm_sampling.edm_step(GAUSSIAN_D, jnp.asarray(x, jnp.float32), t_cur, t_next,
                                gamma=gamma, noise=jnp.asarray(z, jnp.float32),
                                S_noise=s_noise, second_order=not last)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if gamma == 0.0:  # Algorithm 1: the noise is not used
        same = edm_sampling.edm_step(GAUSSIAN_D, jnp.asarray(x, jnp.float32), t_cur, t_next,
                                     second_order=not last)
        np.testing.assert_allclose(same, got, rtol=1e-6)


def test_sampler_calls_the_denoiser_2n_minus_1_times():
    calls = []

    def counting(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return _denoiser(MU, S, x, sigma)

    out = edm_sampling.edm_sampler(counting, (2, 2), key=jax.random.key(0), num_steps=18)
    jax.effects_barrier()
    assert out["nfe"] == 35 == len(calls)


def _exact_map(z, sigma_max=80.0):
    """The probability-flow ODE keeps (x - MU) / sqrt(S^2 + sigma^2) fixed: x_0 = sigma_max z
    ends at MU + S (sigma_max z - MU) / sqrt(S^2 + sigma_max^2)."""
    return MU + S * (sigma_max * z - MU) / math.sqrt(S**2 + sigma_max**2)


def _reference_chain(z, num_steps):
    """Algorithm 1 in float64 (`edm_reference`), the closed-form denoiser."""
    t = ref.time_steps(num_steps)
    x = z * t[0]
    for i in range(num_steps):
        x = ref.algorithm2_step(lambda y, s: ref.gaussian_denoiser(y, s, MU, S), x, t[i],
                                t[i + 1], 0.0, 0.0 * x, 1.0, i == num_steps - 1)
    return x


def test_heun_on_gaussian_data_matches_the_float64_chain_and_the_moments():
    n = 4000
    z = jax.random.normal(jax.random.key(3), (n, 2))
    out = edm_sampling.edm_sampler(GAUSSIAN_D, (n, 2), x_T=z)
    z64 = np.asarray(z, np.float64)
    np.testing.assert_allclose(out["sample"], _reference_chain(z64, 18), rtol=1e-4, atol=1e-4)
    # 18 steps widen this (narrow, S = 0.7) Gaussian by 3.5 % (float64 chain against the
    # exact map); 64 steps leave 0.2 %, below the Monte Carlo tolerance used here.
    fine = edm_sampling.edm_sampler(GAUSSIAN_D, (n, 2), x_T=z, num_steps=64)["sample"]
    np.testing.assert_allclose(fine, _exact_map(z64), rtol=5e-3, atol=5e-3)
    x = np.asarray(fine, np.float64)
    # Monte Carlo: 8000 values; 4 standard errors for the mean and the variance.
    assert abs(x.mean() - MU) < 4 * S / math.sqrt(x.size) + 0.01 * MU
    assert abs(x.var() / S**2 - 1) < 4 * math.sqrt(2 / x.size)


def test_stochastic_sampler_on_gaussian_data_has_the_right_moments():
    n = 4000
    out = edm_sampling.edm_sampler(GAUSSIAN_D, (n, 2), key=jax.random.key(4), S_churn=40.0,
                                   S_min=0.05, S_max=50.0, num_steps=64)
    x = np.asarray(out["sample"], np.float64)
    assert abs(x.mean() - MU) < 4 * S / math.sqrt(x.size) + 0.01 * MU
    assert abs(x.var() / S**2 - 1) < 4 * math.sqrt(2 / x.size)
    again = edm_sampling.edm_sampler(GAUSSIAN_D, (n, 2), key=jax.random.key(4), S_churn=40.0,
                                     S_min=0.05, S_max=50.0, num_steps=64)
    np.testing.assert_array_equal(again["sample"], out["sample"])  # keyed noise


def _raw_from_denoiser(sd, x_in, c_noise):
    """The network F whose EDM-preconditioned D is the exact denoiser of N(0, sd^2 I)."""
    sigma = jnp.exp(4.0 * c_noise)[:, None]
    x = x_in * jnp.sqrt(jnp.square(sigma) + sd**2)
    c_skip = sd**2 / (jnp.square(sigma) + sd**2)
    c_out = sigma * sd / jnp.sqrt(jnp.square(sigma) + sd**2)
    return (sd**2 / (sd**2 + jnp.square(sigma)) * x - c_skip * x) / c_out


def test_edm_loss_is_one_per_element_for_the_exact_denoiser_of_unit_scaled_data():
    """With data N(0, sigma_data^2), lambda(sigma) E||D* - y||^2 = 1 per element at every
    sigma: the weighting Table 1 chose. 4000 x 4 chi-square(1) values: std 0.011."""
    sd = 0.5
    precond = edm.EDMPrecond(sigma_data=sd)
    key_y, key_loss = jax.random.split(jax.random.key(5))
    y = sd * jax.random.normal(key_y, (4000, 4))
    out = edm.edm_loss(precond, Partial(_raw_from_denoiser, sd), y, key=key_loss)
    assert abs(float(jnp.mean(out["loss"])) - 1.0) < 0.05
    log_sigma = np.log(np.asarray(out["sigma"]))
    assert abs(log_sigma.mean() + 1.2) < 4 * 1.2 / math.sqrt(4000)
    assert abs(log_sigma.std() / 1.2 - 1) < 4 / math.sqrt(2 * 4000)
    summed = edm.edm_loss(precond, Partial(_raw_from_denoiser, sd), y, key=key_loss,
                          reduce_mean=False)
    np.testing.assert_allclose(summed["loss"], 4 * out["loss"], rtol=1e-5)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_training_sigmas_of_vp_and_ve_cover_their_range(name):
    precond = edm.get_preconditioning(name)
    sig = np.asarray(edm.training_sigmas(precond, jax.random.key(6), 4000))
    lo, hi = precond.sigma_range
    assert sig.min() >= lo * (1 - 1e-5) and sig.max() <= hi * (1 + 1e-5)
    if name == "ve":  # log-uniform: ln sigma uniform on [ln 0.02, ln 100]
        u = (np.log(sig) - math.log(0.02)) / math.log(5000.0)
        assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / 4000)


@pytest.mark.parametrize("call,match", [
    (lambda: edm.sigma_steps(18, sigma_min=80.0, sigma_max=80.0), "sigma_min must be < sigma_max"),
    (lambda: edm.sigma_steps(18, rho=0.0), "rho must be"),
    (lambda: edm.sigma_steps(18, rho=-7.0), "rho must be"),
    (lambda: edm.sigma_steps(1), "num_steps must be an int >= 2"),
    (lambda: edm.get_preconditioning("karras"), r"valid values are \['edm', 'vp', 've'\]"),
    (lambda: edm.get_preconditioning("edm", sigma_data=0.0), "sigma_data must be"),
    (lambda: edm.get_preconditioning("edm", beta_d=1.0), "Unknown field"),
    (lambda: edm.get_preconditioning("ve", sigma_min=5.0, sigma_max=1.0), "sigma_min must be <"),
    (lambda: edm.step_gammas(ref.time_steps(4), S_min=1.0, S_max=0.5), "S_max must be"),
    (lambda: edm_sampling.edm_sampler(GAUSSIAN_D, (2, 2), S_churn=1.0), "Pass `key`"),
    (lambda: edm_sampling.edm_sampler(GAUSSIAN_D, (2, 2), key=jax.random.key(0), S_noise=-1.0),
     "S_noise must be"),
])
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
