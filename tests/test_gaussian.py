"""Gaussian diffusion: identities, Monte Carlo checks of the posterior, transforms, errors.

Float64 NumPy comparisons of every function live in test_reference.py; this file checks
properties that hold whatever the formula's spelling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import gaussian, schedules

SCHED = schedules.get_schedule("linear", 1000)


def _batch(rng, shape=(4, 4, 4, 3)):
    return jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_monte_carlo_of_the_forward_chain(t):
    """Regress x_{t-1} on x_t over forward-chain samples given x_0.

    (x_{t-1}, x_t) | x_0 is jointly Gaussian, so E[x_{t-1} | x_t, x_0] is linear in x_t with
    slope coef2 and intercept coef1 x_0, and the residual variance is beta-tilde_t.
    Tolerance: 5 standard errors of each estimate (n = 400,000 draws, float64).
    """
    rng = np.random.default_rng(t)
    n, x0 = 400_000, 0.7
    abar = np.asarray(SCHED.alphas_cumprod, np.float64)
    betas = np.asarray(SCHED.betas, np.float64)
    x_prev = np.sqrt(abar[t - 1]) * x0 + np.sqrt(1 - abar[t - 1]) * rng.standard_normal(n)
    x_t = np.sqrt(1 - betas[t]) * x_prev + np.sqrt(betas[t]) * rng.standard_normal(n)
    slope, intercept = np.polyfit(x_t, x_prev, 1)
    resid_var = np.var(x_prev - (slope * x_t + intercept), ddof=2)
    se_slope = np.sqrt(resid_var / (n * np.var(x_t)))
    se_intercept = np.sqrt(resid_var * np.mean(x_t**2) / (n * np.var(x_t)))
    se_var = resid_var * np.sqrt(2.0 / n)

    probe = jnp.array([[0.0], [1.0]], jnp.float32)
    mean, var, _ = gaussian.q_posterior_mean_variance(
        SCHED, jnp.full((2, 1), x0, jnp.float32), probe, jnp.array([t, t], jnp.int32)
    )
    lib_intercept, lib_slope = float(mean[0, 0]), float(mean[1, 0] - mean[0, 0])
    assert abs(lib_slope - slope) < 5 * se_slope + 1e-6
    assert abs(lib_intercept - intercept) < 5 * se_intercept + 1e-6
    assert abs(float(var[0, 0]) - resid_var) < 5 * se_var


def test_q_sample_moments_monte_carlo():
    """Mean and variance of q(x_t | x_0) over 200,000 draws, within 5 standard errors."""
    n, t = 200_000, 300
    x0 = jnp.full((n, 1), -0.4, jnp.float32)
    tt = jnp.full((n,), t, jnp.int32)
    xt = np.asarray(gaussian.q_sample(SCHED, x0, tt, key=jax.random.key(0)), np.float64)
    mean, var, log_var = gaussian.q_mean_variance(SCHED, x0[:1], tt[:1])
    assert abs(xt.mean() - float(mean[0, 0])) < 5 * np.sqrt(float(var[0, 0]) / n)
    assert abs(xt.var() - float(var[0, 0])) < 5 * float(var[0, 0]) * np.sqrt(2 / n)
    np.testing.assert_allclose(np.exp(log_var), var, rtol=1e-6)


def test_prediction_round_trips(rng):
    x0 = _batch(rng)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.array([0, 1, 500, 999], jnp.int32)
    xt = gaussian.q_sample(SCHED, x0, t, noise=noise)
    np.testing.assert_allclose(
        gaussian.predict_xstart_from_eps(SCHED, xt, t, noise), x0, atol=2e-3
    )
    np.testing.assert_allclose(
        gaussian.predict_eps_from_xstart(SCHED, xt, t, x0), noise, rtol=1e-3, atol=2e-3
    )
    v = gaussian.predict_v(SCHED, x0, t, noise)
    np.testing.assert_allclose(gaussian.predict_xstart_from_v(SCHED, xt, t, v), x0, atol=1e-5)
    mean, _, _ = gaussian.q_posterior_mean_variance(SCHED, x0, xt, t)
    np.testing.assert_allclose(
        gaussian.predict_xstart_from_xprev(SCHED, xt, t, mean), x0, rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("mean_type", gaussian.MEAN_TYPES)
def test_exact_prediction_gives_the_posterior_mean(mean_type, rng):
    """Each parameterisation, fed its exact target, yields q(x_{t-1} | x_t, x_0)'s mean."""
    x0 = _batch(rng)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.array([3, 40, 200, 700], jnp.int32)
    xt = gaussian.q_sample(SCHED, x0, t, noise=noise)
    post_mean, post_var, post_log_var = gaussian.q_posterior_mean_variance(SCHED, x0, xt, t)
    output = {
        "eps": noise,
        "xstart": x0,
        "v": gaussian.predict_v(SCHED, x0, t, noise),
        "xprev": post_mean,
    }[mean_type]
    out = gaussian.p_mean_variance(
        SCHED, output, xt, t, mean_type=mean_type, var_type="fixed_small"
    )
    np.testing.assert_allclose(out.mean, post_mean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.variance, post_var)
    np.testing.assert_allclose(out.log_variance, post_log_var)


def test_learned_range_endpoints_and_fixed_variances(rng):
    x = _batch(rng, (3, 2, 2, 2))
    t = jnp.array([0, 5, 999], jnp.int32)
    mean_part = jnp.zeros_like(x)

    def log_var(v):
        out = jnp.concatenate([mean_part, jnp.full_like(x, v)], -1)
        return gaussian.p_mean_variance(
            SCHED, out, x, t, mean_type="eps", var_type="learned_range"
        ).log_variance

    small = gaussian.p_mean_variance(SCHED, mean_part, x, t, mean_type="eps", var_type="fixed_small")
    large = gaussian.p_mean_variance(SCHED, mean_part, x, t, mean_type="eps", var_type="fixed_large")
    np.testing.assert_allclose(log_var(-1.0), small.log_variance, rtol=1e-6)
    betas = np.asarray(SCHED.betas)
    expected_large = np.log(betas[[0, 5, 999]])
    np.testing.assert_allclose(log_var(1.0)[:, 0, 0, 0], expected_large, rtol=1e-6)
    # fixed_large uses beta-tilde_1 in place of beta_0 at t = 0.
    np.testing.assert_allclose(
        large.variance[:, 0, 0, 0],
        [float(SCHED.posterior_variance[1]), betas[5], betas[999]],
        rtol=1e-6,
    )


def test_clip_denoised_clips_pred_xstart(rng):
    x = _batch(rng)
    t = jnp.array([999, 999, 999, 999], jnp.int32)
    eps = 10.0 * jnp.ones_like(x)
    out = gaussian.p_mean_variance(
        SCHED, eps, x, t, mean_type="eps", var_type="fixed_small", clip_denoised=True
    )
    assert float(jnp.abs(out.pred_xstart).max()) <= 1.0
    raw = gaussian.p_mean_variance(SCHED, eps, x, t, mean_type="eps", var_type="fixed_small")
    assert float(jnp.abs(raw.pred_xstart).max()) > 1.0


def test_jit_vmap_and_grad(rng):
    x0 = _batch(rng)
    t = jnp.array([0, 1, 2, 3], jnp.int32)
    key = jax.random.key(1)
    eager = gaussian.q_sample(SCHED, x0, t, key=key)
    jitted = jax.jit(lambda s, x, t, k: gaussian.q_sample(s, x, t, key=k))(SCHED, x0, t, key)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    # vmap over a leading axis of single examples gives the batched result.
    noise = jax.random.normal(key, x0.shape)
    per_example = jax.vmap(
        lambda x, tt, n: gaussian.q_sample(SCHED, x[None], tt[None], noise=n[None])[0]
    )(x0, t, noise)
    np.testing.assert_allclose(per_example, gaussian.q_sample(SCHED, x0, t, noise=noise), rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(gaussian.q_sample(SCHED, x, t, noise=noise)))(x0)
    np.testing.assert_allclose(g[:, 0, 0, 0], np.asarray(SCHED.sqrt_alphas_cumprod)[:4], rtol=1e-6)


def test_out_of_range_t_under_jit_gives_nan_not_a_clamped_value(rng):
    x0 = _batch(rng, (2, 3))
    noise = jnp.zeros_like(x0)
    out = jax.jit(lambda t: gaussian.q_sample(SCHED, x0, t, noise=noise))(jnp.array([5, 1000]))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


# ---- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("t", [[-1, 0], [0, 1000]])
def test_t_out_of_range(t, rng):
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\).*got t = (-1|1000)"):
        gaussian.q_sample(SCHED, _batch(rng, (2, 3)), jnp.array(t), key=jax.random.key(0))


def test_t_wrong_dtype_and_shape(rng):
    x = _batch(rng, (2, 3))
    with pytest.raises(ValueError, match="integer array; got dtype float32"):
        gaussian.q_mean_variance(SCHED, x, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\).*got t with shape \(3,\)"):
        gaussian.q_mean_variance(SCHED, x, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"got t with shape \(\)"):
        gaussian.q_mean_variance(SCHED, x, jnp.array(1))


def test_noise_shape_mismatch_and_key_xor_noise(rng):
    x = _batch(rng, (2, 3))
    t = jnp.array([1, 2])
    with pytest.raises(ValueError, match=r"x_start \(2, 3\) and noise \(2, 4\)"):
        gaussian.q_sample(SCHED, x, t, noise=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="exactly one of `noise`"):
        gaussian.q_sample(SCHED, x, t)
    with pytest.raises(ValueError, match="exactly one of `noise`"):
        gaussian.q_sample(SCHED, x, t, noise=x, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"same shape; got x_start \(2, 3\) and x_t \(3, 3\)"):
        gaussian.q_posterior_mean_variance(SCHED, x, jnp.zeros((3, 3)), t)


def test_unknown_type_names_list_valid_ones(rng):
    x = _batch(rng, (2, 3))
    t = jnp.array([1, 2])
    with pytest.raises(ValueError, match=r"mean_type 'epsilon'.*\['eps', 'xstart', 'xprev', 'v'\]"):
        gaussian.p_mean_variance(SCHED, x, x, t, mean_type="epsilon", var_type="fixed_small")
    with pytest.raises(ValueError, match=r"var_type 'fixed'.*'fixed_small', 'fixed_large'"):
        gaussian.p_mean_variance(SCHED, x, x, t, mean_type="eps", var_type="fixed")


@pytest.mark.parametrize(
    "var_type, channels, match",
    [
        ("learned", 3, r"shape \(2, 5, 6\) for var_type 'learned'.*2C = 6 channels.*\(2, 5, 3\)"),
        ("learned_range", 4, r"\(2, 5, 6\).*got \(2, 5, 4\)"),
        ("fixed_small", 6, r"shape \(2, 5, 3\) for var_type 'fixed_small'.*C = 3.*\(2, 5, 6\)"),
    ],
)
def test_model_output_with_wrong_channel_count(var_type, channels, match, rng):
    x = _batch(rng, (2, 5, 3))
    out = jnp.zeros((2, 5, channels))
    with pytest.raises(ValueError, match=match):
        gaussian.p_mean_variance(SCHED, out, x, jnp.array([1, 2]), mean_type="eps", var_type=var_type)
