"""KL, decoders, bound terms and training losses: identities, gradients, bad input."""

import math

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_jax import gaussian, losses, schedules
from diffusion_jax.schedules import Schedule

SCHED = schedules.get_schedule("linear", 1000)
finite = st.floats(-5, 5, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(finite, finite, finite, finite)
def test_normal_kl_nonnegative_and_zero_for_equal(m1, lv1, m2, lv2):
    kl = float(losses.normal_kl(m1, lv1, m2, lv2))
    assert kl >= -1e-5
    assert abs(float(losses.normal_kl(m1, lv1, m1, lv1))) < 1e-6


def test_normal_kl_monte_carlo():
    """E_p[log p - log q] over 400,000 draws, within 5 standard errors."""
    rng = np.random.default_rng(0)
    m1, lv1, m2, lv2 = 0.3, -0.5, -0.2, 0.4
    x = m1 + np.exp(lv1 / 2) * rng.standard_normal(400_000)

    def logn(x, m, lv):
        return -0.5 * (np.log(2 * np.pi) + lv + (x - m) ** 2 / np.exp(lv))

    d = logn(x, m1, lv1) - logn(x, m2, lv2)
    kl = float(losses.normal_kl(m1, lv1, m2, lv2))
    assert abs(d.mean() - kl) < 5 * d.std() / np.sqrt(len(d))


@pytest.mark.parametrize("mean", [-1.0, -0.3, 0.0, 0.9, 1.0, 1.6])
@pytest.mark.parametrize("log_scale", [-7.0, -4.0, -1.0, 0.5])
def test_decoder_bins_sum_to_one(mean, log_scale):
    """The 256 bins partition the line, so their probabilities sum to 1.

    The 1e-12 floor adds at most 256e-12, and float32 sums carry ~1e-6 error.
    """
    x = jnp.linspace(-1.0, 1.0, 256, dtype=jnp.float32)
    ll = losses.discretized_gaussian_log_likelihood(
        x, means=jnp.full_like(x, mean), log_scales=jnp.full_like(x, log_scale)
    )
    assert abs(float(jnp.sum(jnp.exp(ll))) - 1.0) < 2e-5


def test_decoder_float32_tracks_float64_in_the_tails():
    """Far from the mean the naive CDF difference cancels in float32; log space does not."""
    x = np.linspace(-1, 1, 256)
    means = np.array([-0.8, 0.0, 0.5])
    log_scales = np.array([-6.0, -4.5, -3.0, -2.0])
    X, M, L = [a.ravel() for a in np.meshgrid(x, means, log_scales, indexing="ij")]
    f32 = np.asarray(
        losses.discretized_gaussian_log_likelihood(
            jnp.asarray(X, jnp.float32), means=jnp.asarray(M, jnp.float32),
            log_scales=jnp.asarray(L, jnp.float32),
        )
    )
    with jax.enable_x64(True):
        f64 = np.asarray(
            losses.discretized_gaussian_log_likelihood(
                jnp.asarray(X, jnp.float64), means=jnp.asarray(M, jnp.float64),
                log_scales=jnp.asarray(L, jnp.float64),
            )
        )
    assert f64.dtype == np.float64
    # Inputs rounded to float32 move x - mean by ~1e-7, i.e. up to ~4e-5 scales at
    # log_scale -6; the log-probability's slope there (~z) bounds the difference.
    np.testing.assert_allclose(f32, f64, rtol=1e-4, atol=1e-4)
    # The comparison covers the tails: many bins are far below 1e-4 but above the floor.
    assert np.sum((f64 < np.log(1e-4)) & (f64 > np.log(1e-12) + 1e-3)) > 20


def test_decoder_gradients_are_finite_everywhere():
    x = jnp.linspace(-1.0, 1.0, 256, dtype=jnp.float32)
    for mean, log_scale in [(5.0, -8.0), (-3.0, -12.0), (0.0, -30.0), (0.3, 2.0)]:
        g = jax.grad(
            lambda m, s: jnp.sum(
                losses.discretized_gaussian_log_likelihood(
                    x, means=jnp.full_like(x, m), log_scales=jnp.full_like(x, s)
                )
            ),
            argnums=(0, 1),
        )(mean, log_scale)
        assert all(np.isfinite(v) for v in g), (mean, log_scale, g)


def test_gaussian_log_likelihood_integrates_to_one():
    x = jnp.linspace(-10, 10, 20001)
    ll = losses.gaussian_log_likelihood(
        x, means=jnp.full_like(x, 0.4), log_scales=jnp.full_like(x, -0.3)
    )
    assert abs(float(jnp.sum(jnp.exp(ll))) * 20.0 / 20000 - 1.0) < 1e-4


def test_decoder_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape; got \(3,\), \(4,\) and \(3,\)"):
        losses.discretized_gaussian_log_likelihood(
            jnp.zeros(3), means=jnp.zeros(4), log_scales=jnp.zeros(3)
        )


def _linear_model(x_t, t, out_channels=None):
    """A fixed smooth 'network': a channel mix plus a t-dependent offset."""
    c = x_t.shape[-1]
    out_channels = out_channels or c
    w = jnp.sin(jnp.arange(c * out_channels, dtype=jnp.float32)).reshape(c, out_channels) * 0.3
    return x_t @ w + (t.astype(jnp.float32) / 1000.0).reshape((-1,) + (1,) * (x_t.ndim - 1))


def test_perfect_eps_model_has_zero_mse(rng):
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.array([0, 100, 999], jnp.int32)
    out = losses.training_losses(
        SCHED, lambda xt, tt: noise, x0, t, noise=noise,
        mean_type="eps", var_type="fixed_small", loss_type="mse",
    )
    np.testing.assert_allclose(out["loss"], 0.0, atol=1e-12)


def test_loss_types_relate_as_documented(rng):
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 2)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.array([0, 3, 999], jnp.int32)
    model = lambda xt, tt: jnp.tanh(_linear_model(xt, tt, 4))  # noqa: E731
    kw = dict(noise=noise, mean_type="eps", var_type="learned_range")
    kl = losses.training_losses(SCHED, model, x0, t, loss_type="kl", **kw)
    rkl = losses.training_losses(SCHED, model, x0, t, loss_type="rescaled_kl", **kw)
    hyb = losses.training_losses(SCHED, model, x0, t, loss_type="hybrid", **kw)
    bnd = losses.training_losses(SCHED, model, x0, t, loss_type="bound", **kw)
    np.testing.assert_allclose(rkl["loss"], 1000 * kl["loss"], rtol=1e-6)
    np.testing.assert_allclose(hyb["loss"], hyb["mse"] + kl["vb"], rtol=1e-6)
    np.testing.assert_allclose(bnd["loss"], 1000 * kl["vb"] + bnd["prior_bpd"], rtol=1e-6)
    prior = losses.prior_bpd(SCHED, x0)
    np.testing.assert_allclose(bnd["prior_bpd"], prior)


def test_hybrid_vb_term_does_not_train_the_mean(rng):
    """With L_hybrid, the gradient reaching the mean channels is that of L_simple alone."""
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 3, 3, 2)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.array([0, 5, 50, 500], jnp.int32)
    xt = gaussian.q_sample(SCHED, x0, t, noise=noise)
    base = jnp.tanh(_linear_model(xt, t, 4))

    def loss(out, loss_type):
        return jnp.sum(
            losses.training_losses_from_output(
                SCHED, out, x0, xt, t, noise, mean_type="eps", var_type="learned_range",
                loss_type=loss_type,
            )["loss"]
        )

    g_hybrid = jax.grad(loss)(base, "hybrid")
    g_mse = jax.grad(lambda o: jnp.sum(losses.mean_flat(jnp.square(noise - o[..., :2]))))(base)
    np.testing.assert_allclose(g_hybrid[..., :2], g_mse[..., :2], rtol=1e-6)
    assert float(jnp.abs(g_hybrid[..., 2:]).max()) > 0.0  # the variance is trained
    g_kl = jax.grad(loss)(base, "kl")
    assert float(jnp.abs(g_kl[..., :2]).max()) > 0.0  # while kl does train the mean


def test_bound_gradient_wrt_betas_matches_finite_differences():
    """d(bound loss)/d(betas), float64, against central differences (jax.test_util)."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        T = 12
        x0 = jnp.asarray(rng.uniform(-1, 1, (6, 2, 2, 1)))
        noise = jnp.asarray(rng.standard_normal(x0.shape))
        t = jnp.arange(6) * 2
        betas0 = jnp.asarray(np.linspace(0.01, 0.3, T))

        @jax.jit  # traced betas: the finite differences take the same (JAX) path
        def bound(betas):
            sched = Schedule.from_betas(betas)
            out = losses.training_losses(
                sched, lambda xt, tt: 0.5 * xt, x0, t, noise=noise,
                mean_type="eps", var_type="fixed_large", loss_type="bound",
                decoder_type="gaussian",
            )
            return jnp.mean(out["loss"])

        grad = jax.grad(bound)(betas0)
        assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
        jax.test_util.check_grads(bound, (betas0,), order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(loss_type="l2"), r"loss_type 'l2'.*\['mse', 'kl', 'rescaled_kl', 'hybrid', 'bound'\]"),
        (dict(loss_type="mse", var_type="learned"), r"'mse' cannot train var_type 'learned'"),
        (dict(loss_type="hybrid", var_type="fixed_small"), r"'hybrid'.*would equal 'mse'"),
        (dict(mean_type="score"), r"mean_type 'score'"),
        (dict(decoder_type="logistic"), r"decoder_type 'logistic'.*discretized.*gaussian"),
    ],
)
def test_bad_loss_configs(kw, match, rng):
    x0 = jnp.asarray(rng.uniform(-1, 1, (2, 3)), jnp.float32)
    args = dict(mean_type="eps", var_type="fixed_small", loss_type="kl") | kw
    with pytest.raises(ValueError, match=match):
        losses.training_losses(
            SCHED, lambda xt, tt: jnp.zeros((2, 6)) if "learned" in args["var_type"] else xt,
            x0, jnp.array([1, 2]), key=jax.random.key(0), **args,
        )


def test_training_losses_wrong_output_channels(rng):
    x0 = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 6\) for var_type 'learned'.*\(2, 4, 4, 3\)"):
        losses.training_losses(
            SCHED, lambda xt, tt: xt, x0, jnp.array([1, 2]), key=jax.random.key(0),
            mean_type="eps", var_type="learned", loss_type="hybrid",
        )


def test_training_losses_compiles_once(rng):
    traces = []

    @jax.jit
    def step(x0, t, key):
        traces.append(1)
        return losses.training_losses(
            SCHED, _linear_model, x0, t, key=key, mean_type="eps", var_type="fixed_small",
            loss_type="mse",
        )["loss"]

    for i in range(3):
        x0 = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
        step(x0, jnp.array([i, 10 * i], jnp.int32), jax.random.key(i))
    assert len(traces) == 1
    assert math.isfinite(float(step(x0, jnp.array([1, 2]), jax.random.key(9))[0]))
