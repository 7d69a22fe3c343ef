"""Flow matching: paths, targets and conversions against float64 references; the velocity
ODE and its exact log-likelihood on Gaussian data against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import flow_reference as ref
from diffusion_jax import flow, ode, sde
from diffusion_jax.sampling import flow as flow_sampling

TIMES = np.array([0.03, 0.25, 0.5, 0.8, 0.97])
MU, STD = 0.4, 0.6  # data N(MU, STD^2 I)


@pytest.mark.parametrize("name", list(flow.PATHS))
def test_path_coefficients_and_derivatives(name):
    got = flow.get_path(name).coeffs(jnp.asarray(TIMES, jnp.float32))
    want = ref.path_coeffs(name, TIMES)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=3e-5, atol=1e-6)
    h = 1e-6  # the reference's derivatives against its own central differences
    for k in (0, 1):
        fd = (ref.path_coeffs(name, TIMES + h)[k] - ref.path_coeffs(name, TIMES - h)[k]) / (2 * h)
        np.testing.assert_allclose(want[k + 2], fd, rtol=1e-6)


def test_vp_path_is_score_sde_vp_in_reversed_time():
    t = jnp.asarray(TIMES, jnp.float32)
    alpha, sigma, _, _ = flow.VPPath().coeffs(t)
    want_alpha, want_std = sde.VPSDE(beta_min=0.1, beta_max=20.0, N=1000).marginal_coeffs(
        flow.to_score_sde_time(t))
    np.testing.assert_allclose(alpha, want_alpha, rtol=1e-5)
    np.testing.assert_allclose(sigma, want_std, rtol=1e-5)


def _example(rng, name):
    x1 = rng.normal(size=(5, 3)) + 0.5
    x0 = rng.normal(size=(5, 3))
    return x1, x0, ref.xt_and_target(name, x1, x0, TIMES)


@pytest.mark.parametrize("name", list(flow.PATHS))
def test_path_sample_and_every_conversion(name, rng):
    path = flow.get_path(name)
    x1, x0, (x_t, target) = _example(rng, name)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    t = f32(TIMES)
    got_xt, got_target = flow.path_sample(path, f32(x1), t, f32(x0))
    np.testing.assert_allclose(got_xt, x_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_target, target, rtol=1e-5, atol=1e-5)
    outputs = ref.all_parameterizations(name, x1, x0, TIMES)
    for source in flow.PARAMETERIZATIONS:
        for target_name in flow.PARAMETERIZATIONS:
            got = flow.convert(path, f32(outputs[source]), f32(x_t), t, source=source,
                               target=target_name)
            np.testing.assert_allclose(got, outputs[target_name], rtol=2e-4, atol=2e-4,
                                       err_msg=f"{source} -> {target_name}")


def test_velocity_loss_matches_the_reference_and_prefers_the_true_field(rng):
    path = flow.get_path("cond_ot")
    x1, x0, (x_t, target) = _example(rng, "cond_ot")
    model = Partial(lambda bias, x, t: x * 0.5 + bias, 0.1)
    out = flow.velocity_loss(path, model, jnp.asarray(x1, jnp.float32), t=jnp.asarray(TIMES),
                             noise=jnp.asarray(x0, jnp.float32))
    np.testing.assert_allclose(out["loss"], ((x_t * 0.5 + 0.1 - target) ** 2).mean(1), rtol=1e-5)
    # Monte Carlo over t and x_0: the marginal field has the lower loss.
    data = MU + STD * jax.random.normal(jax.random.key(1), (4000, 2))
    exact = Partial(_gaussian_velocity, flow.CondOTPath())
    worse = Partial(lambda x, t: _gaussian_velocity(flow.CondOTPath(), x, t) + 0.2)
    keyed = dict(key=jax.random.key(2))
    best = float(jnp.mean(flow.velocity_loss(path, exact, data, **keyed)["loss"]))
    other = float(jnp.mean(flow.velocity_loss(path, worse, data, **keyed)["loss"]))
    # E||v + 0.2 - u||^2 - E||v - u||^2 = 0.04 + 0.4 E[v - u] = 0.04 (E[u | x_t] = v); with the
    # same draws the estimate's error is 0.4 mean(v - u): 4 standard errors, sd(u - v) < 1.2.
    assert abs(other - best - 0.04) < 4 * 0.4 * 1.2 / math.sqrt(data.size)


def _gaussian_velocity(path, x, t):
    """The exact marginal velocity of N(MU, STD^2) data, in JAX (the reference's formula)."""
    a, s, da, ds = (c[:, None] for c in path.coeffs(t))
    return da * MU + (a * da * STD**2 + s * ds) / (a**2 * STD**2 + s**2) * (x - a * MU)


def test_closed_form_velocity_matches_the_reference():
    x = np.linspace(-2, 2, 10).reshape(5, 2)
    for name in flow.PATHS:
        np.testing.assert_allclose(
            _gaussian_velocity(flow.get_path(name), jnp.asarray(x, jnp.float32), jnp.asarray(TIMES, jnp.float32)),
            ref.gaussian_velocity(name, x, TIMES, MU, STD), rtol=1e-4, atol=1e-5)


# Measured max errors over 8000 coordinates: cond_ot Euler-100 0.029, Heun-25 0.0009, Tsit5
# 1e-4 (37 evaluations); cosine Euler-100 0.0059, Heun-25 0.0019, Tsit5 5e-5. (Gaussian
# data's trajectories are curved even on the conditional OT path.)
@pytest.mark.parametrize("name,solver,steps,tol", [
    ("cond_ot", "euler", 100, 0.05), ("cond_ot", "heun", 25, 2e-3), ("cond_ot", "tsit5", None, 5e-4),
    ("cosine", "heun", 25, 4e-3), ("cosine", "tsit5", None, 5e-4)])
def test_ode_maps_noise_to_data_deterministically(name, solver, steps, tol):
    """On a path with alpha_0 = 0, sigma_0 = 1, the flow sends x_0 to MU + STD x_0: every
    standardised coordinate (x - alpha MU) / sqrt(alpha^2 STD^2 + sigma^2) is constant."""
    x0 = jax.random.normal(jax.random.key(7), (4000, 2))
    out = flow_sampling.sample_ode(Partial(_gaussian_velocity, flow.get_path(name)), x0=x0, solver=solver,
                                   num_steps=steps)
    np.testing.assert_allclose(out["sample"], MU + STD * np.asarray(x0), atol=tol, rtol=tol)
    x = np.asarray(out["sample"], np.float64)
    assert abs(x.mean() - MU) < 4 * STD / math.sqrt(x.size)
    assert abs(x.var() / STD**2 - 1) < 4 * math.sqrt(2 / x.size)
    again = flow_sampling.sample_ode(Partial(_gaussian_velocity, flow.get_path(name)), x0=x0, solver=solver,
                                     num_steps=steps)
    np.testing.assert_array_equal(again["sample"], out["sample"])


@pytest.mark.parametrize("name", ["cond_ot", "cosine"])
def test_exact_log_likelihood_equals_the_closed_form(name):
    x = np.asarray(MU + STD * jax.random.normal(jax.random.key(8), (16, 3)), np.float64)
    out = flow.log_likelihood(Partial(_gaussian_velocity, flow.get_path(name)),
                              jnp.asarray(x, jnp.float32), rtol=1e-6, atol=1e-6)
    want = ref.gaussian_logp(x, MU, STD)
    np.testing.assert_allclose(out["log_likelihood"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["bpd"], -want / (3 * math.log(2)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["x0"], (x - MU) / STD, rtol=1e-4, atol=1e-4)


def test_hutchinson_log_likelihood_is_unbiased():
    """Here J = c(t) I, so v^T J v = c(t) ||v||^2 with Gaussian probes: the estimate's error
    is (int c dt) (||v||^2 / D - 1) = log(STD) (chi2_3 / 3 - 1) per probe; 32 probes x 16
    examples, sd |log 0.6| sqrt(2 / 3 / 512) = 0.018; the test allows 0.1."""
    x = np.asarray(MU + STD * jax.random.normal(jax.random.key(8), (16, 3)), np.float64)
    hutch = flow.log_likelihood(Partial(_gaussian_velocity, flow.CondOTPath()),
                                jnp.asarray(x, jnp.float32), divergence="hutchinson",
                                key=jax.random.key(9), num_probes=32, probe="gaussian",
                                solver="heun", num_steps=50)
    err = np.asarray(hutch["log_likelihood"]) - ref.gaussian_logp(x, MU, STD)
    assert abs(err.mean()) < 0.1 and err.std() > 1e-3  # noisy, yet unbiased


@pytest.mark.parametrize("call,match", [
    (lambda: flow.get_path("rectified"), r"valid values are \['cond_ot', 'cosine', 'vp'\]"),
    (lambda: flow.get_path("vp", beta_min=5.0, beta_max=1.0), "0 < beta_min < beta_max"),
    (lambda: flow.get_path("cond_ot", beta_min=5.0), "takes no parameters"),
    (lambda: flow.convert(flow.CondOTPath(), jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.ones(1),
                          source="x0", target="velocity"), "Unknown parameterization 'x0'"),
    (lambda: flow_sampling.sample_ode(Partial(_gaussian_velocity, flow.CondOTPath()), (2, 2),
                                      key=jax.random.key(0), solver="rk4"), "Unknown solver"),
    (lambda: flow_sampling.sample_ode(Partial(_gaussian_velocity, flow.CondOTPath()), (2, 2),
                                      key=jax.random.key(0), solver="euler"), "needs num_steps"),
    (lambda: flow_sampling.sample_ode(Partial(_gaussian_velocity, flow.CondOTPath()), (2, 2)),
     "needs `x0`"),
    (lambda: flow.log_likelihood(Partial(_gaussian_velocity, flow.CondOTPath()), jnp.ones((2, 2)),
                                 divergence="hutchinson"), "needs `key`"),
    (lambda: flow.log_likelihood(Partial(_gaussian_velocity, flow.CondOTPath()), jnp.ones((2, 2)),
                                 divergence="skilling"), "Unknown divergence"),
    (lambda: flow.velocity_loss(flow.CondOTPath(), Partial(_gaussian_velocity, flow.CondOTPath()),
                                jnp.ones((2, 2))), "needs `key`"),
])
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
