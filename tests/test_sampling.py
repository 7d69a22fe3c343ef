"""Samplers: one step against float64 NumPy written from the papers, then properties.

References written here from the papers alone (0-based steps, abar_{-1} = 1):
* DDPM (Ho et al. 2020), Eq. 7 and 11 / Algorithm 2: the ancestral step.
* DDIM (Song et al. 2021), Eq. 12 and 16 (sampling) and Eq. 14 (the ODE, for encoding).
* Improved DDPM (Nichol & Dhariwal 2021), Sec. 4 and its ``space_timesteps``: respacing.
* DPM-Solver++ (Lu et al. 2022), Algorithm 2 (2M): the first- and second-order updates.
* Sohl-Dickstein et al. 2015, Sec. 2.5 / Appendix C: inpainting and the perturbed kernel.

Monte Carlo checks use Gaussian data x_0 ~ N(MU, S^2 I), for which the exact noise
prediction is known: x_t ~ N(sqrt(abar) MU, abar S^2 + 1 - abar), so
E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import gaussian, sampling, schedules

T = 1000
SCHED = schedules.get_schedule("linear", T)
MU, S = 0.5, 0.3
N_MC = 10_000  # examples per Monte Carlo check; 2 coordinates each


def _np_schedule(schedule):
    betas = np.asarray(schedule.betas, np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return betas, abar, abar_prev


def _col(v, t):
    return np.asarray(v)[np.asarray(t)][:, None]


def _exact_eps(alphas_cumprod, x_t, t):
    a = alphas_cumprod[t][:, None]
    return jnp.sqrt(1.0 - a) * (x_t - jnp.sqrt(a) * MU) / (a * S**2 + 1.0 - a)


def _exact_model(schedule):
    return Partial(_exact_eps, schedule.alphas_cumprod)


def _smooth_model(x_t, t):
    return 0.4 * jnp.tanh(x_t) + 0.01 * t.astype(jnp.float32)[:, None]


def _arrays(rng, batch=6, dim=3):
    x = rng.standard_normal((batch, dim))
    out = 0.8 * rng.standard_normal((batch, dim))
    z = rng.standard_normal((batch, dim))
    return x, out, z


def _f32(*arrays):
    return [jnp.asarray(a, jnp.float32) for a in arrays]


# ------------------------------------------------------------------------------------------
# One step against NumPy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_p_sample_matches_numpy(var_type, rng):
    """DDPM Eq. 11 with Eq. 7's posterior; sigma^2 = beta-tilde or beta; no noise at t=0."""
    betas, abar, abar_prev = _np_schedule(SCHED)
    x, eps, z = _arrays(rng)
    t = np.array([0, 1, 2, 500, 998, 999])
    x0 = x / np.sqrt(_col(abar, t)) - np.sqrt(1.0 / _col(abar, t) - 1.0) * eps
    mean = (
        _col(betas * np.sqrt(abar_prev) / (1 - abar), t) * x0
        + _col((1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar), t) * x
    )
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    var = beta_tilde if var_type == "fixed_small" else np.concatenate([beta_tilde[1:2], betas[1:]])
    want = mean + (t > 0)[:, None] * np.sqrt(_col(var, t)) * z
    got = sampling.p_sample(
        SCHED, *_f32(eps, x), jnp.asarray(t, jnp.int32), noise=jnp.asarray(z, jnp.float32),
        mean_type="eps", var_type=var_type,
    )
    np.testing.assert_allclose(got["sample"], want, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got["pred_xstart"], x0, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_ddim_sample_matches_numpy(eta, rng):
    """Song et al. 2021, Eq. 12 with sigma of Eq. 16."""
    _, abar, abar_prev = _np_schedule(SCHED)
    x, eps, z = _arrays(rng)
    t = np.array([0, 1, 10, 500, 998, 999])
    a, ap = _col(abar, t), _col(abar_prev, t)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
    want = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps + sigma * z
    got = sampling.ddim_sample(
        SCHED, *_f32(eps, x), jnp.asarray(t, jnp.int32), eta=eta,
        noise=jnp.asarray(z, jnp.float32), mean_type="eps", var_type="fixed_small",
    )
    np.testing.assert_allclose(got["sample"], want, rtol=2e-4, atol=2e-4)


def test_ddim_eta_one_is_the_ancestral_step(rng):
    """sigma^2(eta = 1) = beta-tilde and the DDIM mean is the posterior mean (Song Eq. 16)."""
    x, out, z = _f32(*_arrays(rng))
    t = jnp.asarray([1, 5, 100, 400, 800, 999], jnp.int32)
    kw = dict(noise=z, mean_type="eps", var_type="fixed_small")
    ddim = sampling.ddim_sample(SCHED, out, x, t, eta=1.0, **kw)["sample"]
    ddpm = sampling.p_sample(SCHED, out, x, t, **kw)["sample"]
    np.testing.assert_allclose(ddim, ddpm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mean_type", ["eps", "xstart", "v"])
def test_ddim_reverse_sample_matches_numpy_and_inverts_ddim_sample(mean_type, rng):
    """Eq. 14 of Song et al. discretised from level abar_{t-1} to abar_t with eps held:
    x_t / sqrt(abar_t) = x / sqrt(abar_{t-1}) + (sqrt(1/abar_t - 1) - sqrt(1/abar_{t-1} - 1)) eps.
    With the same model output, ddim_sample (eta = 0) undoes it exactly."""
    _, abar, abar_prev = _np_schedule(SCHED)
    x, out, _ = _arrays(rng)
    t = np.array([0, 1, 10, 500, 900, 999])
    a, ap = _col(abar, t), _col(abar_prev, t)
    # The output is read at level abar_t (the step label t): eps from each mean type.
    if mean_type == "eps":
        eps = out
    elif mean_type == "xstart":
        eps = (x / np.sqrt(a) - out) / np.sqrt(1 / a - 1)
    else:  # v: x_0 = sqrt(a) x - sqrt(1 - a) v
        eps = (x / np.sqrt(a) - (np.sqrt(a) * x - np.sqrt(1 - a) * out)) / np.sqrt(1 / a - 1)
    want = np.sqrt(a) * (x / np.sqrt(ap) + (np.sqrt(1 / a - 1) - np.sqrt(1 / ap - 1)) * eps)
    kw = dict(mean_type=mean_type, var_type="fixed_small")
    x32, out32 = _f32(x, out)
    t32 = jnp.asarray(t, jnp.int32)
    got = sampling.ddim_reverse_sample(SCHED, out32, x32, t32, **kw)["sample"]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    if mean_type == "eps":  # output held fixed as eps: an exact inverse
        back = sampling.ddim_sample(SCHED, out32, got, t32, **kw)["sample"]
        np.testing.assert_allclose(back, x, rtol=1e-3, atol=1e-3)


def _np_dpm_coefficients(schedule, t):
    """alpha, sigma, lambda at steps t in [-1, T) (-1: the data)."""
    _, abar, _ = _np_schedule(schedule)
    abar_ext = np.concatenate([[1.0], abar])[np.asarray(t) + 1][:, None]
    alpha, sigma = np.sqrt(abar_ext), np.sqrt(1 - abar_ext)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def test_dpm_solver_pp_step_matches_numpy(rng):
    """Lu et al. 2022, Algorithm 2: first-order (Eq. 8 with D = x0) and 2M updates."""
    x, x0, _ = _arrays(rng)
    x0_prev = x0 + 0.3 * rng.standard_normal(x0.shape)
    t_prev = np.array([999, 700, 400, 300, 60, 5])
    t = np.array([900, 500, 350, 100, 20, 2])
    t_next = np.array([800, 300, 120, 10, 0, -1])
    a_n, s_n, l_n = _np_dpm_coefficients(SCHED, t_next)
    _, s, l = _np_dpm_coefficients(SCHED, t)
    _, _, l_p = _np_dpm_coefficients(SCHED, t_prev)
    h = l_n - l
    first = s_n / s * x - a_n * (np.exp(-h) - 1) * x0
    with np.errstate(divide="ignore", invalid="ignore"):  # h = inf in the last row
        r = (l - l_p) / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        second = s_n / s * x - a_n * (np.exp(-h) - 1) * d
    second[-1] = x0[-1]  # to the data (lambda = inf) only the first-order update exists
    ints = [jnp.asarray(v, jnp.int32) for v in (t, t_next, t_prev)]
    x32, x032, prev32 = _f32(x, x0, x0_prev)
    got1 = sampling.dpm_solver_pp_step(SCHED, x32, ints[0], ints[1], x032)
    got2 = sampling.dpm_solver_pp_step(
        SCHED, x32, ints[0], ints[1], x032, prev_pred_xstart=prev32, t_prev=ints[2]
    )
    np.testing.assert_allclose(got1, first, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got2, second, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got1[-1], x0[-1], rtol=1e-6)


def test_dpm_solver_first_order_is_ddim(rng):
    x, eps, _ = _f32(*_arrays(rng))
    t = jnp.asarray([1, 5, 100, 400, 800, 999], jnp.int32)
    kw = dict(mean_type="eps", var_type="fixed_small")
    ddim = sampling.ddim_sample(SCHED, eps, x, t, **kw)
    dpm = sampling.dpm_solver_pp_step(SCHED, x, t, t - 1, ddim["pred_xstart"])
    np.testing.assert_allclose(dpm, ddim["sample"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spacing", ["logsnr", "time_uniform", "time_quadratic"])
@pytest.mark.parametrize("num_steps", [1, 2, 10, 500, 1000])
def test_dpm_solver_timesteps(spacing, num_steps):
    grid = np.asarray(sampling.dpm_solver_timesteps(SCHED, num_steps, spacing=spacing))
    assert grid.shape == (num_steps,) and grid[0] == T - 1
    assert np.all(np.diff(grid) < 0) and grid.min() >= 0
    if num_steps > 1:
        assert grid[-1] == 0
    if spacing == "logsnr" and num_steps == 10:
        _, _, lam = _np_dpm_coefficients(SCHED, grid)
        gaps = np.diff(lam[:, 0])
        # Evenly spaced in lambda up to the rounding of t (large gaps near t = 0).
        np.testing.assert_allclose(gaps, gaps.mean(), rtol=0.25)
    if spacing == "time_quadratic" and num_steps == 10:
        # sqrt(t) evenly spaced from sqrt(T - 1) to 0, rounded: the DPM-Solver grid.
        expected = np.round(np.linspace(np.sqrt(T - 1.0), 0.0, num_steps) ** 2)
        np.testing.assert_array_equal(grid, expected)


# ------------------------------------------------------------------------------------------
# Respacing
# ------------------------------------------------------------------------------------------


def _np_space_timesteps(num_timesteps, counts):
    """Improved DDPM's algorithm: equal sections, evenly spaced (accumulated) positions."""
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (i < extra)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            steps.add(start + round(pos))
            pos += stride
        start += size
    return tuple(sorted(steps))


@pytest.mark.parametrize(
    "num_timesteps, spec",
    [(300, "10,15,20"), (300, [10, 15, 20]), (1000, "250"), (1000, "50"), (4000, "100"),
     (1000, "10,0,5"), (10, "10"), (7, "3,2")],
)
def test_space_timesteps_sections(num_timesteps, spec):
    counts = [int(c) for c in (spec.split(",") if isinstance(spec, str) else spec)]
    got = sampling.space_timesteps(num_timesteps, spec)
    assert got == _np_space_timesteps(num_timesteps, counts)
    assert len(got) == sum(counts) and got[0] == 0


def test_space_timesteps_docstring_examples():
    """Improved DDPM's docstring: 300 steps, [10, 15, 20] -> 10 of the first 100, 15 of the
    next 100, 20 of the last 100, each section from its first to its last step."""
    steps = np.asarray(sampling.space_timesteps(300, "10,15,20"))
    for lo, count in [(0, 10), (100, 15), (200, 20)]:
        section = steps[(steps >= lo) & (steps < lo + 100)]
        assert len(section) == count and section[0] == lo and section[-1] == lo + 99
    assert sampling.space_timesteps(300, "10,15,20")[:10] == tuple(range(0, 100, 11))
    assert sampling.space_timesteps(1000, "ddim50") == tuple(range(0, 1000, 20))
    assert sampling.space_timesteps(1000, "ddim1000") == tuple(range(1000))
    assert sampling.space_timesteps(10, "ddim4") == (0, 3, 6, 9)
    assert sampling.space_timesteps(1000, "2") == (0, 999)


def test_respace_schedule_matches_numpy():
    """beta_i = 1 - abar_{S_i} / abar_{S_{i-1}}: the kept alpha-bars are unchanged."""
    _, abar, _ = _np_schedule(SCHED)
    steps = sampling.space_timesteps(T, "10,15,20")
    spaced, timestep_map = sampling.respace_schedule(SCHED, steps)
    kept = abar[list(steps)]
    want = 1 - kept / np.concatenate([[1.0], kept[:-1]])
    np.testing.assert_allclose(spaced.betas, want, rtol=1e-5)
    np.testing.assert_allclose(spaced.alphas_cumprod, kept, rtol=1e-5)
    assert timestep_map.dtype == jnp.int32 and tuple(np.asarray(timestep_map)) == steps
    # Respacing with every step is the identity.
    full, full_map = sampling.respace_schedule(SCHED, range(T))
    np.testing.assert_allclose(full.betas, SCHED.betas, rtol=1e-5)
    assert np.array_equal(full_map, np.arange(T))


def test_respaced_model_is_called_with_original_steps(rng):
    seen = []

    def model(x_t, t):
        seen.append(np.asarray(t))
        return jnp.zeros_like(x_t)

    spaced, spaced_model = sampling.respace(SCHED, model, "ddim10")
    x = jnp.ones((3, 2))
    spaced_model(x, jnp.asarray([0, 4, 9], jnp.int32))
    assert seen[-1].tolist() == [0, 400, 900]
    assert spaced.num_timesteps == 10


# ------------------------------------------------------------------------------------------
# Loops on Gaussian data: moments, determinism, round trips
# ------------------------------------------------------------------------------------------


def _standardised_x_T(seed=5, shape=(N_MC, 2)):
    """A start with exactly zero mean and unit variance per coordinate, so that
    deterministic samplers are compared without the Monte Carlo noise of x_T's moments."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray((x - x.mean(0, keepdims=True)) / x.std(0, keepdims=True), jnp.float32)


def _moment_errors(x):
    x = np.asarray(x, np.float64)
    return x.mean() - MU, x.std() - S


@pytest.fixture(scope="module")
def gaussian_samples():
    model = _exact_model(SCHED)
    key = jax.random.key(1)
    shape = (N_MC, 2)
    kw = dict(mean_type="eps", var_type="fixed_small")
    x_T = _standardised_x_T()
    ddim20_sched, ddim20_model = sampling.respace(SCHED, model, "20")
    return {
        "ancestral": sampling.p_sample_loop(SCHED, model, shape, key=key, **kw)["sample"],
        "ddim_eta0": sampling.ddim_sample_loop(SCHED, model, shape, key=key, **kw)["sample"],
        "ddim_eta1": sampling.ddim_sample_loop(
            SCHED, model, shape, key=key, eta=1.0, **kw)["sample"],
        "dpm20": sampling.dpm_solver_pp_sample_loop(
            SCHED, model, shape, num_steps=20, x_T=x_T, **kw)["sample"],
        "ddim20": sampling.ddim_sample_loop(
            ddim20_sched, ddim20_model, shape, x_T=x_T, **kw)["sample"],
    }


@pytest.mark.parametrize("name", ["ancestral", "ddim_eta0", "ddim_eta1", "dpm20"])
def test_samplers_reproduce_gaussian_moments(gaussian_samples, name):
    """Exact eps of N(MU, S^2) data, T = 1000. Tolerance: 5 Monte Carlo standard errors
    (S / sqrt(n) for the mean, S / sqrt(2n) for the std; n = 20,000 draws) plus a
    discretisation allowance of 0.006 (2 % of S); the ancestral chain with beta-tilde
    variances is low by ~0.002 in std at T = 1000, DPM-Solver++ at 20 steps high by
    ~0.004."""
    n = 2 * N_MC
    mean_err, std_err = _moment_errors(gaussian_samples[name])
    assert abs(mean_err) < 5 * S / math.sqrt(n) + 0.006
    assert abs(std_err) < 5 * S / math.sqrt(2 * n) + 0.006


def test_dpm_solver_at_20_steps_beats_ddim_at_20(gaussian_samples):
    """Same standardised x_T for both, so the difference is the solvers' error (DDIM is
    first order: its std is ~0.06 low at 20 steps)."""
    dpm = np.abs(_moment_errors(gaussian_samples["dpm20"])).sum()
    ddim = np.abs(_moment_errors(gaussian_samples["ddim20"])).sum()
    assert dpm <= ddim
    assert ddim > 0.03  # the comparison is not between two negligible errors


def test_ddim_eta0_is_deterministic_and_inverts():
    """Deterministic: the key is unused once x_T is given. Round trip x_0 -> x_T -> x_0
    with the exact (smooth, linear) eps at T = 1000: max error 0.02 (measured 0.006; the
    error of each direction is first order in the step size)."""
    model = _exact_model(SCHED)
    kw = dict(mean_type="eps", var_type="fixed_small")
    x0 = MU + S * jax.random.normal(jax.random.key(3), (256, 2))
    x_T = sampling.ddim_reverse_sample_loop(SCHED, model, x0, **kw)["sample"]
    a = sampling.ddim_sample_loop(SCHED, model, x0.shape, x_T=x_T, **kw)["sample"]
    b = sampling.ddim_sample_loop(
        SCHED, model, x0.shape, x_T=x_T, key=jax.random.key(9), **kw)["sample"]
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - x0))) < 0.02
    # The encoding is Gaussian noise: standardised latents have unit variance.
    z = (np.asarray(x_T) - np.sqrt(np.asarray(SCHED.alphas_cumprod)[-1]) * MU)
    assert abs(z.std() - 1.0) < 0.1


def test_record_steps_and_trajectory():
    model = _exact_model(SCHED)
    key = jax.random.key(2)
    shape = (64, 2)
    kw = dict(mean_type="eps", var_type="fixed_small")
    x_T = jax.random.normal(jax.random.key(4), shape)
    out = sampling.p_sample_loop(
        SCHED, model, shape, key=key, x_T=x_T, record_steps=[T - 1, 500, 0], **kw
    )
    plain = sampling.p_sample_loop(SCHED, model, shape, key=key, x_T=x_T, **kw)
    np.testing.assert_array_equal(out["sample"], plain["sample"])
    assert out["x_t"].shape == (3,) + shape and out["pred_xstart"].shape == (3,) + shape
    np.testing.assert_array_equal(out["x_t"][0], x_T)
    # At t = 0 the step returns the decoder mean, which is pred_xstart (coef1 = 1, coef2 = 0).
    np.testing.assert_allclose(out["pred_xstart"][2], out["sample"], atol=1e-5)
    # At t = 500 the recorded state has the marginal's spread sqrt(abar S^2 + 1 - abar).
    abar = float(SCHED.alphas_cumprod[500])
    assert abs(np.std(out["x_t"][1]) / math.sqrt(abar * S**2 + 1 - abar) - 1) < 0.2


def test_no_retrace_on_second_call():
    """New parameters of the same shapes (a `Partial`'s traced arguments) reuse the loop."""
    traces = {"ancestral": 0, "dpm": 0}

    def ancestral_model(scale, x_t, t):
        traces["ancestral"] += 1
        return scale * x_t + 0.0 * t[:, None]

    def dpm_model(scale, x_t, t):
        traces["dpm"] += 1
        return scale * x_t + 0.0 * t[:, None]

    for scale in [0.1, 0.2]:
        sampling.p_sample_loop(
            SCHED, Partial(ancestral_model, jnp.float32(scale)), (4, 2),
            key=jax.random.key(0), mean_type="eps", var_type="fixed_small",
        )
        sampling.dpm_solver_pp_sample_loop(
            SCHED, Partial(dpm_model, jnp.float32(scale)), (4, 2), num_steps=10,
            key=jax.random.key(0), mean_type="eps", var_type="fixed_small",
        )
        if scale == 0.1:
            first = dict(traces)
    assert traces == first and min(first.values()) >= 1


@pytest.mark.parametrize("sampler, num_steps", [("ancestral", None), ("ancestral", 25),
                                                 ("ddim", "ddim25"), ("dpm_solver++", 25)])
def test_sample_entry_point(sampler, num_steps):
    out = sampling.sample(
        SCHED, _smooth_model, (5, 3), sampler=sampler, key=jax.random.key(0),
        num_steps=num_steps, mean_type="eps", var_type="fixed_small",
    )
    assert out.shape == (5, 3) and np.isfinite(np.asarray(out)).all()


def test_sample_entry_point_passes_the_dpm_solver_grid():
    kw = dict(mean_type="eps", var_type="fixed_small", key=jax.random.key(0))
    direct = sampling.dpm_solver_pp_sample_loop(
        SCHED, _smooth_model, (5, 3), num_steps=12, spacing="time_quadratic", **kw)["sample"]
    via = sampling.sample(SCHED, _smooth_model, (5, 3), sampler="dpm_solver++", num_steps=12,
                          spacing="time_quadratic", **kw)
    other = sampling.sample(SCHED, _smooth_model, (5, 3), sampler="dpm_solver++",
                            num_steps=12, **kw)
    np.testing.assert_array_equal(np.asarray(via), np.asarray(direct))
    assert not np.allclose(np.asarray(other), np.asarray(direct))


# ------------------------------------------------------------------------------------------
# Multiplying distributions (Sohl-Dickstein et al. 2015, Sec. 2.5)
# ------------------------------------------------------------------------------------------


def test_inpainting_keeps_known_pixels_and_is_unbiased():
    """Known coordinates: exactly the given values at the end, and at the start of step t
    a draw of q(x_t | x_0 = known) (mean sqrt(abar_t) known, std sqrt(1 - abar_t)).
    Unknown coordinates are independent of the known ones under N(MU, S^2 I), so their
    law is the prior's: mean and std within 5 standard errors + 0.006 (as above)."""
    model = _exact_model(SCHED)
    n = N_MC
    known_values = np.tile(np.array([[1.3, -0.7, 0.0, 0.0]], np.float32), (n, 1))
    mask = np.array([[True, True, False, False]])
    out = sampling.p_sample_loop(
        SCHED, model, (n, 4), key=jax.random.key(3), mask=mask, known=known_values,
        record_steps=[300], mean_type="eps", var_type="fixed_small",
    )
    sample = np.asarray(out["sample"])
    np.testing.assert_array_equal(sample[:, :2], known_values[:, :2])
    mean_err, std_err = _moment_errors(sample[:, 2:])
    assert abs(mean_err) < 5 * S / math.sqrt(2 * n) + 0.006
    assert abs(std_err) < 5 * S / math.sqrt(4 * n) + 0.006
    abar = float(SCHED.alphas_cumprod[300])
    mid = np.asarray(out["x_t"][0][:, 0], np.float64)
    assert abs(mid.mean() - math.sqrt(abar) * 1.3) < 5 * math.sqrt(1 - abar) / math.sqrt(n)
    assert abs(mid.std() / math.sqrt(1 - abar) - 1) < 0.05


R_MEAN, R_STD = -0.2, 0.25


def _log_r_exact(alphas_cumprod_prev, x, t):
    """log r_{t-1}(x) = log E_q[r(x_0) | x_{t-1} = x] for r = N(R_MEAN, R_STD^2), up to a
    constant: x_0 | x ~ N(m, v), so E[r] is proportional to
    exp(-(m - R_MEAN)^2 / (2 (R_STD^2 + v))). At the data level (abar = 1), r itself."""
    a = alphas_cumprod_prev[t][:, None]
    at_data = a >= 1.0
    one_minus = jnp.where(at_data, 1.0, 1.0 - a)
    v = jnp.where(at_data, 0.0, 1.0 / (1.0 / S**2 + a / one_minus))
    m = jnp.where(at_data, x, v * (MU / S**2 + jnp.sqrt(a) * x / one_minus))
    return jnp.sum(-jnp.square(m - R_MEAN) / (2.0 * (R_STD**2 + v)), axis=-1)


def test_smooth_r_gives_the_product_density():
    """A Gaussian r on N(MU, S^2) data: the product is N(m_p, v_p), 1/v_p = 1/S^2 + 1/R^2.

    The perturbed kernel N(mu + Sigma grad log r, Sigma) (Appendix C) is first order in
    the kernel width; with r_{t-1}(x) = E[r(x_0) | x_{t-1} = x] at every step (exact for
    the intermediate targets) the error is first order in the step size: measured mean
    errors 0.026 at T = 250 and 0.0076 at T = 1000. Tolerance at T = 1000: 0.015 in the
    mean, 0.006 in the std (plus 5 Monte Carlo standard errors), and the T = 250 error
    must be at least twice the T = 1000 one.
    (With the same r at every step, the paper's choice, the chain's targets p(x_t) r(x_t)
    are not one process's marginals and the bias does not vanish with the step size.)"""
    v_p = 1.0 / (1.0 / S**2 + 1.0 / R_STD**2)
    m_p = v_p * (MU / S**2 + R_MEAN / R_STD**2)
    n = 2 * N_MC
    errors = {}
    for num_timesteps in (250, T):
        sched = schedules.get_schedule("linear", num_timesteps)
        out = sampling.p_sample_loop(
            sched, _exact_model(sched), (N_MC, 2), key=jax.random.key(7),
            log_r_fn=Partial(_log_r_exact, sched.alphas_cumprod_prev),
            mean_type="eps", var_type="fixed_small",
        )["sample"]
        x = np.asarray(out, np.float64)
        errors[num_timesteps] = (x.mean() - m_p, x.std() - math.sqrt(v_p))
    mean_err, std_err = errors[T]
    se = math.sqrt(v_p / n)
    assert abs(mean_err) < 0.015 + 5 * se
    assert abs(std_err) < 0.006 + 5 * se / math.sqrt(2)
    assert abs(errors[250][0]) > 2 * abs(mean_err)


def test_log_r_gradient_shifts_the_mean_by_sigma_grad(rng):
    """One step: mean + variance * grad log r at the mean (Eq. 61)."""
    x, eps, z = _f32(*_arrays(rng))
    t = jnp.asarray([1, 5, 100, 400, 800, 999], jnp.int32)
    kw = dict(noise=z, mean_type="eps", var_type="fixed_large")
    plain = sampling.p_sample(SCHED, eps, x, t, **kw)["sample"]
    shifted = sampling.p_sample(
        SCHED, eps, x, t, log_r_fn=lambda y, t: -0.5 * jnp.sum(jnp.square(y - 2.0), -1), **kw
    )["sample"]
    out = gaussian.p_mean_variance(SCHED, eps, x, t, mean_type="eps", var_type="fixed_large")
    np.testing.assert_allclose(shifted - plain, out.variance * (2.0 - out.mean), atol=1e-6)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_inputs():
    kw = dict(mean_type="eps", var_type="fixed_small")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"sampler 'euler'.*'ancestral', 'ddim', 'dpm_solver\+\+'"):
        sampling.sample(SCHED, _smooth_model, (2, 2), sampler="euler", key=key, **kw)
    with pytest.raises(ValueError, match=r"spacing 'karras'.*'logsnr', 'time_uniform', 'time_q"):
        sampling.sample(SCHED, _smooth_model, (2, 2), sampler="dpm_solver++", num_steps=5,
                        spacing="karras", key=key, **kw)
    with pytest.raises(ValueError, match="valid forms are .*ddimN"):
        sampling.space_timesteps(1000, "fast")
    with pytest.raises(ValueError, match="valid forms"):
        sampling.space_timesteps(1000, "ddimx")
    with pytest.raises(ValueError, match="Cannot take 2000 steps"):
        sampling.space_timesteps(1000, "2000")
    with pytest.raises(ValueError, match="cannot hold 60"):
        sampling.space_timesteps(100, "60,10")
    with pytest.raises(ValueError, match="allows 1 to 1000"):
        sampling.space_timesteps(1000, "ddim1001")
    with pytest.raises(ValueError, match="No integer stride gives exactly 3"):
        sampling.space_timesteps(4, "ddim3")
    with pytest.raises(ValueError, match="positive total"):
        sampling.space_timesteps(10, "0")
    with pytest.raises(ValueError, match="exceeds the schedule's 1000 steps"):
        sampling.dpm_solver_pp_sample_loop(
            SCHED, _smooth_model, (2, 2), num_steps=1001, key=key, **kw)
    with pytest.raises(ValueError, match="exceeds the schedule's 1000 steps"):
        sampling.sample(
            SCHED, _smooth_model, (2, 2), sampler="dpm_solver++", num_steps=2000, key=key, **kw)
    with pytest.raises(ValueError, match="Cannot take 2000 steps"):
        sampling.sample(
            SCHED, _smooth_model, (2, 2), sampler="ddim", num_steps=2000, key=key, **kw)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sampling.ddim_sample_loop(SCHED, _smooth_model, (2, 2), key=key, eta=-0.1, **kw)
    known_msg = r"known must have the sample shape \(2, 2\); got known with shape \(2, 3\)"
    with pytest.raises(ValueError, match=known_msg):
        sampling.p_sample_loop(
            SCHED, _smooth_model, (2, 2), key=key, mask=np.ones((2, 3), bool),
            known=np.zeros((2, 3)), **kw)
    with pytest.raises(ValueError, match=r"mask must have the sample shape \(2, 2\).*\(3, 2\)"):
        sampling.p_sample_loop(
            SCHED, _smooth_model, (2, 2), key=key, mask=np.ones((3, 2), bool),
            known=np.zeros((2, 2)), **kw)
    with pytest.raises(ValueError, match="both `mask` and `known`"):
        sampling.p_sample_loop(SCHED, _smooth_model, (2, 2), key=key, mask=np.ones((2, 2)), **kw)
    with pytest.raises(ValueError, match=r"x_T must have shape \(2, 2\)"):
        sampling.ddim_sample_loop(SCHED, _smooth_model, (2, 2), x_T=jnp.zeros((3, 2)), **kw)
    with pytest.raises(ValueError, match="Pass `key`"):
        sampling.p_sample_loop(SCHED, _smooth_model, (2, 2), **kw)
    with pytest.raises(ValueError, match=r"record_steps must be distinct steps in \[0, 1000\)"):
        sampling.p_sample_loop(SCHED, _smooth_model, (2, 2), key=key, record_steps=[1000], **kw)
    with pytest.raises(ValueError, match=r"log_r_fn\(x, t\) must return one log r per example"):
        sampling.p_sample_loop(
            SCHED, _smooth_model, (2, 2), key=key, log_r_fn=lambda x, t: x, **kw)
    with pytest.raises(ValueError, match="var_type 'fixed'"):
        sampling.p_sample_loop(SCHED, _smooth_model, (2, 2), key=key, mean_type="eps",
                               var_type="fixed")
    with pytest.raises(ValueError, match="spacing 'uniform'"):
        sampling.dpm_solver_timesteps(SCHED, 10, spacing="uniform")
    with pytest.raises(ValueError, match="use_timesteps must be distinct steps"):
        sampling.respace_schedule(SCHED, [5, 5])
