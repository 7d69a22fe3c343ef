"""Output parameterisations and the DSM loss, against closed forms on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import sde as sde_lib, sde_losses
from tests import sde_reference as ref

MU, S = 0.5, 0.6  # data N(MU, S^2 I)
SDES = {
    "vp": sde_lib.VPSDE(0.1, 20.0, 1000),
    "subvp": sde_lib.subVPSDE(0.1, 20.0, 1000),
    "ve": sde_lib.VESDE(0.01, 50.0, 1000),
}


def exact_score_model(sde):
    """model_fn(x, model_t) returning the exact score of the Gaussian data's p_t."""

    def model_fn(x, model_t):
        t = model_t / (sde.N - 1)
        alpha, std = sde.marginal_coeffs(t)
        var = (alpha**2 * S**2 + std**2)[:, None]
        return -(x - alpha[:, None] * MU) / var

    return model_fn


def _coeffs64(name, t):
    one = np.ones((t.size, 1))
    marg = {"vp": ref.vp_marginal, "subvp": ref.subvp_marginal, "ve": ref.ve_marginal}[name]
    params = (0.01, 50.0) if name == "ve" else (0.1, 20.0)
    a, sd = marg(*params, one, t)
    return a.reshape(-1), sd


@pytest.mark.parametrize("name", sorted(SDES))
def test_parameterisations_convert_to_the_same_score(name, rng):
    sde = SDES[name]
    t = np.array([0.05, 0.3, 0.9])  # x0 -> eps divides by std: ill-conditioned near 0
    x = rng.standard_normal((3, 4))
    a, sd = _coeffs64(name, t)
    score = ref.gaussian_score(x, MU, S, a, sd)
    eps = -score * sd[:, None]
    x0 = (x + sd[:, None] ** 2 * score) / a[:, None]
    v = a[:, None] * eps - sd[:, None] * x0
    for param, out in {"score": score, "eps": eps, "x0": x0, "v": v}.items():
        got = sde_losses.output_to_score(sde, jnp.asarray(out, jnp.float32),
                                         jnp.asarray(x, jnp.float32),
                                         jnp.asarray(t, jnp.float32), param)
        np.testing.assert_allclose(got, score, rtol=2e-3, atol=1e-4, err_msg=param)
    got_x0 = sde_losses.score_to_x0(sde, jnp.asarray(score, jnp.float32),
                                    jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(got_x0, x0, rtol=1e-3, atol=1e-4)


def _data(key, n, d=2):
    return MU + S * jax.random.normal(key, (n, d))


@pytest.mark.parametrize("name", sorted(SDES))
def test_dsm_loss_of_the_exact_score_is_its_closed_form_minimum(name):
    # E||std s* + z||^2 per dim given t = a^2 s^2 / (a^2 s^2 + std^2) for the exact s*.
    sde = SDES[name]
    x0 = _data(jax.random.key(1), 20000)
    out = sde_losses.dsm_loss(sde, exact_score_model(sde), x0, key=jax.random.key(2))
    a, sd = _coeffs64(name, np.asarray(out["t"], np.float64))
    want = a**2 * S**2 / (a**2 * S**2 + sd**2)
    loss = np.asarray(out["loss"], np.float64)
    tol = 4.0 * np.std(loss - want) / np.sqrt(loss.size)  # 4 standard errors
    assert abs(loss.mean() - want.mean()) < tol
    # A score half as large is caught: its loss is larger by more than the tolerance.
    worse = sde_losses.dsm_loss(sde, lambda x, mt: 0.5 * exact_score_model(sde)(x, mt), x0,
                                key=jax.random.key(2))
    assert float(jnp.mean(worse["loss"])) > want.mean() + 3 * tol


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_likelihood_weighting_with_and_without_importance_sampling(name):
    # Both estimate (1/(1-eps)) int g^2 a^2 s^2 / (std^2 (a^2 s^2 + std^2)) dt (float64
    # quadrature here) for the exact score; per dim (reduce_mean).
    sde, eps = SDES[name], 1e-5
    t = np.linspace(eps, 1.0, 400001)
    a, sd = _coeffs64(name, t)
    one = np.ones((t.size, 1))
    g = (ref.ve_sde(0.01, 50.0, one, t) if name == "ve" else ref.vp_sde(0.1, 20.0, one, t))[1]
    integrand = g**2 * a**2 * S**2 / (sd**2 * (a**2 * S**2 + sd**2))
    want = np.trapezoid(integrand, t) / (1.0 - eps)
    x0 = _data(jax.random.key(3), 40000)
    model = exact_score_model(sde)
    for importance in (False, True):
        out = sde_losses.dsm_loss(sde, model, x0, key=jax.random.key(4), weighting="likelihood",
                                  importance_sampling=importance)
        loss = np.asarray(out["loss"], np.float64)
        tol = 4.0 * loss.std() / np.sqrt(loss.size)
        assert abs(loss.mean() - want) < tol, (importance, loss.mean(), want, tol)
        if importance and name == "vp":  # VE's p(t) is uniform
            assert loss.std() < 0.5 * uniform_std  # the point of importance sampling
        else:
            uniform_std = loss.std()


def test_reduce_sum_is_dims_times_mean():
    sde = SDES["vp"]
    x0 = _data(jax.random.key(5), 8, d=3)
    kw = dict(key=jax.random.key(6))
    mean = sde_losses.dsm_loss(sde, exact_score_model(sde), x0, **kw)["loss"]
    total = sde_losses.dsm_loss(sde, exact_score_model(sde), x0, reduce_mean=False, **kw)["loss"]
    np.testing.assert_allclose(total, 3.0 * mean, rtol=1e-6)


def test_bad_inputs():
    sde, x0 = SDES["vp"], jnp.zeros((2, 2))
    model = exact_score_model(sde)
    with pytest.raises(ValueError, match="'std2', 'likelihood'"):
        sde_losses.dsm_loss(sde, model, x0, key=jax.random.key(0), weighting="l2")
    with pytest.raises(ValueError, match="'score', 'eps', 'x0', 'v'"):
        sde_losses.dsm_loss(sde, model, x0, key=jax.random.key(0), parameterization="xstart")
    with pytest.raises(ValueError, match="t must lie in"):
        sde_losses.dsm_loss(sde, model, x0, key=jax.random.key(0), t=jnp.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="VPSDE and VESDE"):
        sde_losses.dsm_loss(SDES["subvp"], model, x0, key=jax.random.key(0),
                            weighting="likelihood", importance_sampling=True)
    with pytest.raises(ValueError, match="needs weighting 'likelihood'"):
        sde_losses.dsm_loss(sde, model, x0, key=jax.random.key(0), importance_sampling=True)
