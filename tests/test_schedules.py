"""Schedules: named betas, derived-coefficient identities, traced betas, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import schedules
from diffusion_jax.schedules import Schedule


def test_linear_matches_ddpm_at_1000_and_keeps_shape_at_other_t():
    betas = schedules.linear_betas(1000)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=0, atol=1e-15)
    # T = 50: both ends scaled by 1000 / 50 = 20.
    np.testing.assert_allclose(schedules.linear_betas(50)[[0, -1]], [2e-3, 0.4], atol=1e-15)


def test_cosine_alphas_cumprod_follows_the_cosine_until_the_cap():
    T, s = 1000, 0.008
    sched = schedules.get_schedule("cosine", T)
    u = np.arange(1, T + 1) / T
    f = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    # The cap at 0.999 only bites at the very last steps.
    np.testing.assert_allclose(np.asarray(sched.alphas_cumprod)[:-2], f[:-2], rtol=1e-4)
    assert np.max(schedules.cosine_betas(T)) == pytest.approx(0.999)


def test_sohl_dickstein_schedule():
    T = 40
    betas = schedules.sohl_dickstein_betas(T, beta_1=1e-3)
    assert betas[0] == 1e-3
    t = np.arange(2, T)  # paper's 1-based t; the last is capped
    np.testing.assert_allclose(betas[1:-1], 1.0 / (T - t + 1))
    assert betas[-1] == 0.999


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match=r"'linaer'.*cosine.*linear.*sohl_dickstein"):
        schedules.get_schedule("linaer", 10)


@pytest.mark.parametrize("name", ["linear", "cosine", "sohl_dickstein"])
def test_stored_float32_and_identities(name):
    sched = schedules.get_schedule(name, 100)
    for value in jax.tree_util.tree_leaves(sched):
        assert value.dtype == jnp.float32 and value.shape == (100,)
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    c1 = np.asarray(sched.posterior_mean_coef1, np.float64)
    c2 = np.asarray(sched.posterior_mean_coef2, np.float64)
    # Posterior mean of x_{t-1} when x_t equals its mean sqrt(abar_t) x_0 is
    # sqrt(abar_{t-1}) x_0: coef1 + coef2 sqrt(abar_t) = sqrt(abar_{t-1}).
    abar_prev = np.asarray(sched.alphas_cumprod_prev, np.float64)
    np.testing.assert_allclose(c1 + c2 * np.sqrt(abar), np.sqrt(abar_prev), rtol=2e-5)
    assert sched.posterior_variance[0] == 0.0
    assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]


def test_schedule_is_a_pytree_usable_under_jit():
    sched = schedules.get_schedule("linear", 50)
    doubled = jax.jit(lambda s: s.betas * 2)(sched)
    np.testing.assert_allclose(doubled, 2 * np.asarray(sched.betas))
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), Schedule)


def test_from_betas_on_traced_betas_matches_numpy_and_has_gradients():
    betas = schedules.linear_betas(50)
    via_numpy = Schedule.from_betas(betas)
    via_jit = jax.jit(Schedule.from_betas)(jnp.asarray(betas, jnp.float32))
    for a, b in zip(jax.tree_util.tree_leaves(via_numpy), jax.tree_util.tree_leaves(via_jit)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    grad = jax.grad(lambda b: Schedule.from_betas(b).alphas_cumprod[-1])(jnp.asarray(betas))
    # d abar_T / d beta_s = -abar_T / (1 - beta_s).
    abar_T = np.prod(1 - betas)
    np.testing.assert_allclose(grad, -abar_T / (1 - betas), rtol=1e-4)


@pytest.mark.parametrize(
    "betas, match",
    [
        (np.full((2, 3), 0.1), r"1-D.*\(2, 3\)"),
        (np.array([]), r"1-D and non-empty"),
        (np.array([0.1, np.nan, 0.2]), r"betas\[1\] = nan"),
        (np.array([0.1, 0.2, np.inf]), r"betas\[2\] = inf"),
        (np.array([0.1, 0.0]), r"\(0, 1\); betas\[1\] = 0\.0"),
        (np.array([1.0, 0.5]), r"betas\[0\] = 1\.0"),
        (np.array([0.5, -0.1]), r"betas\[1\] = -0\.1"),
    ],
)
def test_bad_betas_name_the_first_bad_index(betas, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_betas(betas)


def test_traced_betas_of_wrong_rank_fail_at_trace_time():
    with pytest.raises(ValueError, match="1-D"):
        jax.jit(Schedule.from_betas)(jnp.full((2, 2), 0.1))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_timesteps(bad):
    with pytest.raises(ValueError, match="num_timesteps must be a positive int"):
        schedules.linear_betas(bad)


def test_linear_schedule_too_short_for_its_scaling():
    with pytest.raises(ValueError, match=r"T = 20 has betas from .* to 1\.0.*T > 20"):
        schedules.linear_betas(20)


def test_bad_beta_1():
    with pytest.raises(ValueError, match="beta_1 must lie in"):
        schedules.sohl_dickstein_betas(10, beta_1=0.0)
