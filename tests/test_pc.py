"""PC and probability-flow samplers: single steps against the float64 reference, and the
moments of samples of Gaussian data drawn with its exact score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import sde as sde_lib
from diffusion_jax.sampling import pc
from tests import sde_reference as ref

MU, S = 0.5, 0.6
N = 100
VP, VE, SUBVP = sde_lib.VPSDE(0.1, 20.0, N), sde_lib.VESDE(0.01, 50.0, N), sde_lib.subVPSDE(0.1, 20.0, N)


def _exact_score(sde, x, t):
    alpha, std = sde.marginal_coeffs(t)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return -(x - alpha.reshape(shape) * MU) / (alpha**2 * S**2 + std**2).reshape(shape)


def score_fn(sde):
    return Partial(_exact_score, sde)


def _inputs(rng):
    x = rng.standard_normal((3, 2, 2)).astype(np.float32)
    z = rng.standard_normal((3, 2, 2)).astype(np.float32)
    t = np.array([0.004, 0.37, 1.0], np.float32)
    return x, z, t


def _score64(sde, x, t):
    return np.asarray(_exact_score(sde, jnp.asarray(x), jnp.asarray(t)), np.float64)


def _params(sde):
    return (sde.sigma_min, sde.sigma_max) if isinstance(sde, sde_lib.VESDE) else (sde.beta_min, sde.beta_max)


@pytest.mark.parametrize("sde", [VP, SUBVP, VE], ids=["vp", "subvp", "ve"])
def test_one_predictor_step_matches_reference(sde, rng):
    x, z, t = _inputs(rng)
    x64, z64, t64 = x.astype(np.float64), z.astype(np.float64), t.astype(np.float64)
    score = _score64(sde, x, t)  # the same score on both sides: the step is what is tested
    kind = {sde_lib.VPSDE: "vp", sde_lib.subVPSDE: "subvp", sde_lib.VESDE: "ve"}[type(sde)]
    discretize = getattr(ref, f"{kind}_discretize")
    f, G = discretize(*_params(sde), N, x64, t64)
    want = {"reverse_diffusion": ref.reverse_diffusion_step(f, G, score, x64, z64)}
    drift, g = getattr(ref, f"{kind}_sde")(*_params(sde), x64, t64)
    want["euler_maruyama"] = ref.euler_maruyama_step(drift, g, score, x64, z64, N)
    i = ref.grid_index(t64, N)
    if kind == "vp":
        beta = np.linspace(0.1 / N, 20.0 / N, N)[i]
        want["ancestral"] = ref.vp_ancestral_step(beta, score, x64, z64)
    elif kind == "ve":
        sig = ref.ve_sigmas(0.01, 50.0, N)
        want["ancestral"] = ref.ve_ancestral_step(sig[i], np.where(i == 0, 0.0, sig[i - 1]),
                                                  score, x64, z64)
    for name, (w_x, w_mean) in want.items():
        got_x, got_mean = pc.predictor_step(name, sde, score_fn(sde), jnp.asarray(x),
                                            jnp.asarray(t), jnp.asarray(z))
        np.testing.assert_allclose(got_mean, w_mean, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got_x, w_x, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("sde", [VP, VE], ids=["vp", "ve"])
def test_one_corrector_step_matches_reference(sde, rng):
    x, z, t = _inputs(rng)
    x64, z64, t64 = x.astype(np.float64), z.astype(np.float64), t.astype(np.float64)
    score = _score64(sde, x, t)
    i = ref.grid_index(t64, N)
    alpha = 1.0 - np.linspace(0.1 / N, 20.0 / N, N)[i] if sde is VP else np.ones(3)
    std = (ref.vp_marginal if sde is VP else ref.ve_marginal)(*_params(sde), x64, t64)[1]
    want = {"langevin": ref.langevin_step(score, x64, z64, 0.16, alpha),
            "ald": ref.ald_step(score, x64, z64, 0.16, std, alpha)}
    for name, (w_x, w_mean) in want.items():
        got_x, got_mean = pc.corrector_step(name, sde, score_fn(sde), jnp.asarray(x),
                                            jnp.asarray(t), jnp.asarray(z), snr=0.16)
        np.testing.assert_allclose(got_mean, w_mean, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got_x, w_x, rtol=1e-4, atol=1e-5, err_msg=name)


def _check_moments(x, tol_mean=0.03, tol_var=0.06):
    x = np.asarray(x, np.float64)
    # 8000 values: standard errors 0.007 (mean) and 0.016 (relative variance).
    assert abs(x.mean() - MU) < tol_mean, x.mean()
    assert abs(x.var() / S**2 - 1.0) < tol_var, x.var() / S**2


@pytest.mark.parametrize("sde,predictor,corrector", [
    (VP, "euler_maruyama", "none"),
    (VP, "ancestral", "langevin"),
    (VE, "reverse_diffusion", "langevin"),
    (SUBVP, "reverse_diffusion", "ald"),
], ids=["vp-em", "vp-ancestral-langevin", "ve-rd-langevin", "subvp-rd-ald"])
def test_pc_samples_of_gaussian_data_have_its_moments(sde, predictor, corrector):
    out = pc.pc_sample(sde, score_fn(sde), (4000, 2), key=jax.random.key(0),
                       predictor=predictor, corrector=corrector, snr=0.1, n_steps=1)
    assert out["nfe"] == N * (1 + (corrector != "none")) + 1
    _check_moments(out["sample"])


def _exact_flow(sde, x_T, eps):
    """The probability-flow map of Gaussian data: x_t = a mu + sqrt(a^2 s^2 + std^2) w."""
    a1, s1 = (float(v[0]) for v in sde.marginal_coeffs(jnp.ones(1)))
    a0, s0 = (float(v[0]) for v in sde.marginal_coeffs(jnp.full((1,), eps)))
    w = (np.asarray(x_T, np.float64) - a1 * MU) / np.sqrt(a1**2 * S**2 + s1**2)
    return a0 * MU + np.sqrt(a0**2 * S**2 + s0**2) * w


@pytest.mark.parametrize("sde", [VP, SUBVP, VE], ids=["vp", "subvp", "ve"])
def test_ode_sampler_follows_the_exact_flow(sde):
    x_T = sde.prior_sample(jax.random.key(1), (500, 2))
    want = _exact_flow(sde, x_T, 1e-3)
    out = pc.ode_sample(sde, score_fn(sde), (500, 2), x_T=x_T, rtol=1e-5, atol=1e-5,
                        denoise="none")
    np.testing.assert_allclose(out["sample"], want, atol=2e-3 * max(1.0, sde.prior_std / 10))
    assert int(out["nfe"]) > 0
    if sde is not VP:  # Heun and Tweedie once (compiles are the cost of this test)
        return
    heun = pc.ode_sample(sde, score_fn(sde), (500, 2), x_T=x_T, solver="heun", num_steps=200,
                         denoise="none")
    assert int(heun["nfe"]) == 400
    np.testing.assert_allclose(heun["sample"], want, atol=0.02)
    tweedie = pc.ode_sample(sde, score_fn(sde), (500, 2), key=jax.random.key(2))
    _check_moments(tweedie["sample"], tol_mean=0.08, tol_var=0.2)  # 1000 values


def test_bad_inputs():
    s = score_fn(VP)
    with pytest.raises(ValueError, match="'reverse_diffusion', 'euler_maruyama', 'ancestral'"):
        pc.pc_sample(VP, s, (2, 2), key=jax.random.key(0), predictor="heun")
    with pytest.raises(ValueError, match="'langevin', 'ald', 'none'"):
        pc.pc_sample(VP, s, (2, 2), key=jax.random.key(0), corrector="hmc")
    with pytest.raises(ValueError, match="snr must be > 0"):
        pc.pc_sample(VP, s, (2, 2), key=jax.random.key(0), snr=0.0)
    with pytest.raises(ValueError, match="ancestral predictor is defined for VP and VE"):
        pc.pc_sample(SUBVP, score_fn(SUBVP), (2, 2), key=jax.random.key(0), predictor="ancestral")
    with pytest.raises(ValueError, match="eps must lie in"):
        pc.pc_sample(VP, s, (2, 2), key=jax.random.key(0), eps=0.0)
    with pytest.raises(ValueError, match="rtol must be"):
        pc.ode_sample(VP, s, (2, 2), key=jax.random.key(0), rtol=-1.0)
