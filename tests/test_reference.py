"""The library (float32) against the independent float64 NumPy reference in reference.py.

Every comparison feeds float32 arrays to the library and the very same values, cast to
float64, to the reference, so the only differences are the library's float32 arithmetic
(and its float32-stored coefficients).

Tolerances. The default is rtol 1e-5 (float32's unit roundoff u is 6e-8: a few dozen
roundings stay well inside). Where a result is a sum of terms that can cancel, a relative
tolerance on the result is meaningless (a float32 sum a + b is good to ~u (|a| + |b|), not
to ~u |a + b|), so those comparisons also allow ULPS = 4 float32 epsilons (4 * 2**-23,
~5e-7) times the elementwise magnitude of the terms, computed from the reference
(``term_scale``, ``kl_scale`` and friends below). The library currently needs under half
of that (run with REFERENCE_TEST_ULPS=0.5 to see), and ULPS = 0 fails, so the scales are
neither idle nor loose. Other tolerances are stated where they are used.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import gaussian, likelihood, losses, schedules

import reference as ref  # tests/ is on sys.path (rootdir conftest, no package)

RTOL = 1e-5
LN2 = math.log(2.0)

MEAN_TYPES = ref.MEAN_TYPES
VAR_TYPES = ref.VAR_TYPES
LEARNED = ("learned", "learned_range")
FIXED = ("fixed_small", "fixed_large")

# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def f64(x):
    return np.asarray(x, dtype=np.float64)


EPS32 = float(np.finfo(np.float32).eps)  # 2**-23, twice float32's unit roundoff
# Rounding errors allowed per unit of cancellation scale (see assert_close). Overridable
# with the environment variable, to measure how much of it the library actually uses.
ULPS = float(os.environ.get("REFERENCE_TEST_ULPS", 4))


def assert_close(got, want, *, rtol=RTOL, scale=None, ulps=None, atol=0.0, err_msg=""):
    """got: a float32 library result; want: the float64 reference.

    |got - want| <= rtol |want| + ulps * EPS32 * scale, where scale (optional, elementwise)
    is the magnitude of the terms the result is summed from: a float32 sum with cancellation
    is only good to a few roundings of its largest terms.
    """
    ulps = ULPS if ulps is None else ulps
    got = np.asarray(got)
    assert got.dtype == np.float32, f"expected a float32 result, got {got.dtype}"
    want = f64(want)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    if scale is not None:
        atol = atol + ulps * EPS32 * np.broadcast_to(f64(scale), want.shape)
    err = np.abs(f64(got) - want)
    bad = err > atol + rtol * np.abs(want)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        lines = [
            f"{tuple(i)}: got {f64(got)[tuple(i)]!r} want {want[tuple(i)]!r}"
            for i in idx
        ]
        raise AssertionError(
            f"{err_msg}: {bad.sum()} of {bad.size} elements differ beyond "
            f"rtol={rtol} + {ulps} ulps * scale\n" + "\n".join(lines)
        )


def term_scale(*terms):
    """Magnitude of a float32 sum of terms: sum of their absolute values."""
    return sum(np.abs(f64(x)) for x in terms)


def clipped_scale(x0, scale, clip):
    """The error scale of clip(x0): values clearly outside [-1, 1] become exactly +-1."""
    if not clip:
        return scale
    return np.where(np.abs(x0) > 1.0 + 2 * ULPS * EPS32 * scale, 0.0, scale)


SCHEDULE_CASES = {
    "linear1000": ("linear", 1000),
    "cosine1000": ("cosine", 1000),
    "linear50": ("linear", 50),
    "cosine50": ("cosine", 50),
}


# A short schedule whose prior term is large (alpha_bar_T ~ 0.67, so KL(q(x_T|x_0)||N(0,I))
# is ~0.1 bits/dim, not ~1e-5 as for the named schedules): the 'bound' loss and the total
# bpd would not notice a wrong prior term otherwise. Built with Schedule.from_betas.
SHORT_BETAS = np.linspace(1e-3, 0.08, 10)


@functools.lru_cache(maxsize=None)
def schedules_for(case):
    """(library Schedule, reference Schedule) for a named case."""
    if case == "short10":
        return schedules.Schedule.from_betas(SHORT_BETAS), ref.schedule_from_betas(SHORT_BETAS)
    name, T = SCHEDULE_CASES[case]
    return schedules.get_schedule(name, T), ref.get_schedule(name, T)


def t_batch(T, rng, B=8):
    """The named steps 0, 1, T//2, T-1 then random ones: one mixed-t batch covers them all."""
    named = [0, 1, T // 2, T - 1]
    rand = list(rng.integers(0, T, size=B - len(named)))
    return np.array(named + rand, dtype=np.int32)


SHAPES = {"image": (8, 4, 4, 3), "flat": (8, 5)}


def data(shape, rng, scale=1.0):
    """float32 data; the reference gets the same values in float64."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def images(shape, rng):
    """float32 data on the 8-bit grid in [-1, 1], both ends included."""
    k = rng.integers(0, 256, size=shape)
    k.reshape(-1)[:2] = [0, 255]
    return (k / 127.5 - 1.0).astype(np.float32)


def coef(sch, name, t, x):
    return ref.extract(getattr(sch, name), t, x)


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(SCHEDULE_CASES) + ["short10"])
def test_schedule_coefficients(case):
    lib, want = schedules_for(case)
    T = want.num_timesteps
    assert lib.num_timesteps == T
    for field in ref.COEFFICIENT_NAMES:
        got = np.asarray(getattr(lib, field))
        assert got.shape == (T,), field
        # Computed in float64 and stored in float32: every entry, including the exact zeros
        # (posterior_variance[0], alphas_cumprod_next[-1]) and the tiny alphas_cumprod[-1]
        # of the cosine schedule (~1e-9, still a normal float32), is one rounding away.
        assert_close(got, getattr(want, field), err_msg=f"{case}.{field}")


@pytest.mark.parametrize(
    "name,T,kwargs",
    [
        ("linear", 1000, {}),
        ("linear", 50, {}),
        ("linear", 200, {"beta_start": 1e-3, "beta_end": 0.05}),
        ("cosine", 1000, {}),
        ("cosine", 50, {}),
        ("cosine", 100, {"s": 0.02, "max_beta": 0.5}),
        ("sohl_dickstein", 1000, {"beta_1": 1e-4}),
        ("sohl_dickstein", 50, {"beta_1": 1e-3, "max_beta": 0.9}),
    ],
)
def test_named_betas_are_float64(name, T, kwargs):
    makers = {
        "linear": schedules.linear_betas,
        "cosine": schedules.cosine_betas,
        "sohl_dickstein": schedules.sohl_dickstein_betas,
    }
    got = makers[name](T, **kwargs)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    want = getattr(ref, f"{name}_betas")(T, **kwargs)
    # Both float64 from the same formula: only the order of float64 operations differs.
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    lib_sched = schedules.get_schedule(name, T, **kwargs)
    assert_close(lib_sched.betas, want)


def test_from_betas_arbitrary():
    rng = np.random.default_rng(1)
    betas = np.sort(rng.uniform(1e-5, 0.3, size=37))
    lib = schedules.Schedule.from_betas(betas)
    want = ref.schedule_from_betas(betas)
    for field in ref.COEFFICIENT_NAMES:
        assert_close(getattr(lib, field), getattr(want, field), err_msg=field)


# ------------------------------------------------------------------------------------------
# q(x_t | x_0), q(x_{t-1} | x_t, x_0), conversions
# ------------------------------------------------------------------------------------------

GAUSS_SCHEDULES = ["linear1000", "cosine1000", "cosine50", "short10"]


T_CASES = ["t0", "t1", "tmid", "tlast", "mixed"]


def t_case(tname, T, rng, B):
    """Uniform batches at t = 0, 1, T//2, T-1, or one mixed batch."""
    if tname == "mixed":
        return t_batch(T, rng, B)
    step = {"t0": 0, "t1": 1, "tmid": T // 2, "tlast": T - 1}[tname]
    return np.full(B, step, np.int32)


def q_setup(case, shape, tname):
    lib, sch = schedules_for(case)
    rng = np.random.default_rng(2)
    shp = SHAPES[shape]
    t = t_case(tname, sch.num_timesteps, rng, shp[0])
    x0, noise, other = data(shp, rng), data(shp, rng), data(shp, rng)
    # x_t: the same float32 values on both sides, so each function is tested alone.
    x_t = (f64(x0) * 0.7 + f64(noise) * 0.7).astype(np.float32)
    return lib, sch, t, x0, noise, other, x_t


q_params = pytest.mark.parametrize(
    "case,shape,tname",
    [(c, s, n) for c in GAUSS_SCHEDULES for s in SHAPES for n in T_CASES],
)


@q_params
def test_q_mean_variance(case, shape, tname):
    lib, sch, t, x0, *_ = q_setup(case, shape, tname)
    mean, variance, log_variance = gaussian.q_mean_variance(lib, x0, t)
    want = ref.q_mean_variance(sch, f64(x0), t)
    assert_close(mean, want[0], err_msg="mean")
    assert_close(log_variance, want[2], err_msg="log_variance")
    assert_close(variance, want[1], err_msg="variance")


# Small t at T = 1000, where 1 - abar_0 ~ 1e-4: forming 1 - abar in float32 from the
# stored abar would be off by up to 5e-4 relative; the library uses the float64-derived log.
@pytest.mark.parametrize("case", ["linear1000", "cosine1000"])
def test_q_mean_variance_variance_at_small_t(case):
    lib, sch = schedules_for(case)
    t = np.array([0, 1], np.int32)
    x0 = np.ones((2, 3), np.float32)
    _, variance, _ = gaussian.q_mean_variance(lib, x0, t)
    assert_close(variance, ref.q_mean_variance(sch, f64(x0), t)[1])


@q_params
def test_q_sample(case, shape, tname):
    lib, sch, t, x0, noise, *_ = q_setup(case, shape, tname)
    X0, N = f64(x0), f64(noise)
    a = coef(sch, "sqrt_alphas_cumprod", t, X0)
    s = coef(sch, "sqrt_one_minus_alphas_cumprod", t, X0)
    assert_close(
        gaussian.q_sample(lib, x0, t, noise=noise),
        ref.q_sample(sch, X0, t, N),
        scale=term_scale(a * X0, s * N),
    )


@q_params
def test_q_posterior_mean_variance(case, shape, tname):
    lib, sch, t, x0, _, _, x_t = q_setup(case, shape, tname)
    X0, XT = f64(x0), f64(x_t)
    got = gaussian.q_posterior_mean_variance(lib, x0, x_t, t)
    want = ref.q_posterior_mean_variance(sch, X0, XT, t)
    c1 = coef(sch, "posterior_mean_coef1", t, X0)
    c2 = coef(sch, "posterior_mean_coef2", t, X0)
    assert_close(got[0], want[0], scale=term_scale(c1 * X0, c2 * XT), err_msg="mean")
    assert_close(got[1], want[1], err_msg="variance")
    assert_close(got[2], want[2], err_msg="log_variance_clipped")


@q_params
def test_conversions(case, shape, tname):
    lib, sch, t, x0, noise, other, x_t = q_setup(case, shape, tname)
    X0, N, O, XT = f64(x0), f64(noise), f64(other), f64(x_t)
    a = coef(sch, "sqrt_alphas_cumprod", t, X0)
    s = coef(sch, "sqrt_one_minus_alphas_cumprod", t, X0)
    ra = coef(sch, "sqrt_recip_alphas_cumprod", t, X0)
    rm1 = coef(sch, "sqrt_recipm1_alphas_cumprod", t, X0)
    c1 = coef(sch, "posterior_mean_coef1", t, X0)
    c2 = coef(sch, "posterior_mean_coef2", t, X0)
    assert_close(
        gaussian.predict_xstart_from_eps(lib, x_t, t, other),
        ref.predict_xstart_from_eps(sch, XT, t, O),
        scale=term_scale(ra * XT, rm1 * O),
        err_msg="predict_xstart_from_eps",
    )
    assert_close(
        gaussian.predict_eps_from_xstart(lib, x_t, t, other),
        ref.predict_eps_from_xstart(sch, XT, t, O),
        scale=term_scale(ra * XT, O) / rm1,
        err_msg="predict_eps_from_xstart",
    )
    assert_close(
        gaussian.predict_xstart_from_xprev(lib, x_t, t, other),
        ref.predict_xstart_from_xprev(sch, XT, t, O),
        scale=term_scale(O, c2 * XT) / c1,
        err_msg="predict_xstart_from_xprev",
    )
    assert_close(
        gaussian.predict_v(lib, x0, t, noise),
        ref.predict_v(sch, X0, t, N),
        scale=term_scale(a * N, s * X0),
        err_msg="predict_v",
    )
    assert_close(
        gaussian.predict_xstart_from_v(lib, x_t, t, other),
        ref.predict_xstart_from_v(sch, XT, t, O),
        scale=term_scale(a * XT, s * O),
        err_msg="predict_xstart_from_v",
    )


# ------------------------------------------------------------------------------------------
# p(x_{t-1} | x_t)
# ------------------------------------------------------------------------------------------


def model_output_for(shape, var_type, rng):
    """A float32 model output: the mean part N(0,1); a learned log variance in [-8, 0];
    a learned_range value in [-1, 1] (ends included)."""
    C = shape[-1]
    mean_part = data(shape, rng)
    if var_type == "learned":
        var_part = rng.uniform(-8.0, 0.0, size=shape).astype(np.float32)
    elif var_type == "learned_range":
        var_part = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        var_part.reshape(-1)[:2] = [-1.0, 1.0]
    else:
        return mean_part
    out = np.concatenate([mean_part, var_part], axis=-1)
    assert out.shape[-1] == 2 * C
    return out


def pmv_scales(sch, out_mean_part, XT, t, mean_type, clip, pred_xstart):
    """Cancellation scales for (mean, pred_xstart) of p_mean_variance."""
    M = f64(out_mean_part)
    c1 = coef(sch, "posterior_mean_coef1", t, XT)
    c2 = coef(sch, "posterior_mean_coef2", t, XT)
    if mean_type == "xprev":
        x0_scale = clipped_scale(pred_xstart, term_scale(M, c2 * XT) / c1, clip)
        return None, x0_scale
    if mean_type == "xstart":
        x0_scale = np.abs(M)
    elif mean_type == "eps":
        ra = coef(sch, "sqrt_recip_alphas_cumprod", t, XT)
        rm1 = coef(sch, "sqrt_recipm1_alphas_cumprod", t, XT)
        x0_scale = term_scale(ra * XT, rm1 * M)
    else:  # v
        a = coef(sch, "sqrt_alphas_cumprod", t, XT)
        s = coef(sch, "sqrt_one_minus_alphas_cumprod", t, XT)
        x0_scale = term_scale(a * XT, s * M)
    x0_scale = clipped_scale(pred_xstart, x0_scale, clip)
    mean_scale = c1 * x0_scale + term_scale(c1 * pred_xstart, c2 * XT)
    return mean_scale, x0_scale


def log_variance_scale(sch, out, XT, t, var_type):
    """Cancellation / rounding scale of the model's log variance.

    The schedule stores betas in float32 and has no log(betas) field, so the library takes
    the log of a float32 beta: its relative rounding u becomes an ABSOLUTE error u in the
    log (for the capped beta = 0.999, |log| = 1e-3, that is a relative error 6e-5). Hence a
    scale of 1 on every log(beta) term; learned_range also sums two terms that can cancel.
    """
    if var_type == "fixed_large":
        return np.ones_like(XT)
    if var_type != "learned_range":
        return None
    C = XT.shape[-1]
    frac = (f64(out)[..., C:] + 1.0) / 2.0
    log_betas = np.log(coef(sch, "betas", t, XT))
    plvc = coef(sch, "posterior_log_variance_clipped", t, XT)
    return term_scale(frac * log_betas, (1.0 - frac) * plvc) + frac


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", ["linear1000", "cosine50"])
def test_p_mean_variance(case, shape, mean_type, var_type, clip):
    lib, sch = schedules_for(case)
    T = sch.num_timesteps
    rng = np.random.default_rng(3)
    shp = SHAPES[shape]
    t = t_batch(T, rng, shp[0])
    x_t = data(shp, rng)
    out = model_output_for(shp, var_type, rng)
    XT, OUT = f64(x_t), f64(out)
    got = gaussian.p_mean_variance(
        lib, out, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip
    )
    want = ref.p_mean_variance(
        sch, OUT, XT, t, mean_type=mean_type, var_type=var_type, clip_denoised=clip
    )
    msg = f"{case} {shape} {mean_type} {var_type} clip={clip}"
    mean_scale, x0_scale = pmv_scales(
        sch, OUT[..., : shp[-1]], XT, t, mean_type, clip, want.pred_xstart
    )
    lv_scale = log_variance_scale(sch, OUT, XT, t, var_type)
    assert_close(got.pred_xstart, want.pred_xstart, scale=x0_scale, err_msg=f"pred_xstart {msg}")
    assert_close(got.mean, want.mean, scale=mean_scale, err_msg=f"mean {msg}")
    assert_close(got.log_variance, want.log_variance, scale=lv_scale, err_msg=f"log_variance {msg}")
    # variance = exp(log_variance): an absolute error d in the log is a relative error d.
    var_rtol_scale = None if lv_scale is None else lv_scale * np.abs(want.variance)
    assert_close(got.variance, want.variance, scale=var_rtol_scale, err_msg=f"variance {msg}")


# ------------------------------------------------------------------------------------------
# normal_kl, the decoders
# ------------------------------------------------------------------------------------------


def kl_scale(m1, lv1, m2, lv2, *, m1_scale, m2_scale, lv1_scale=None, lv2_scale=None):
    """Rounding scale of normal_kl = 1/2(-1 + lv2 - lv1 + e^(lv1-lv2) + (m1-m2)^2 e^-lv2).

    The four terms cancel (to 0 when the Gaussians agree), so a float32 evaluation has an
    absolute error ~u times their magnitudes; the inputs' own errors (means summed from
    terms of size m*_scale, log variances of size lv*_scale) enter through the
    derivatives: 2|m1-m2| e^-lv2 per unit mean error, (1 + e^(lv1-lv2) + d^2 e^-lv2) per
    unit log-variance error.
    """
    m1, lv1, m2, lv2 = (f64(a) for a in (m1, lv1, m2, lv2))
    lv1_scale = np.abs(lv1) if lv1_scale is None else lv1_scale
    lv2_scale = np.abs(lv2) if lv2_scale is None else lv2_scale
    ratio = np.exp(lv1 - lv2)
    d2 = (m1 - m2) ** 2 * np.exp(-lv2)
    return 0.5 * (
        1.0
        + np.abs(lv1)
        + np.abs(lv2)
        + ratio * (1.0 + lv1_scale + lv2_scale)
        + lv1_scale
        + lv2_scale
        + d2 * (1.0 + lv2_scale)
        + 2.0 * np.abs(m1 - m2) * np.exp(-lv2) * (m1_scale + m2_scale)
    )


def test_normal_kl():
    rng = np.random.default_rng(5)
    shp = (6, 4, 4, 3)
    m1, m2 = data(shp, rng), data(shp, rng)
    lv1 = rng.uniform(-10, 3, size=shp).astype(np.float32)
    lv2 = rng.uniform(-10, 3, size=shp).astype(np.float32)
    lv2[0] = lv1[0]  # equal variances: only the mean term is left
    m2[1] = m1[1]  # equal means
    args = [f64(a) for a in (m1, lv1, m2, lv2)]
    want = ref.normal_kl(*args)
    scale = kl_scale(*args, m1_scale=np.abs(args[0]), m2_scale=np.abs(args[2]),
                     lv1_scale=0.0, lv2_scale=0.0)
    assert_close(losses.normal_kl(m1, lv1, m2, lv2), want, scale=scale)
    # KL(p || p) = 0, up to float32 rounding of -1 + lv2 - lv1 + 1 (terms of size 1 + |lv|,
    # here <= 11: atol 11 * 2u, ~1.3e-6).
    self_kl = np.asarray(losses.normal_kl(m1, lv1, m1, lv1))
    np.testing.assert_allclose(self_kl, 0.0, atol=11 * 2 * np.finfo(np.float32).eps)
    np.testing.assert_array_equal(ref.normal_kl(*args[:2], *args[:2]), 0.0)


def test_approx_standard_normal_cdf():
    x = np.linspace(-8, 8, 1601).astype(np.float32)
    # A cdf near 0 is 1 + tanh(z) (with z -> -inf), a cancellation in the float64 reference
    # and in any direct float32 evaluation: absolute tolerance 1e-6 (float32's rounding of
    # values near 1 is 6e-8; a few operations), relative 1e-5 elsewhere.
    got = np.asarray(losses.approx_standard_normal_cdf(x))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref.approx_standard_normal_cdf(f64(x)), rtol=1e-5, atol=1e-6)


def decoder_grid():
    """x on the whole 8-bit grid x means/log_scales putting x 0 .. 40 scales from the mean
    (on both sides) for scales from e^-9 (bins ~300 scales wide) to e^1."""
    x = (np.arange(256) / 127.5 - 1.0)
    dist = np.concatenate(
        [np.linspace(0, 4, 17), np.linspace(4.5, 12, 16), [15, 20, 25, 30, 35, 40]]
    )
    dist = np.concatenate([-dist[::-1], dist[1:]])
    log_scales = np.array([-9.0, -7.0, -5.5, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0])
    X, D, L = np.meshgrid(x, dist, log_scales, indexing="ij")
    means = X - D * np.exp(L)
    return (X.astype(np.float32), means.astype(np.float32), L.astype(np.float32))


def test_discretized_gaussian_log_likelihood_grid():
    x, means, log_scales = decoder_grid()
    got = np.asarray(
        losses.discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    )
    want = ref.discretized_gaussian_log_likelihood(
        f64(x), means=f64(means), log_scales=f64(log_scales)
    )
    assert got.shape == x.shape
    # rtol 1e-4: values run from ~0 to the floor log(1e-12) = -27.6, and the float64 naive
    # evaluation itself is only accurate to ~1e-16 absolute in probability, i.e. ~1e-4
    # relative in probability just above the floor. For the same reason, where the
    # probability is within 1e-15 of 1 (log p ~ -1e-15) the reference's own error is
    # ~1e-16 absolute: an absolute 1e-13 nats covers it and is far below anything a bound
    # in bits/dim can see.
    assert_close(got, want, rtol=1e-4, atol=1e-13)
    # The floor is reached (the deep tails are exercised) and so are values near 0.
    assert (want == np.log(1e-12)).mean() > 0.2
    assert (want > -1e-3).sum() > 100


def test_discretized_gaussian_log_likelihood_sums_to_one():
    """Reference self-check: the 256 bins of one Gaussian partition the real line."""
    x = np.arange(256) / 127.5 - 1.0
    for mean, log_scale in [(0.0, -3.0), (0.3, -1.0), (-0.99, -6.0), (2.0, 0.5)]:
        ll = ref.discretized_gaussian_log_likelihood(
            x, means=np.full_like(x, mean), log_scales=np.full_like(x, log_scale)
        )
        np.testing.assert_allclose(np.exp(ll).sum(), 1.0, rtol=1e-9)


def test_gaussian_log_likelihood():
    rng = np.random.default_rng(6)
    shp = (4, 4, 4, 3)
    x, means = data(shp, rng), data(shp, rng)
    log_scales = rng.uniform(-6, 1, size=shp).astype(np.float32)
    want = ref.gaussian_log_likelihood(f64(x), means=f64(means), log_scales=f64(log_scales))
    z = (f64(x) - f64(means)) * np.exp(-f64(log_scales))
    # Terms: the constant, the log scale, z^2/2 (z from a difference, relative error of z
    # ~u(|x|+|mean|)/|x-mean|, hence the |z| e^-log_scale (|x|+|mean|) term).
    scale = term_scale(0.5 * np.log(2 * np.pi), log_scales, 0.5 * z**2) + np.abs(z) * np.exp(
        -f64(log_scales)
    ) * term_scale(x, means)
    got = losses.gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert_close(got, want, scale=scale)
    # The continuous density integrates to 1 (reference self-check, 1-D Riemann sum).
    grid = np.linspace(-10, 10, 20001)
    dens = np.exp(ref.gaussian_log_likelihood(grid, means=0.3, log_scales=np.log(1.7)))
    np.testing.assert_allclose(dens.sum() * (grid[1] - grid[0]), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# The bound: vb terms, prior
# ------------------------------------------------------------------------------------------


def p_scales(sch, OUT, XT, t, mean_type, var_type, clip, want_p):
    """(mean scale, log-variance scale) of p_mean_variance's outputs."""
    C = XT.shape[-1]
    mean_scale, _ = pmv_scales(sch, OUT[..., :C], XT, t, mean_type, clip, want_p.pred_xstart)
    if mean_scale is None:  # xprev: the mean is the model output itself
        mean_scale = np.abs(OUT[..., :C])
    lv_scale = log_variance_scale(sch, OUT, XT, t, var_type)
    lv_scale = np.abs(want_p.log_variance) if lv_scale is None else lv_scale
    return mean_scale, lv_scale


def vb_scale(sch, OUT, X0, XT, t, mean_type, var_type, clip):
    """Per-example absolute scale (bits) of the KL terms (t > 0); 0 for the decoder at
    t = 0, which is compared with the plain relative tolerance."""
    p = ref.p_mean_variance(sch, OUT, XT, t, mean_type=mean_type, var_type=var_type,
                            clip_denoised=clip)
    true_mean, _, true_lv = ref.q_posterior_mean_variance(sch, X0, XT, t)
    c1 = coef(sch, "posterior_mean_coef1", t, X0)
    c2 = coef(sch, "posterior_mean_coef2", t, X0)
    mean_scale, lv_scale = p_scales(sch, OUT, XT, t, mean_type, var_type, clip, p)
    scale = kl_scale(
        true_mean, true_lv, p.mean, p.log_variance,
        m1_scale=term_scale(c1 * X0, c2 * XT), m2_scale=mean_scale, lv2_scale=lv_scale,
    )
    return np.where(t == 0, 0.0, ref.mean_flat(scale) / LN2)


@pytest.mark.parametrize("decoder", ["discretized", "gaussian"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize(
    "case,shape",
    [("linear1000", "image"), ("cosine50", "flat"), ("cosine1000", "image"), ("short10", "image")],
)
def test_vb_terms_bpd(case, shape, mean_type, var_type, clip, decoder):
    lib, sch = schedules_for(case)
    rng = np.random.default_rng(4)
    shp = SHAPES[shape]
    t = t_batch(sch.num_timesteps, rng, shp[0])
    x0 = images(shp, rng)
    x_t = (f64(gaussian.q_sample(lib, x0, t, noise=data(shp, rng)))).astype(np.float32)
    out = model_output_for(shp, var_type, rng)
    X0, XT, OUT = f64(x0), f64(x_t), f64(out)
    kw = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip, decoder_type=decoder)
    got = losses.vb_terms_bpd(lib, out, x0, x_t, t, **kw)
    want = ref.vb_terms_bpd(sch, OUT, X0, XT, t, **kw)
    assert_close(got["output"], want["output"],
                 scale=vb_scale(sch, OUT, X0, XT, t, mean_type, var_type, clip), err_msg="output")
    _, x0_scale = pmv_scales(sch, OUT[..., : shp[-1]], XT, t, mean_type, clip, want["pred_xstart"])
    assert_close(got["pred_xstart"], want["pred_xstart"], scale=x0_scale, err_msg="pred_xstart")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(SCHEDULE_CASES) + ["short10"])
def test_prior_bpd(case, shape):
    lib, sch = schedules_for(case)
    rng = np.random.default_rng(7)
    x0 = images(SHAPES[shape], rng)
    X0 = f64(x0)
    scale = prior_scale(sch, X0)
    assert_close(losses.prior_bpd(lib, x0), ref.prior_bpd(sch, X0), scale=scale)


# ------------------------------------------------------------------------------------------
# A deterministic model, written twice (JAX for the library, NumPy for the reference)
# ------------------------------------------------------------------------------------------


class LinearModel:
    """out = x_t @ W + b + (t / T) u per channel; a learned variance part is squashed:
    learned -> log variance -4 + 2 tanh(.), in (-6, -2); learned_range -> tanh(.)."""

    def __init__(self, C, var_type, T, seed=0):
        rng = np.random.default_rng(seed)
        C_out = 2 * C if var_type in LEARNED else C
        self.C, self.T, self.var_type = C, T, var_type
        # float32-representable weights: both implementations use identical values.
        self.W = (0.6 * np.eye(C, C_out) + 0.3 * rng.standard_normal((C, C_out))).astype(np.float32)
        self.b = (0.1 * rng.standard_normal(C_out)).astype(np.float32)
        self.u = (0.5 * rng.standard_normal(C_out)).astype(np.float32)

    def _squash(self, h, tanh, concat):
        C = self.C
        if self.var_type == "learned":
            return concat([h[..., :C], -4.0 + 2.0 * tanh(h[..., C:])])
        if self.var_type == "learned_range":
            return concat([h[..., :C], tanh(h[..., C:])])
        return h

    def numpy(self, x_t, t):
        x_t = f64(x_t)
        lead = (1,) * (x_t.ndim - 1)
        tt = (f64(t) / self.T).reshape((-1,) + lead)
        h = np.tensordot(x_t, f64(self.W), axes=1) + f64(self.b).reshape(lead + (-1,)) + tt * f64(
            self.u
        ).reshape(lead + (-1,))
        return self._squash(h, np.tanh, lambda xs: np.concatenate(xs, axis=-1))

    def jax(self, x_t, t):
        lead = (1,) * (x_t.ndim - 1)
        tt = (jnp.asarray(t).astype(jnp.float32) / self.T).reshape((-1,) + lead)
        h = (
            jnp.tensordot(x_t, self.W, axes=1)
            + self.b.reshape(lead + (-1,))
            + tt * self.u.reshape(lead + (-1,))
        )
        return self._squash(h, jnp.tanh, lambda xs: jnp.concatenate(xs, axis=-1))


def test_linear_model_twins_agree():
    rng = np.random.default_rng(8)
    for vt in VAR_TYPES:
        model = LinearModel(3, vt, 50)
        x = data((8, 4, 4, 3), rng)
        t = t_batch(50, rng)
        h = f64(model.numpy(x, t))
        assert_close(model.jax(x, t), h, scale=term_scale(h) + 1.0)


# ------------------------------------------------------------------------------------------
# Training losses
# ------------------------------------------------------------------------------------------

LOSS_VAR_COMBOS = (
    [("mse", v) for v in FIXED]
    + [(lt, v) for lt in ("kl", "rescaled_kl", "bound") for v in VAR_TYPES]
    + [("hybrid", v) for v in LEARNED]
)


def training_setup(case, shape, var_type, seed=9):
    lib, sch = schedules_for(case)
    rng = np.random.default_rng(seed)
    shp = SHAPES[shape]
    T = sch.num_timesteps
    t = t_batch(T, rng, shp[0])
    x0, noise = images(shp, rng), data(shp, rng)
    return lib, sch, t, x0, noise, LinearModel(shp[-1], var_type, T)


def prior_scale(sch, X0):
    """Absolute scale of prior_bpd: KL(N(a x0, 1-abar_T) || N(0, 1)) is ~1e-5 nats made of
    terms of size ~1 (-1 - lv + e^lv cancels almost entirely)."""
    t = np.full(X0.shape[0], sch.num_timesteps - 1)
    mean, _, lv = ref.q_mean_variance(sch, X0, t)
    kl = kl_scale(mean, lv, 0.0 * mean, 0.0 * lv, m1_scale=np.abs(mean), m2_scale=0.0)
    return ref.mean_flat(kl) / LN2


def loss_scales(sch, model, X0, N, t, mean_type, var_type, loss_type):
    """Absolute scales (per example) for 'vb' and 'loss' of training_losses.

    'vb' gets the scale of test_vb_terms_bpd (the KL of two nearly equal means: at large t
    both posterior means are ~coef2 x_t and differ by coef1 (x0 - pred_x0) ~ 1e-4, so the
    float32 means' rounding (~u) is a relative error ~1e-3 of the difference, and the KL,
    ~1e-6 bits there, is only good to a few 1e-2 relative: this is float32's limit, not a
    bug). 'loss' combines vb's scale with the weights of its loss type; 'mse' needs none.
    """
    XT = ref.q_sample(sch, X0, t, N)
    vb = vb_scale(sch, model.numpy(XT, t), X0, XT, t, mean_type, var_type, False)
    T = sch.num_timesteps
    weight = {"mse": 0.0, "kl": 1.0, "rescaled_kl": T, "hybrid": T / 1000.0, "bound": T}
    loss = weight[loss_type] * vb
    if loss_type == "bound":
        loss = loss + prior_scale(sch, X0)
    return vb, loss


@pytest.mark.parametrize("loss_type,var_type", LOSS_VAR_COMBOS)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize(
    "case,shape", [("linear1000", "image"), ("cosine50", "flat"), ("short10", "image")]
)
def test_training_losses(case, shape, mean_type, loss_type, var_type):
    lib, sch, t, x0, noise, model = training_setup(case, shape, var_type)
    kw = dict(mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    got = losses.training_losses(lib, model.jax, x0, t, noise=noise, **kw)
    X0, N = f64(x0), f64(noise)
    want = ref.training_losses(sch, model.numpy, X0, t, noise=N, **kw)
    vb_sc, loss_sc = loss_scales(sch, model, X0, N, t, mean_type, var_type, loss_type)
    assert_close(got["mse"], want["mse"], err_msg="mse")
    assert_close(got["vb"], want["vb"], scale=vb_sc, err_msg="vb")
    assert_close(got["loss"], want["loss"], scale=loss_sc, err_msg="loss")


@pytest.mark.parametrize("var_type", LEARNED)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("case", ["linear1000", "cosine50"])
def test_hybrid_loss_gradients(case, mean_type, var_type):
    """[ND21] Sec. 3.1: in L_hybrid the vb term must not move the mean (stop_gradient), so
    d loss / d(mean part) is exactly the mse's gradient 2 (out - target) / D; and the
    gradient reaching the variance part is that of T/1000 * vb (checked for 'learned',
    against a float64 central difference of the reference)."""
    lib, sch = schedules_for(case)
    rng = np.random.default_rng(13)
    shp = (8, 2, 2, 3)
    T, C, D = sch.num_timesteps, shp[-1], int(np.prod(shp[1:]))
    t = t_batch(T, rng, shp[0])
    x0, noise = images(shp, rng), data(shp, rng)
    model = LinearModel(C, var_type, T)
    X0, N = f64(x0), f64(noise)
    XT = ref.q_sample(sch, X0, t, N)
    OUT = model.numpy(XT, t)

    def total_loss(delta):
        out = losses.training_losses(
            lib, lambda x, tt: model.jax(x, tt) + delta, x0, t, noise=noise,
            mean_type=mean_type, var_type=var_type, loss_type="hybrid",
        )
        return out["loss"].sum()

    grad = np.asarray(jax.grad(total_loss)(jnp.zeros(shp[:-1] + (2 * C,), jnp.float32)))
    target = ref.training_target(sch, X0, XT, t, N, mean_type)
    want_mean = 2.0 * (OUT[..., :C] - target) / D
    # out - target cancels; both carry float32 x_t's error, amplified for xprev by coef2.
    assert_close(grad[..., :C], want_mean, scale=2.0 * term_scale(OUT[..., :C], target) / D,
                 err_msg="mean part")
    if var_type != "learned":
        return
    h = 1e-4  # central difference: truncation ~h^2, well above the decoder's float64 noise
    want_var = np.zeros(shp)
    for idx in np.ndindex(*shp):
        for sign in (1.0, -1.0):
            o = OUT.copy()
            o[idx[:-1] + (C + idx[-1],)] += sign * h
            vb = ref.vb_terms_bpd(sch, o, X0, XT, t, mean_type=mean_type, var_type=var_type)
            want_var[idx] += sign * vb["output"].sum() * T / 1000.0 / (2 * h)
    # d KL / d log-variance = 1/2 (1 - e^(lv1-lv2) - d^2 e^-lv2) cancels to ~0 where the
    # model's variance is right: entries are held to 1e-4 of the largest of their example.
    per_example = np.abs(want_var).reshape(shp[0], -1).max(axis=1).reshape(-1, 1, 1, 1)
    assert_close(grad[..., C:], want_var, rtol=1e-4, atol=1e-4 * per_example,
                 err_msg="variance part")


# ------------------------------------------------------------------------------------------
# The whole bound
# ------------------------------------------------------------------------------------------


def bpd_loop_scales(sch, model, X0, NOISE, mean_type, var_type, clip):
    """Absolute scales for vb, xstart_mse and mse of calc_bpd_loop, each (B, T).

    vb: as test_vb_terms_bpd. xstart_mse = mean (x0' - x0)^2: 2|x0' - x0| times x0''s own
    scale. mse compares eps' = (x_t/sqrt(abar) - x0')/sqrt(1/abar - 1) to the noise: eps''s
    scale is that of its two terms over sqrt(1/abar - 1) (~1/0.04 at t = 0 for T = 50).
    """
    B, T, C = X0.shape[0], sch.num_timesteps, X0.shape[-1]
    vb, xstart_mse, mse = (np.zeros((B, T)) for _ in range(3))
    for step in range(T):
        t = np.full(B, step)
        XT = ref.q_sample(sch, X0, t, NOISE[step])
        OUT = model.numpy(XT, t)
        vb[:, step] = vb_scale(sch, OUT, X0, XT, t, mean_type, var_type, clip)
        p = ref.p_mean_variance(sch, OUT, XT, t, mean_type=mean_type, var_type=var_type,
                                clip_denoised=clip)
        _, x0_scale = pmv_scales(sch, OUT[..., :C], XT, t, mean_type, clip, p.pred_xstart)
        xstart_mse[:, step] = ref.mean_flat(2 * np.abs(p.pred_xstart - X0) * x0_scale)
        eps = ref.predict_eps_from_xstart(sch, XT, t, p.pred_xstart)
        ra = coef(sch, "sqrt_recip_alphas_cumprod", t, X0)
        rm1 = coef(sch, "sqrt_recipm1_alphas_cumprod", t, X0)
        eps_scale = (term_scale(ra * XT, p.pred_xstart) + x0_scale) / rm1
        mse[:, step] = ref.mean_flat(2 * np.abs(eps - NOISE[step]) * eps_scale)
    return vb, xstart_mse, mse


BPD_CASES = (
    # Each loop compiles (~1 s), so not the whole cross product (test_vb_terms_bpd has it):
    # every mean type and every variance type twice, in two different pairings, clipped
    # on the linear schedule and unclipped on the cosine one; then the continuous decoder
    # and the short schedule's large prior.
    [("linear50", mt, vt, True, "discretized") for mt, vt in zip(MEAN_TYPES, VAR_TYPES)]
    + [("cosine50", mt, vt, False, "discretized")
       for mt, vt in zip(MEAN_TYPES, VAR_TYPES[2:] + VAR_TYPES[:2])]
    + [("cosine50", "eps", "learned_range", True, "gaussian"),
       ("linear50", "xstart", "fixed_large", False, "gaussian")]
    # a large prior term
    + [("short10", "v", "learned", True, "discretized"),
       ("short10", "xprev", "fixed_small", False, "discretized")]
)


@pytest.mark.parametrize("case,mean_type,var_type,clip,decoder", BPD_CASES)
def test_calc_bpd_loop(case, mean_type, var_type, clip, decoder):
    lib, sch = schedules_for(case)
    T = sch.num_timesteps
    rng = np.random.default_rng(10)
    shp = (3, 4, 4, 3)
    x0, noise = images(shp, rng), data((T,) + shp, rng)
    X0, NOISE = f64(x0), f64(noise)
    model = LinearModel(shp[-1], var_type, T)
    kw = dict(mean_type=mean_type, var_type=var_type, clip_denoised=clip, decoder_type=decoder)
    got = likelihood.calc_bpd_loop(lib, model.jax, x0, noise=noise, **kw)
    want = ref.calc_bpd_loop(sch, model.numpy, X0, noise=NOISE, **kw)
    vb_sc, xstart_sc, mse_sc = bpd_loop_scales(sch, model, X0, NOISE, mean_type, var_type, clip)
    prior_sc = prior_scale(sch, X0)
    assert_close(got["prior_bpd"], want["prior_bpd"], scale=prior_sc, err_msg="prior_bpd")
    assert_close(got["vb"], want["vb"], scale=vb_sc, err_msg="vb")
    assert_close(got["xstart_mse"], want["xstart_mse"], scale=xstart_sc, err_msg="xstart_mse")
    assert_close(got["mse"], want["mse"], scale=mse_sc, err_msg="mse")
    # A sum of T + 1 positive terms: float32 accumulation adds ~T/2 roundings of the
    # running sum on top of each term's own error, still far inside rtol 1e-5 for T = 50.
    assert_close(got["total_bpd"], want["total_bpd"], scale=vb_sc.sum(axis=1) + prior_sc,
                 err_msg="total_bpd")


# ------------------------------------------------------------------------------------------
# Self-checks of the reference: identities that hold whatever the library does
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(SCHEDULE_CASES) + ["short10"])
def test_reference_identities(case):
    _, sch = schedules_for(case)
    T = sch.num_timesteps
    rng = np.random.default_rng(11)
    B = 6
    t = np.array([0, 1, 2, T // 2, T - 2, T - 1])
    x0, eps = rng.standard_normal((B, 4, 3)), rng.standard_normal((B, 4, 3))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-10, atol=1e-10)

    # The cumulative product and the sqrt/log forms agree.
    close(sch.alphas_cumprod, np.cumprod(1 - sch.betas))
    close(sch.sqrt_alphas_cumprod**2 + sch.sqrt_one_minus_alphas_cumprod**2, 1.0)
    close(sch.sqrt_recipm1_alphas_cumprod**2 + 1, sch.sqrt_recip_alphas_cumprod**2)
    assert sch.posterior_variance[0] == 0.0
    close(sch.posterior_log_variance_clipped[0], sch.posterior_log_variance_clipped[1])
    # beta_tilde <= beta (eq. 7; the two fixed variances bound the optimal one).
    assert (sch.posterior_variance <= sch.betas * (1 + 1e-12)).all()

    # x_t at q's mean: the posterior mean is q's mean one step earlier,
    # coef1 + coef2 sqrt(abar_t) = sqrt(abar_{t-1}).
    q_mean, _, _ = ref.q_mean_variance(sch, x0, t)
    post_mean, _, _ = ref.q_posterior_mean_variance(sch, x0, q_mean, t)
    close(post_mean, ref.extract(np.sqrt(sch.alphas_cumprod_prev), t, x0) * x0)
    # Marginalising x_t out: Var[mu_tilde] + beta_tilde = 1 - abar_{t-1}, with
    # Var[mu_tilde | x0] = coef2^2 (1 - abar_t).
    close(
        sch.posterior_mean_coef2**2 * (1 - sch.alphas_cumprod) + sch.posterior_variance,
        1 - sch.alphas_cumprod_prev,
    )

    # Conversions round-trip.
    x_t = ref.q_sample(sch, x0, t, eps)
    close(ref.predict_xstart_from_eps(sch, x_t, t, eps), x0, rtol=1e-8, atol=1e-8)
    close(ref.predict_eps_from_xstart(sch, x_t, t, x0), eps, rtol=1e-7, atol=1e-7)
    v = ref.predict_v(sch, x0, t, eps)
    close(ref.predict_xstart_from_v(sch, x_t, t, v), x0)
    mu, _, _ = ref.q_posterior_mean_variance(sch, x0, x_t, t)
    close(ref.predict_xstart_from_xprev(sch, x_t, t, mu), x0, rtol=1e-8, atol=1e-8)

    # Every parameterisation of the true x0 / eps / v / mu gives the posterior mean, so
    # KL(q || p) = 0 for the fixed_small variance, t > 0.
    truth = {"eps": eps, "xstart": x0, "v": v, "xprev": mu}
    for mean_type, out in truth.items():
        p = ref.p_mean_variance(sch, out, x_t, t, mean_type=mean_type, var_type="fixed_small")
        close(p.mean, mu, rtol=1e-8, atol=1e-8)
        close(p.pred_xstart, x0, rtol=1e-7, atol=1e-7)
        # [HJA20] eq. 11: mu = (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha).
        if mean_type == "eps":
            eq11 = (
                x_t - ref.extract(sch.betas / np.sqrt(1 - sch.alphas_cumprod), t, x0) * eps
            ) / ref.extract(np.sqrt(sch.alphas), t, x0)
            close(p.mean, eq11, rtol=1e-8, atol=1e-8)
    out = ref.vb_terms_bpd(sch, x0, x0, x_t, t, mean_type="xstart", var_type="fixed_small")
    close(out["output"][t > 0], 0.0)
    # learned_range at the ends is the two fixed variances ([ND21] eq. 15).
    lr = np.concatenate([x0, np.ones_like(x0)], axis=-1)
    p_hi = ref.p_mean_variance(sch, lr, x_t, t, mean_type="xstart", var_type="learned_range")
    close(p_hi.log_variance, ref.extract(np.log(sch.betas), t, x0) * np.ones_like(x0))
    lr = np.concatenate([x0, -np.ones_like(x0)], axis=-1)
    p_lo = ref.p_mean_variance(sch, lr, x_t, t, mean_type="xstart", var_type="learned_range")
    p_fs = ref.p_mean_variance(sch, x0, x_t, t, mean_type="xstart", var_type="fixed_small")
    close(p_lo.log_variance, p_fs.log_variance)
    # fixed_large and beta agree except at t = 0.
    p_fl = ref.p_mean_variance(sch, x0, x_t, t, mean_type="xstart", var_type="fixed_large")
    close(p_fl.variance[1:], p_hi.variance[1:])


def test_reference_schedules_against_the_papers():
    # [HJA20] Sec. 4: 1e-4 .. 0.02 over T = 1000.
    b = ref.linear_betas(1000)
    assert b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-15
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)
    # [ND21] eq. 17: alpha_bar_t = f(t)/f(0) while no beta is clipped.
    T, s = 1000, 0.008
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    abar = ref.schedule_from_betas(ref.cosine_betas(T)).alphas_cumprod
    np.testing.assert_allclose(abar[:-1], (f[1:] / f[0])[:-1], rtol=1e-9)
    assert ref.cosine_betas(T)[-1] == 0.999
    # [SD15]: 1/(T - t + 1).
    b = ref.sohl_dickstein_betas(5, beta_1=1e-3)
    np.testing.assert_allclose(b, [1e-3, 1 / 4, 1 / 3, 1 / 2, 0.999])


@pytest.mark.parametrize("var_type", VAR_TYPES)
@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_reference_bound_telescopes_for_a_perfect_model(mean_type, var_type):
    """With the data a single point x0 and a model that outputs the true x0 (in any
    parameterisation) with beta_tilde as its variance, every KL term is 0: the bound is
    the prior term plus the decoder term alone."""
    _, sch = schedules_for("linear50")
    rng = np.random.default_rng(12)
    x0 = np.asarray(images((2, 3, 3, 3), rng), np.float64)
    noise = rng.standard_normal((sch.num_timesteps,) + x0.shape)

    def model(x_t, t):
        mean_part = {
            "xstart": x0,
            "eps": ref.predict_eps_from_xstart(sch, x_t, t, x0),
            "v": ref.predict_v(sch, x0, t, ref.predict_eps_from_xstart(sch, x_t, t, x0)),
            "xprev": ref.q_posterior_mean_variance(sch, x0, x_t, t)[0],
        }[mean_type]
        if var_type == "learned":
            lv = ref.extract(sch.posterior_log_variance_clipped, t, x0) * np.ones_like(x0)
            return np.concatenate([mean_part, lv], axis=-1)
        if var_type == "learned_range":
            return np.concatenate([mean_part, -np.ones_like(x0)], axis=-1)
        return mean_part

    out = ref.calc_bpd_loop(sch, model, x0, noise=noise, mean_type=mean_type,
                            var_type=var_type, clip_denoised=False)
    if var_type == "fixed_large":
        assert (out["vb"][:, 1:] > 0).all()  # beta != beta_tilde costs bits
    else:
        np.testing.assert_allclose(out["vb"][:, 1:], 0.0, atol=1e-9)
    np.testing.assert_allclose(out["xstart_mse"], 0.0, atol=1e-12)
    np.testing.assert_allclose(out["mse"], 0.0, atol=1e-12)  # eps' is the noise itself
    np.testing.assert_allclose(
        out["total_bpd"], out["prior_bpd"] + out["vb"].sum(axis=1), rtol=1e-12
    )
