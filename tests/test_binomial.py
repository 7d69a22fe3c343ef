"""Binomial diffusion (2015, Table App.1): brute force over the forward chain, KL identities,
the exact reverse at equilibrium, sampling, the perturbed rate, and a heartbeat smoke run."""

import importlib.util
import itertools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import binomial, data
from diffusion_jax.training import train
from diffusion_jax.training.objectives import dpm2015 as objectives_2015

ROOT = pathlib.Path(__file__).resolve().parents[1]


def chain_joint(x0_bit, betas, p):
    """{trajectory (x_1..x_T): probability} of the forward chain for one bit, float64,
    written from the kernel B(x_t; x_{t-1}(1 - beta_t) + p beta_t)."""
    joint = {}
    for traj in itertools.product([0, 1], repeat=len(betas)):
        prob, prev = 1.0, x0_bit
        for beta, x in zip(betas, traj):
            rate = prev * (1 - beta) + p * beta
            prob *= rate if x == 1 else 1 - rate
            prev = x
        joint[traj] = prob
    return joint


BETAS = np.array([0.1, 0.35, 0.2, 0.6, 1.0])  # the last beta = 1 erases everything


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_marginals_and_posteriors_match_brute_force_enumeration(p):
    schedule = binomial.BinomialSchedule.from_betas(BETAS, p)
    T = len(BETAS)
    for x0 in (0, 1):
        joint = chain_joint(x0, BETAS, p)
        assert math.isclose(sum(joint.values()), 1.0, rel_tol=1e-12)
        x_start = jnp.full((1, 1), float(x0))
        for t in range(T):
            want = sum(v for traj, v in joint.items() if traj[t] == 1)
            got = binomial.q_probs(schedule, x_start, jnp.array([t]))
            np.testing.assert_allclose(float(got[0, 0]), want, rtol=1e-6, atol=1e-7)
        for t, xt in itertools.product(range(1, T), (0, 1)):
            den = sum(v for traj, v in joint.items() if traj[t] == xt)
            num = sum(v for traj, v in joint.items() if traj[t] == xt and traj[t - 1] == 1)
            got = binomial.q_posterior_probs(
                schedule, x_start, jnp.full((1, 1), float(xt)), jnp.array([t]))
            np.testing.assert_allclose(float(got[0, 0]), num / den, rtol=1e-5, atol=1e-7)
        # t = 0: x_{t-1} is the data itself.
        got = binomial.q_posterior_probs(schedule, x_start, jnp.ones((1, 1)), jnp.array([0]))
        assert float(got[0, 0]) == x0


def test_per_bit_prior_and_batch_broadcasting():
    p = np.array([0.1, 0.5, 0.8])
    schedule = binomial.BinomialSchedule.from_betas(BETAS, p)
    x0 = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    t = jnp.array([1, 3])
    got = np.asarray(binomial.q_probs(schedule, x0, t))
    abar = np.cumprod(1 - BETAS)
    want = abar[[1, 3]][:, None] * np.asarray(x0) + (1 - abar[[1, 3]])[:, None] * p[None]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match=r"prior_prob has 3 per-bit rates but x has shape \(2, 4\)"):
        binomial.q_probs(schedule, jnp.zeros((2, 4)), t)


def test_paper_schedule_erases_a_constant_fraction():
    schedule = binomial.binomial_schedule(2000, prior_prob=0.2)
    t = np.arange(2000)
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), 1 - (t + 1) / 2000, atol=2e-6)
    assert float(schedule.betas[-1]) == 1.0 and float(schedule.alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize("bad, match", [
    (np.array([0.1, 0.0]), r"betas\[1\] = 0.0"),
    (np.array([0.1, 1.5]), r"betas\[1\] = 1.5"),
    (np.zeros((2, 2)), r"1-D and non-empty"),
])
def test_bad_betas(bad, match):
    with pytest.raises(ValueError, match=match):
        binomial.BinomialSchedule.from_betas(bad)


def test_bad_prior():
    with pytest.raises(ValueError, match=r"prior_prob must be .* rates in \(0, 1\)"):
        binomial.BinomialSchedule.from_betas(BETAS, 1.0)


def test_bernoulli_kl_is_nonnegative_and_zero_only_for_equal_rates():
    grid = np.concatenate([[0.0, 1e-6, 1 - 1e-6, 1.0], np.linspace(0.01, 0.99, 41)])
    q, p = np.meshgrid(grid, grid[1:-1][4:], indexing="ij")  # p strictly inside (0, 1)
    kl = np.asarray(binomial.bernoulli_kl(jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32)))
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(q > 0, q * np.log(q / p), 0) + np.where(q < 1, (1 - q) * np.log((1 - q) / (1 - p)), 0)
    np.testing.assert_allclose(kl, want, rtol=1e-4, atol=1e-6)
    assert (kl >= 0).all()
    same = jnp.asarray(grid, jnp.float32)
    assert (binomial.bernoulli_kl(same, same) == 0).all()
    logits = jnp.linspace(-20.0, 20.0, 81)
    assert (binomial.bernoulli_kl_logits(logits, logits) == 0).all()
    l1, l2 = jnp.meshgrid(logits, logits, indexing="ij")
    kl_logits = binomial.bernoulli_kl_logits(l1, l2)
    assert (kl_logits >= -1e-6).all()
    mid = (jnp.abs(l1) < 8) & (jnp.abs(l2) < 8)
    np.testing.assert_allclose(
        np.asarray(kl_logits)[np.asarray(mid)],
        np.asarray(binomial.bernoulli_kl(jax.nn.sigmoid(l1), jax.nn.sigmoid(l2)))[np.asarray(mid)],
        rtol=1e-3, atol=1e-5)


def test_binary_entropy_and_null_likelihood():
    q = np.array([0.0, 0.2, 0.5, 1.0])
    with np.errstate(divide="ignore", invalid="ignore"):
        want = -np.nan_to_num(q * np.log(q)) - np.nan_to_num((1 - q) * np.log(1 - q))
    np.testing.assert_allclose(binomial.binary_entropy(jnp.asarray(q)), want, atol=1e-7)
    schedule = binomial.binomial_schedule(10, prior_prob=0.2)
    beat = data.sample_heartbeat(np.random.default_rng(0), 3)
    # Four 1s and sixteen 0s: 4 log 0.2 + 16 log 0.8 nats, -14.439 bits.
    got = binomial.null_log_likelihood(schedule, jnp.asarray(beat)) / math.log(2)
    np.testing.assert_allclose(got, 4 * math.log2(0.2) + 16 * math.log2(0.8), rtol=1e-6)


def test_perturbed_rate_is_the_normalised_product():
    c = jnp.linspace(0.05, 0.95, 7)[:, None]
    r = jnp.linspace(0.1, 0.9, 5)[None, :]
    want = c * r / (c * r + (1 - c) * (1 - r))  # p(x=1) r(1) / sum_x p(x) r(x)
    got = binomial.perturbed_reverse_probs(jnp.broadcast_to(c, (7, 5)), jnp.broadcast_to(r, (7, 5)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    logit = lambda v: jnp.log(v) - jnp.log1p(-v)  # noqa: E731
    got_logits = binomial.perturbed_reverse_logits(logit(jnp.broadcast_to(c, (7, 5))), logit(jnp.broadcast_to(r, (7, 5))))
    np.testing.assert_allclose(jax.nn.sigmoid(got_logits), want, rtol=1e-5)
    # r = 1/2 leaves the kernel unchanged.
    np.testing.assert_allclose(binomial.perturbed_reverse_probs(c, jnp.full_like(c, 0.5)), c, rtol=1e-6)


def zero_model(x_t, t):
    del t
    return jnp.zeros_like(x_t)


def test_exact_reverse_at_equilibrium_gives_k_equal_to_l_null():
    """Data drawn from the prior: z = 0 (the forward kernel run backwards) is the exact
    reverse kernel, so K = log pi(x_0) on average: K - L_null = 0 within Monte Carlo
    error (5 standard errors)."""
    p = 0.3
    schedule = binomial.binomial_schedule(30, prior_prob=p)
    x0 = (jax.random.uniform(jax.random.key(0), (4000, 6)) < p).astype(jnp.float32)
    out = binomial.bound_k(schedule, zero_model, x0, key=jax.random.key(1))
    diff = np.asarray(out["k_minus_null"], np.float64)
    assert abs(diff.mean()) < 5 * diff.std() / np.sqrt(diff.size) + 1e-4
    # The one-term estimate agrees with the full sum in expectation.
    est = binomial.bound_estimate(schedule, zero_model, x0, key=jax.random.key(2))
    k_all, k_one = np.asarray(out["k"], np.float64), np.asarray(est["k"], np.float64)
    se = np.sqrt(k_all.var() / k_all.size + k_one.var() / k_one.size)
    assert abs(k_all.mean() - k_one.mean()) < 5 * se


def test_a_wrong_reverse_kernel_scores_below_the_truth():
    schedule = binomial.binomial_schedule(30, prior_prob=0.3)
    x0 = (jax.random.uniform(jax.random.key(0), (2000, 6)) < 0.3).astype(jnp.float32)
    bad = binomial.bound_k(schedule, lambda x, t: jnp.full_like(x, 1.0), x0, key=jax.random.key(1))
    assert float(jnp.mean(bad["k_minus_null"])) < -0.5


def test_sampling_at_equilibrium_and_with_a_multiplying_distribution():
    p = 0.3
    schedule = binomial.binomial_schedule(20, prior_prob=p)
    out = binomial.p_sample_loop(schedule, zero_model, (4000, 4), key=jax.random.key(0),
                                 save_steps=(20, 10, 0))
    assert out["saved"].shape == (3, 4000, 4)
    np.testing.assert_array_equal(out["saved"][2], out["sample"])
    for states in out["saved"]:  # every state of a stationary chain is B(p): std err 0.0036
        np.testing.assert_allclose(np.mean(np.asarray(states)), p, atol=0.02)
    # r with rate 0.8 on every bit at every step pulls the samples toward 1.
    r = jnp.full((1, 4), math.log(0.8 / 0.2))
    pulled = binomial.p_sample_loop(schedule, zero_model, (2000, 4), key=jax.random.key(1), r_logits=r)
    assert float(jnp.mean(pulled["sample"])) > p + 0.2


def load_config(name, variant):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize("basis", [0, 8])
def test_gradient_reaches_every_readout(basis):
    config = load_config("heartbeat.py", "tiny")
    config.dpm2015.readout_basis = basis
    info = data.dataset_info(config.data)
    model = objectives_2015.build_model(config, info, "binomial")
    params = model.init(jax.random.key(0))
    x0 = jnp.asarray(data.toy_heldout_set("heartbeat", 16))

    def neg_k(params):
        return -jnp.mean(model.bound(params, x0, jax.random.key(1))["k"])

    grads = jax.grad(neg_k)(params)["network"]
    name, count = ("readout_basis_kernel", basis) if basis else (
        "readout_kernel", config.diffusion.num_timesteps - 1)
    per_readout = np.abs(np.asarray(grads[name])).sum(axis=(1, 2))
    assert per_readout.shape == (count,) and (per_readout > 0).all()


def test_heartbeat_tiny_training_improves_k(tmp_path):
    config = load_config("heartbeat.py", "tiny")
    info = data.dataset_info(config.data)
    model = objectives_2015.build_model(config, info, "binomial")
    x0 = data.toy_heldout_set("heartbeat", 512)
    before = objectives_2015.evaluate_bound(
        model, model.init(jax.random.key(config.seed)), x0, key=jax.random.key(5), batch_size=512)
    # The same init as the run (train.py splits the seed's key into init/train/sample).
    state = train.train_and_evaluate(config, tmp_path)
    after = objectives_2015.evaluate_bound(model, state.params, x0, key=jax.random.key(5),
                                           batch_size=512)
    gain = after["K_bits"].mean() - before["K_bits"].mean()
    assert gain > 1.0, (before["K_bits"].mean(), after["K_bits"].mean())


def test_batched_bound_equals_the_scan():
    """The one-call form (step-major rows) draws the same x_t and gives the same K."""
    schedule = binomial.binomial_schedule(12, prior_prob=0.2)
    x0 = jnp.asarray(data.toy_heldout_set("heartbeat", 8))
    fn = lambda x, t: 0.3 * jnp.sin(x * (t[:, None] + 1.0))  # noqa: E731
    a = binomial.bound_k(schedule, fn, x0, key=jax.random.key(3))
    b = binomial.bound_k(schedule, fn, x0, key=jax.random.key(3), batched=True)
    for name in ("k", "k_minus_null", "kl", "entropy"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)
