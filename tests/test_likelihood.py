"""The full bound: consistency with the per-step terms, the 2015 sanity check, compilation."""

import math

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import gaussian, likelihood, losses, schedules
from diffusion_jax.schedules import Schedule

SCHED = schedules.get_schedule("cosine", 50)


def _model(x_t, t, scale):
    return jnp.tanh(scale * x_t) + (t.astype(jnp.float32) / 50.0).reshape((-1,) + (1,) * (x_t.ndim - 1))


def _images(rng, shape=(3, 4, 4, 3)):
    # 8-bit values scaled to [-1, 1], as the discretized decoder expects.
    return jnp.asarray(rng.integers(0, 256, shape) / 127.5 - 1.0, jnp.float32)


def test_total_is_sum_of_terms_and_terms_match_vb_terms_bpd(rng):
    x0 = _images(rng)
    noise = jnp.asarray(rng.standard_normal((50,) + x0.shape), jnp.float32)
    model = Partial(_model, scale=0.7)
    out = likelihood.calc_bpd_loop(
        SCHED, model, x0, noise=noise, mean_type="eps", var_type="fixed_large"
    )
    np.testing.assert_allclose(
        out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-5
    )
    np.testing.assert_allclose(out["prior_bpd"], losses.prior_bpd(SCHED, x0), rtol=1e-6)
    for step in [0, 1, 25, 49]:
        t = jnp.full((3,), step, jnp.int32)
        x_t = gaussian.q_sample(SCHED, x0, t, noise=noise[step])
        direct = losses.vb_terms_bpd(
            SCHED, model(x_t, t), x0, x_t, t, mean_type="eps", var_type="fixed_large",
            clip_denoised=True,
        )
        np.testing.assert_allclose(out["vb"][:, step], direct["output"], rtol=1e-5)
        eps = gaussian.predict_eps_from_xstart(SCHED, x_t, t, direct["pred_xstart"])
        np.testing.assert_allclose(
            out["mse"][:, step], losses.mean_flat((eps - noise[step]) ** 2), rtol=1e-4
        )
        np.testing.assert_allclose(
            out["xstart_mse"][:, step], losses.mean_flat((direct["pred_xstart"] - x0) ** 2),
            rtol=1e-5,
        )


def test_key_draws_noise_per_step_with_fold_in(rng):
    """Documented replay contract: step t uses normal(fold_in(key, t))."""
    x0 = _images(rng)
    key = jax.random.key(7)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, t), x0.shape) for t in range(50)])
    kw = dict(mean_type="eps", var_type="fixed_small")
    a = likelihood.calc_bpd_loop(SCHED, Partial(_model, scale=1.0), x0, key=key, **kw)
    b = likelihood.calc_bpd_loop(SCHED, Partial(_model, scale=1.0), x0, noise=noise, **kw)
    np.testing.assert_allclose(a["total_bpd"], b["total_bpd"], rtol=1e-6)


def test_bound_equals_entropy_for_gaussian_data_with_the_exact_reverse_model():
    """Sohl-Dickstein et al. 2015's check: for x_0 ~ N(0, I) every marginal is N(0, I) and
    the true reverse kernel is q(x_{t-1} | x_t) = N(sqrt(alpha_t) x_t, beta_t). With it
    the bound is tight: for each x_0 its expectation is -log N(x_0; 0, I), and over the
    data it is the entropy, 0.5 log2(2 pi e) = 2.047 bits/dim.

    Tolerance: 4 standard errors of the batch mean (the only randomness is x_0 and x_t).
    """
    sched = schedules.get_schedule("linear", 100)
    batch, dim = 4000, 2
    x0 = jax.random.normal(jax.random.key(0), (batch, dim))
    alphas, log_betas = sched.alphas, jnp.log(sched.betas)

    def exact_reverse(x_t, t):
        mean = jnp.sqrt(alphas[t])[:, None] * x_t
        return jnp.concatenate([mean, jnp.broadcast_to(log_betas[t][:, None], x_t.shape)], -1)

    out = likelihood.calc_bpd_loop(
        sched, exact_reverse, x0, key=jax.random.key(1), mean_type="xprev",
        var_type="learned", clip_denoised=False, decoder_type="gaussian",
    )
    total = np.asarray(out["total_bpd"], np.float64)
    nll = np.asarray(
        -losses.mean_flat(losses.gaussian_log_likelihood(
            x0, means=jnp.zeros_like(x0), log_scales=jnp.zeros_like(x0))) / math.log(2),
        np.float64,
    )
    # Per example: only the x_t sampling is random around -log p(x_0).
    diff = total - nll
    assert abs(diff.mean()) < 4 * diff.std() / np.sqrt(batch)
    entropy = 0.5 * math.log2(2 * math.pi * math.e)
    assert abs(total.mean() - entropy) < 4 * total.std() / np.sqrt(batch)
    # And a model that is not exact gives a looser bound.
    loose = likelihood.calc_bpd_loop(
        sched, lambda x, t: exact_reverse(0.9 * x, t), x0, key=jax.random.key(1),
        mean_type="xprev", var_type="learned", clip_denoised=False, decoder_type="gaussian",
    )
    assert float(loose["total_bpd"].mean()) > total.mean() + 10 * total.std() / np.sqrt(batch)


def test_compiles_once_per_shape(rng):
    traces = []

    def model(scale, x_t, t):
        traces.append(1)
        return _model(x_t, t, scale)

    x0 = _images(rng)
    for scale in [0.5, 0.9, 1.3]:  # new parameters, same shapes: no retrace
        likelihood.calc_bpd_loop(
            SCHED, Partial(model, jnp.float32(scale)), x0, key=jax.random.key(0),
            mean_type="eps", var_type="fixed_small",
        )
    assert len(traces) == 1


def test_bound_gradient_wrt_betas_matches_finite_differences(rng):
    with jax.enable_x64(True):
        x0 = jnp.asarray(rng.uniform(-1, 1, (4, 2)))
        noise = jnp.asarray(rng.standard_normal((8, 4, 2)))

        @jax.jit
        def total(betas):
            out = likelihood.calc_bpd_loop(
                Schedule.from_betas(betas), lambda x, t: 0.3 * x, x0, noise=noise,
                mean_type="eps", var_type="fixed_small", decoder_type="gaussian",
            )
            return jnp.mean(out["total_bpd"])

        betas = jnp.asarray(np.linspace(0.05, 0.4, 8))
        assert np.isfinite(np.asarray(jax.grad(total)(betas))).all()
        jax.test_util.check_grads(total, (betas,), order=1, modes=["rev"], eps=1e-6)


def test_bad_inputs(rng):
    x0 = _images(rng)
    kw = dict(mean_type="eps", var_type="fixed_small")
    with pytest.raises(ValueError, match="exactly one of `key` and `noise`"):
        likelihood.calc_bpd_loop(SCHED, _model, x0, **kw)
    with pytest.raises(ValueError, match=r"\(T, \*x_start.shape\) = \(50, 3, 4, 4, 3\); got \(49, 3, 4, 4, 3\)"):
        likelihood.calc_bpd_loop(SCHED, _model, x0, noise=jnp.zeros((49,) + x0.shape), **kw)
    with pytest.raises(ValueError, match="model_fn must be callable"):
        likelihood.calc_bpd_loop(SCHED, "unet", x0, key=jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="var_type 'fixed'"):
        likelihood.calc_bpd_loop(SCHED, _model, x0, key=jax.random.key(0), mean_type="eps", var_type="fixed")
