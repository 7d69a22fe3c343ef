"""The 2015 Gaussian model: Eq. 64-65 kernels, the bound K against the paper's debug check
and a float64 closed form, learned betas, gradients, sampling, and a swiss roll smoke run."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import data, dpm2015, schedules
from diffusion_jax.data import toy
from diffusion_jax.models.rbf import NormalizedRBF
from diffusion_jax.training import evaluate, train
from diffusion_jax.training.objectives import dpm2015 as objectives_2015

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, variant=None):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def paper_schedule(T=20, beta_1=1e-3):
    return schedules.Schedule.from_betas(schedules.sohl_dickstein_betas(T, beta_1=beta_1))


def test_eq_64_65_against_numpy():
    schedule = paper_schedule()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    z = rng.normal(size=(6, 6)).astype(np.float32) * 2
    t = np.array([1, 2, 5, 10, 18, 19])
    mean, var, log_var = dpm2015.reverse_mean_variance(schedule, jnp.asarray(z), jnp.asarray(x), jnp.asarray(t))
    beta = np.asarray(schedules.sohl_dickstein_betas(20, beta_1=1e-3))[t][:, None]
    sigma = 1 / (1 + np.exp(-(z[:, 3:] + np.log(beta / (1 - beta)))))
    mu = (x - z[:, :3]) * (1 - sigma) + z[:, :3]
    np.testing.assert_allclose(var, sigma, rtol=1e-5)
    np.testing.assert_allclose(log_var, np.log(sigma), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, mu, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"model_output must have shape \(6, 6\).*got \(6, 3\)"):
        dpm2015.reverse_mean_variance(schedule, jnp.asarray(z[:, :3]), jnp.asarray(x), jnp.asarray(t))


def test_forward_reversal_output_and_fixed_first_step():
    schedule = paper_schedule()
    x = jnp.linspace(-2, 2, 10).reshape(5, 2)
    t = jnp.array([0, 1, 4, 10, 19])
    betas = schedules.sohl_dickstein_betas(20, beta_1=1e-3)[np.asarray(t)][:, None]
    alphas = 1 - betas
    mean, var, _ = dpm2015.reverse_mean_variance(
        schedule, dpm2015.forward_reversal_output(schedule, x, t), x, t)
    np.testing.assert_allclose(mean, np.sqrt(alphas) * np.asarray(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, np.broadcast_to(betas, (5, 2)), rtol=1e-5)
    # p_mean_variance ignores the model at t = 0 (Appendix B.2).
    m0, v0, _ = dpm2015.p_mean_variance(schedule, jnp.full((5, 4), 7.0), x, t)
    np.testing.assert_allclose(m0[0], np.sqrt(alphas[0]) * np.asarray(x[0]), rtol=1e-6)
    np.testing.assert_allclose(v0[0], 1e-3, rtol=1e-5)


def test_debug_check_exact_reverse_on_standard_normal_data():
    """The paper's debug check: N(0, I) data with the exact reverse kernels (the forward
    kernels run backwards) give K = L_null: K - L_null = 0 within 5 standard errors."""
    schedule = paper_schedule(T=20)
    x0 = jax.random.normal(jax.random.key(0), (8000, 2))
    fn = lambda x, t: dpm2015.forward_reversal_output(schedule, x, t)  # noqa: E731
    out = jax.jit(lambda x, k: dpm2015.bound_k(schedule, fn, x, key=k))(x0, jax.random.key(1))
    diff = np.asarray(out["k_minus_null"], np.float64)
    se = diff.std() / np.sqrt(diff.size)
    # Per example K - L_null spreads like L_null itself (variance D / 2 nats^2 here), so
    # the standard error is about 0.014 nats: the check resolves a few hundredths.
    assert se < 0.02 and abs(diff.mean()) < 5 * se
    # Kernel variances about 35% too large (z_Sigma = 0.3) lose about 0.9 nats: caught
    # by far more than 10 standard errors.
    wide = lambda x, t: fn(x, t).at[:, 2:].set(0.3)  # noqa: E731
    off = jax.jit(lambda x, k: dpm2015.bound_k(schedule, wide, x, key=k))(x0, jax.random.key(1))
    assert float(jnp.mean(off["k_minus_null"])) < -10 * se


def closed_form_k(x0, betas):
    """K for reverse kernels N(sqrt(1 - beta_t) x_t, beta_t) on data x0 (N, D), float64.

    E_{x_t | x_0} of each KL in closed form: with a = coef1, b = coef2 - sqrt(alpha_t),
    the mean gap a x_0 + b x_t has second moment (a + b sqrt(abar_t))^2 x_0^2 +
    b^2 (1 - abar_t)."""
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    total = np.zeros(x0.shape[0])
    for t in range(1, len(betas)):
        post_var = betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
        a = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
        b = (1 - abar_prev[t]) * np.sqrt(alphas[t]) / (1 - abar[t]) - np.sqrt(alphas[t])
        gap2 = (a + b * np.sqrt(abar[t])) ** 2 * x0**2 + b**2 * (1 - abar[t])
        kl = 0.5 * (np.log(betas[t] / post_var) + post_var / betas[t] - 1 + gap2 / betas[t])
        total += kl.sum(axis=1)
    dim = x0.shape[1]
    entropy = 0.5 * dim * (np.log(1 - abar[-1]) - np.log(betas[0]) - np.log(2 * np.pi * np.e))
    return entropy - total


def test_k_with_forward_kernels_equals_its_closed_form_on_any_data():
    betas = schedules.sohl_dickstein_betas(15, beta_1=1e-2)
    schedule = schedules.Schedule.from_betas(betas)
    x0 = np.concatenate([toy.sample_swiss_roll(np.random.default_rng(0), 100), np.full((1, 2), 3.0)])
    x0 = np.repeat(x0, 200, axis=0)  # 200 noise draws per example
    fn = lambda x, t: dpm2015.forward_reversal_output(schedule, x, t)  # noqa: E731
    out = jax.jit(lambda x, k: dpm2015.bound_k(schedule, fn, x, key=k))(jnp.asarray(x0), jax.random.key(0))
    k = np.asarray(out["k"], np.float64)
    assert np.isfinite(k).all()
    want = closed_form_k(x0.astype(np.float64), betas)
    err = k - want
    assert abs(err.mean()) < 5 * err.std() / np.sqrt(err.size)
    per_example = err.reshape(101, 200).mean(axis=1)  # the far point (3, 3) included
    assert np.all(np.abs(per_example) < 5 * err.reshape(101, 200).std(axis=1) / np.sqrt(200) + 1e-3)


def test_entropy_terms_and_null_likelihood():
    schedule = paper_schedule(T=10, beta_1=1e-2)
    abar_T = float(schedule.alphas_cumprod[-1])
    h = lambda v: 0.5 * math.log(2 * math.pi * math.e * v)  # noqa: E731
    want = 3 * (h(1 - abar_T) - h(1e-2) - h(1.0))
    np.testing.assert_allclose(dpm2015.entropy_terms(schedule, 3), want, rtol=1e-5)
    x = jnp.array([[0.0, 0.0], [1.0, -2.0]])
    np.testing.assert_allclose(dpm2015.null_log_likelihood(x), [-math.log(2 * math.pi), -math.log(2 * math.pi) - 2.5], rtol=1e-6)


def test_learned_betas():
    base = schedules.sohl_dickstein_betas(10, beta_1=1e-3)
    np.testing.assert_allclose(dpm2015.learned_betas(jnp.zeros(9), base), base, rtol=1e-5)
    betas = dpm2015.learned_betas(jnp.linspace(-50, 50, 9), base)
    assert float(betas[0]) == pytest.approx(1e-3) and bool(jnp.all((betas > 0) & (betas < 1)))
    with pytest.raises(ValueError, match=r"offsets must have shape \(T - 1,\) = \(9,\)"):
        dpm2015.learned_betas(jnp.zeros(10), base)


def tiny_swissroll():
    config = load_config("swissroll.py", "tiny")
    return config, data.dataset_info(config.data)


@pytest.mark.parametrize("network", ["rbf", "mlp"])
def test_gradients_reach_the_betas_and_every_readout(network):
    config, info = tiny_swissroll()
    config.model.name = network
    model = objectives_2015.build_model(config, info, "gaussian")
    params = model.init(jax.random.key(0))
    # Non-zero readouts: with the zero init of the RBF net the centres get no gradient yet.
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    objective = objectives_2015.gaussian_objective(config, info)
    x0 = jnp.asarray(data.toy_heldout_set("swiss_roll", 32, noise=0.0))
    grads = jax.grad(lambda p: objective.loss(p, {"x": x0}, jax.random.key(2))[0])(params)
    T = config.diffusion.num_timesteps
    assert grads["beta_offsets"].shape == (T - 1,) and bool(jnp.all(grads["beta_offsets"] != 0))
    net = grads["network"]
    readout = net["readout"] if network == "rbf" else net["readout_kernel"]
    per_step = np.abs(np.asarray(readout)).sum(axis=(1, 2))
    assert per_step.shape == (T - 1,) and (per_step > 0).all()
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(net))


def test_beta_gradient_matches_finite_differences():
    """d(-K)/d(offset) through the frozen noise, against central differences in float64."""
    base = schedules.sohl_dickstein_betas(6, beta_1=1e-2)
    with jax.enable_x64(True):
        x0 = jnp.asarray(toy.sample_swiss_roll(np.random.default_rng(0), 64), jnp.float64)
        noise = jax.random.normal(jax.random.key(0), (5, 64, 2), jnp.float64)
        z = jax.random.normal(jax.random.key(1), (5 * 64, 4), jnp.float64) * 0.3

        def neg_k(offsets):
            schedule = schedules.Schedule.from_betas(
                jnp.concatenate([jnp.asarray(base[:1]), jax.nn.sigmoid(
                    jnp.log(base[1:]) - jnp.log1p(-base[1:]) + offsets)]), dtype=jnp.float64)
            return -jnp.mean(dpm2015.bound_k(schedule, lambda x, t: z, x0, noise=noise)["k"])

        offsets = jnp.array([0.1, -0.2, 0.3, 0.0, -0.1], jnp.float64)
        grad = np.asarray(jax.grad(neg_k)(offsets))
        h = 1e-5
        fd = [(neg_k(offsets.at[i].add(h)) - neg_k(offsets.at[i].add(-h))) / (2 * h) for i in range(5)]
        np.testing.assert_allclose(grad, np.asarray(fd), rtol=1e-5, atol=1e-8)


def test_rbf_is_normalised_and_reads_out_per_step():
    net = NormalizedRBF(num_timesteps=3, num_hidden=4, out_dim=2, readout_init_std=1.0)
    x = jax.random.normal(jax.random.key(0), (5, 2))
    params = net.init(jax.random.key(1), x, jnp.zeros((5,), jnp.int32))["params"]
    params = dict(params, readout=jnp.ones_like(params["readout"]) * jnp.arange(3.0)[:, None, None])
    out = net.apply({"params": params}, x, jnp.array([0, 1, 2, 1, 0]))
    # Normalized units sum to 1, so a readout of all c gives c.
    np.testing.assert_allclose(out, np.array([0, 1, 2, 1, 0])[:, None] * np.ones((5, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 3\)"):
        net.apply({"params": params}, x, jnp.array([0, 1, 3, 1, 0]))


def test_sampling_with_exact_reverse_kernels_gives_standard_normal():
    schedule = paper_schedule(T=20)
    fn = lambda x, t: dpm2015.forward_reversal_output(schedule, x, t)  # noqa: E731
    out = dpm2015.p_sample_loop(schedule, fn, (20000, 2), key=jax.random.key(0), save_steps=(20, 10, 0))
    np.testing.assert_array_equal(out["saved"][2], out["sample"])
    for states in np.asarray(out["saved"]):  # std errors 0.007 (mean) and 0.01 (variance)
        np.testing.assert_allclose(states.mean(axis=0), 0.0, atol=0.04)
        np.testing.assert_allclose(states.var(axis=0), 1.0, atol=0.05)


def test_one_term_estimate_agrees_with_the_full_sum():
    schedule = paper_schedule(T=10)
    x0 = jnp.asarray(toy.sample_swiss_roll(np.random.default_rng(1), 4000))
    fn = lambda x, t: dpm2015.forward_reversal_output(schedule, x, t)  # noqa: E731
    full = np.asarray(dpm2015.bound_k(schedule, fn, x0, key=jax.random.key(0))["k"], np.float64)
    one = np.asarray(dpm2015.bound_estimate(schedule, fn, x0, key=jax.random.key(1))["k"], np.float64)
    se = np.sqrt(full.var() / full.size + one.var() / one.size)
    assert abs(full.mean() - one.mean()) < 5 * se


def test_swissroll_tiny_training_improves_k_and_resumes(tmp_path):
    config, info = tiny_swissroll()
    model = objectives_2015.build_model(config, info, "gaussian")
    x0 = data.toy_heldout_set("swiss_roll", 1000, noise=config.data.noise)
    init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
    before = objectives_2015.evaluate_bound(model, model.init(init_key), x0, key=jax.random.key(5))
    whole = train.train_and_evaluate(config, tmp_path / "whole")
    after = objectives_2015.evaluate_bound(model, whole.params, x0, key=jax.random.key(5))
    gain = after["K_minus_null_bits"].mean() - before["K_minus_null_bits"].mean()
    assert gain > 0.3, (before["K_minus_null_bits"].mean(), after["K_minus_null_bits"].mean())
    # --mode=eval: K and K - L_null of the EMA parameters on test-split batches, with
    # standard errors, agree with the held-out evaluation above within their errors.
    config.eval.num_examples, config.eval.batch_size = 1024, 256
    ev = evaluate.evaluate_checkpoint(config, tmp_path / "whole")
    ema = objectives_2015.evaluate_bound(model, whole.ema_params, x0, key=jax.random.key(6))
    se = math.hypot(ev["eval/K_minus_null_bits_stderr"],
                    ema["K_minus_null_bits"].std() / math.sqrt(x0.shape[0]))
    assert ev["eval/num_examples"] == 1024 and 0 < ev["eval/K_bits_stderr"] < 0.5
    assert abs(ev["eval/K_minus_null_bits"] - ema["K_minus_null_bits"].mean()) < 5 * se
    # Learned betas live in params, so a run split in two ends where the whole run does.
    steps = config.train.num_steps
    config.train.num_steps = steps // 2
    train.train_and_evaluate(config, tmp_path / "split")
    config.train.num_steps = steps
    split = train.train_and_evaluate(config, tmp_path / "split")
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(whole.params["beta_offsets"]))) > 0


def test_bad_config_values():
    config, info = tiny_swissroll()
    config.dpm2015.schedule = "cosine"
    with pytest.raises(ValueError, match=r"dpm2015.schedule 'cosine'.*\['learned', 'fixed'\]"):
        objectives_2015.build_model(config, info, "gaussian")
    config, info = tiny_swissroll()
    config.diffusion.num_timesteps = 1
    with pytest.raises(ValueError, match=r"num_timesteps must be an int >= 2"):
        objectives_2015.build_model(config, info, "gaussian")
    config, _ = tiny_swissroll()
    config.data.name = "digits"
    with pytest.raises(ValueError, match=r"need vector data of shape \(D,\); data.name 'digits'"):
        objectives_2015.build_model(config, data.dataset_info(config.data), "gaussian")
    config, info = tiny_swissroll()
    config.dpm2015.beta_1 = 1.5
    with pytest.raises(ValueError, match=r"dpm2015.beta_1 must lie in \(0, 1\); got 1.5"):
        objectives_2015.build_model(config, info, "gaussian")
    config, info = tiny_swissroll()
    config.dpm2015.readout_basis = 8  # T - 1 = 7 readouts
    with pytest.raises(ValueError, match=r"readout_basis must be an int in \[0, T - 1 = 7\].*got 8"):
        objectives_2015.build_model(config, info, "gaussian")
    config.dpm2015.readout_basis, config.model.name = 3, "rbf"
    with pytest.raises(ValueError, match=r"readout_basis applies to model.name 'mlp'"):
        objectives_2015.build_model(config, info, "gaussian")


@pytest.mark.parametrize("network", ["rbf", "mlp"])
def test_blocked_readout_equals_the_per_row_readout(network):
    """Blocks of rows sharing a step (the bound's step-major layout) give the same output
    and the same gradients as the per-row gather."""
    config, info = tiny_swissroll()
    config.model.name = network
    model = objectives_2015.build_model(config, info, "gaussian")
    params = model.init(jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    x0 = jnp.asarray(data.toy_heldout_set("swiss_roll", 16, noise=0.0))

    def neg_k(p, block):
        fn = model.model_fn(p, block_size=16 if block else None)
        return -jnp.mean(dpm2015.bound_k(model.schedule(p), fn, x0, key=jax.random.key(2))["k"])

    per_row, blocked = (jax.value_and_grad(neg_k)(params, b) for b in (False, True))
    np.testing.assert_allclose(per_row[0], blocked[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(per_row[1]), jax.tree.leaves(blocked[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    fn = model.model_fn(params, block_size=5)
    with pytest.raises(ValueError, match="16 rows do not split into blocks of 5"):
        fn(x0, jnp.ones((16,), jnp.int32))
