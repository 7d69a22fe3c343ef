"""The SDEs against the float64 reference of tests/sde_reference.py ([S21])."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import schedules, sde as sde_lib
from tests import sde_reference as ref

B0, B1, SMIN, SMAX, N = 0.1, 20.0, 0.01, 50.0, 1000
TIMES = np.array([1e-5, 1e-3, 0.5, 1.0], np.float32)  # near eps, small, middle, end
RTOL = 1e-4  # float32 against float64, also at t = 1e-5 (expm1 / log1p forms)


def _x(rng):
    return rng.standard_normal((TIMES.size, 3, 2)).astype(np.float32)


CASES = {
    "vp": (sde_lib.VPSDE(B0, B1, N), ref.vp_sde, ref.vp_marginal, ref.vp_discretize, (B0, B1)),
    "subvp": (sde_lib.subVPSDE(B0, B1, N), ref.subvp_sde, ref.subvp_marginal,
              ref.subvp_discretize, (B0, B1)),
    "ve": (sde_lib.VESDE(SMIN, SMAX, N), ref.ve_sde, ref.ve_marginal, ref.ve_discretize,
           (SMIN, SMAX)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sde_marginal_discretize_match_reference(name, rng):
    sde, ref_sde, ref_marginal, ref_discretize, params = CASES[name]
    x, t = _x(rng), TIMES
    t64 = t.astype(np.float64)
    drift, g = sde.sde(jnp.asarray(x), jnp.asarray(t))
    want_drift, want_g = ref_sde(*params, x.astype(np.float64), t64)
    np.testing.assert_allclose(drift, want_drift, rtol=RTOL, atol=1e-30)
    np.testing.assert_allclose(g, want_g, rtol=RTOL)
    mean, std = sde.marginal_prob(jnp.asarray(x), jnp.asarray(t))
    want_mean, want_std = ref_marginal(*params, x.astype(np.float64), t64)
    np.testing.assert_allclose(mean, want_mean, rtol=RTOL)
    np.testing.assert_allclose(std, want_std, rtol=RTOL)  # relative, also at t = 1e-5
    f, G = sde.discretize(jnp.asarray(x), jnp.asarray(t))
    want_f, want_G = ref_discretize(*params, N, x.astype(np.float64), t64)
    np.testing.assert_allclose(f, want_f, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(G, want_G, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_drift_matches_reference(name, probability_flow, rng):
    sde, ref_sde, ref_marginal, ref_discretize, params = CASES[name]
    x, t = _x(rng), TIMES
    mu, s = 0.3, 0.7

    def score_fn(x, t):
        alpha, std = sde.marginal_coeffs(t)
        var = (alpha**2 * s**2 + std**2).reshape((-1, 1, 1))
        return -(x - alpha.reshape((-1, 1, 1)) * mu) / var

    rsde = sde.reverse(score_fn, probability_flow=probability_flow)
    drift, g = rsde.sde(jnp.asarray(x), jnp.asarray(t))
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    f64, g64 = ref_sde(*params, x64, t64)
    _, sd = ref_marginal(*params, np.ones((t.size, 1, 1)), t64)
    a = ref_marginal(*params, np.ones((t.size, 1, 1)), t64)[0].reshape(-1)
    score = ref.gaussian_score(x64, mu, s, a, sd)
    np.testing.assert_allclose(drift, ref.reverse_drift(f64, g64, score, x64, probability_flow),
                               rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(g, 0.0 * g64 if probability_flow else g64, rtol=RTOL)
    rf, rG = rsde.discretize(jnp.asarray(x), jnp.asarray(t))
    df, dG = ref_discretize(*params, N, x64, t64)
    np.testing.assert_allclose(rf, ref.reverse_drift(df, dG, score, x64, probability_flow),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(rG, 0.0 * dG if probability_flow else dG, rtol=RTOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_prior(name, key):
    sde = CASES[name][0]
    z = sde.prior_sample(key, (4000, 3))
    std = SMAX if name == "ve" else 1.0
    assert z.shape == (4000, 3) and z.dtype == jnp.float32
    assert abs(float(jnp.std(z)) / std - 1.0) < 0.05  # 12000 draws: 3 sigma is 0.02
    z64 = np.asarray(z[:5], np.float64)
    want = ref.gaussian_logp(z64, 0.0, std)
    np.testing.assert_allclose(sde.prior_logp(z[:5]), want, rtol=1e-5)


def test_ddpm_schedule_vp_sde_is_exact_on_the_grid(rng):
    schedule = schedules.get_schedule("cosine", 50)
    sde = sde_lib.DDPMVPSDE.from_schedule(schedule)
    abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
    t = (np.arange(50) + 1.0) / 50.0
    alpha, std = sde.marginal_coeffs(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(alpha, np.sqrt(abar), rtol=3e-5)
    np.testing.assert_allclose(std, np.sqrt(1.0 - abar), rtol=1e-4)
    np.testing.assert_allclose(sde.model_timestep(jnp.asarray(t)), np.arange(50), atol=1e-4)
    # Inside a segment: log alpha^2 linear, beta = -d log alpha^2 / dt (float64 here).
    t_mid = np.array([1e-5, 0.013, 0.51], np.float64)
    log_abar = np.concatenate([[0.0], np.log(abar)])
    grid = np.arange(51) / 50.0
    want_std = np.sqrt(-np.expm1(np.interp(t_mid, grid, log_abar)))
    _, got_std = sde.marginal_coeffs(jnp.asarray(t_mid, jnp.float32))
    np.testing.assert_allclose(got_std, want_std, rtol=RTOL)
    seg = np.ceil(t_mid * 50).astype(int) - 1
    want_beta = (log_abar[seg] - log_abar[seg + 1]) * 50.0
    np.testing.assert_allclose(sde.beta(jnp.asarray(t_mid, jnp.float32)), want_beta, rtol=1e-4)


def test_linear_ddpm_vp_sde_close_to_score_sde_vpsde():
    # The linear schedule with T = 1000 is score_sde's VPSDE(0.1, 20) up to O(1/N) (0.4 % at t = 0.1).
    sde = sde_lib.DDPMVPSDE.from_schedule(schedules.get_schedule("linear", 1000))
    t = jnp.asarray([0.1, 0.5, 0.9])
    _, std = sde.marginal_coeffs(t)
    _, want = sde_lib.VPSDE(0.1, 20.0, 1000).marginal_coeffs(t)
    np.testing.assert_allclose(std, want, rtol=5e-3)


def test_sde_is_a_pytree_and_jits():
    sde = sde_lib.VPSDE(0.1, 20.0, 10)
    leaves = jax.tree_util.tree_leaves(sde)
    assert len(leaves) == 2
    out = jax.jit(lambda s, t: s.marginal_coeffs(t)[1])(sde, jnp.asarray([0.5]))
    np.testing.assert_allclose(out, sde.marginal_coeffs(jnp.asarray([0.5]))[1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="vesde"):
        sde_lib.create_sde("vpsd")
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        sde_lib.create_sde("vesde", sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="positive int"):
        sde_lib.create_sde("vpsde", N=0)
    with pytest.raises(ValueError, match=r"\[1e-05, 1.0\]"):
        sde_lib.check_time(np.array([0.0, 0.5]), eps=1e-5)
    with pytest.raises(ValueError, match="callable"):
        sde_lib.VPSDE().reverse(3)
