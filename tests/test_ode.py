"""The shared ODE integrator and the divergence estimators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import ode


def _linear(a, y, t):
    return a * y * (1.0 + t)  # y(t) = y0 exp(a (t + t^2 / 2) | t0..t1)


def _exact(a, y0, t0, t1):
    return y0 * np.exp(a * ((t1 + t1**2 / 2) - (t0 + t0**2 / 2)))


Y0 = jnp.array([1.0, -2.0, 0.5])


@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (1.0, 1e-3)])
def test_adaptive_solvers_match_the_exact_solution_and_report_nfe(t0, t1):
    drift = Partial(_linear, jnp.float32(-1.3))
    want = _exact(-1.3, np.asarray(Y0, np.float64), t0, t1)
    for solver in ode.ADAPTIVE_SOLVERS:
        nfes = []
        for tol in (1e-3, 1e-6):
            out = ode.solve_ode(drift, Y0, t0, t1, solver=solver, rtol=tol, atol=tol)
            np.testing.assert_allclose(out["y"], want, rtol=50 * tol, atol=50 * tol)
            nfes.append(int(out["nfe"]))
        assert nfes[1] > nfes[0]  # tighter tolerance, more evaluations


@pytest.mark.parametrize("solver", ode.SOLVERS)
def test_nfe_counts_every_evaluation(solver):
    calls = []

    def drift(y, t):
        jax.debug.callback(lambda: calls.append(1))  # the test's own counter
        return -y * jnp.cos(3.0 * t)

    kw = {"num_steps": 7} if solver in ode.FIXED_SOLVERS else {"rtol": 1e-6, "atol": 1e-6}
    out = ode.solve_ode(drift, Y0, 0.0, 1.0, solver=solver, **kw)
    jax.effects_barrier()
    assert int(out["nfe"]) == len(calls) > 0


def test_fixed_step_orders():
    drift = Partial(_linear, jnp.float32(-1.0))
    want = _exact(-1.0, 1.0, 0.0, 1.0)
    errors = {}
    for solver in ode.FIXED_SOLVERS:
        errs = [abs(float(ode.solve_ode(drift, jnp.ones(1), 0.0, 1.0, solver=solver,
                                        num_steps=n)["y"][0]) - want) for n in (20, 40)]
        errors[solver] = errs[0] / errs[1]
    assert 1.8 < errors["euler"] < 2.2 and 3.6 < errors["heun"] < 4.4  # orders 1 and 2


def test_one_compilation_for_new_parameters_and_no_host_callback():
    traces = []

    def drift(a, y, t):
        traces.append(1)  # runs only while tracing
        return a * y

    for a in (-1.0, -2.0, -0.5):
        ode.solve_ode(Partial(drift, jnp.float32(a)), Y0, 0.0, 1.0)
    # diffrax traces the vector field a fixed number of times within one trace.
    first = len(traces)
    ode.solve_ode(Partial(drift, jnp.float32(3.0)), Y0 + 1.0, 0.0, 1.0)
    assert len(traces) == first
    jaxpr = str(jax.make_jaxpr(
        lambda a, y: ode._solve(Partial(drift, a), y, 0.0, 1.0, solver="tsit5", num_steps=None,
                                rtol=1e-5, atol=1e-5, max_steps=64))(jnp.float32(-1.0), Y0))
    assert "callback" not in jaxpr and "while" in jaxpr


def test_exhausted_budget_is_an_error():
    drift = Partial(_linear, jnp.float32(-30.0))
    with pytest.raises(ode.ODEBudgetExhaustedError, match="max_steps = 3"):
        ode.solve_ode(drift, Y0, 0.0, 1.0, rtol=1e-8, atol=1e-8, max_steps=3)
    out = ode.solve_ode(drift, Y0, 0.0, 1.0, rtol=1e-8, atol=1e-8, max_steps=3, check=False)
    assert not bool(out["success"])


def test_pytree_state():
    drift = Partial(lambda y, t: {"x": -y["x"], "s": jnp.sum(y["x"])[None]})
    out = ode.solve_ode(drift, {"x": Y0, "s": jnp.zeros(1)}, 0.0, 1.0, solver="heun",
                        num_steps=200)
    np.testing.assert_allclose(out["y"]["x"], np.asarray(Y0) * np.exp(-1.0), rtol=1e-4)
    np.testing.assert_allclose(out["y"]["s"], [float(jnp.sum(Y0)) * (1 - np.exp(-1.0))],
                               rtol=1e-4)


def test_divergences_of_a_linear_map(rng):
    mats = jnp.asarray(rng.standard_normal((2, 6, 6)), jnp.float32)  # per example (6 x 6)

    def fn(x):
        return jnp.einsum("bij,bj->bi", mats, x.reshape(2, 6)).reshape(x.shape)

    x = jnp.asarray(rng.standard_normal((2, 3, 2)), jnp.float32)
    traces = np.trace(np.asarray(mats, np.float64), axis1=1, axis2=2)
    np.testing.assert_allclose(ode.divergence_exact(fn, x), traces, rtol=1e-5, atol=1e-5)
    probes = ode.draw_probes(jax.random.key(0), (3,) + x.shape)
    v = np.asarray(probes, np.float64).reshape(3, 2, 6)
    want = np.einsum("kbi,bij,kbj->b", v, np.asarray(mats, np.float64), v) / 3
    np.testing.assert_allclose(ode.divergence_hutchinson(fn, x, probes), want, rtol=1e-5,
                               atol=1e-5)
    many = ode.draw_probes(jax.random.key(1), (20000,) + x.shape, "gaussian")
    # Var of v^T A v for Gaussian v is ||A||_F^2 + tr(A^2); 5 standard errors.
    m64 = np.asarray(mats, np.float64)
    sd = np.sqrt(np.sum(m64**2, axis=(1, 2)) + np.einsum("bij,bji->b", m64, m64)) / np.sqrt(20000)
    assert np.all(np.abs(np.asarray(ode.divergence_hutchinson(fn, x, many)) - traces) < 5 * sd)


def test_bad_inputs():
    drift = Partial(_linear, jnp.float32(-1.0))
    with pytest.raises(ValueError, match="'euler', 'heun', 'tsit5', 'dopri5'"):
        ode.solve_ode(drift, Y0, 0.0, 1.0, solver="rk4")
    with pytest.raises(ValueError, match="rtol must be a finite number > 0"):
        ode.solve_ode(drift, Y0, 0.0, 1.0, rtol=0.0)
    with pytest.raises(ValueError, match="atol must be a finite number > 0"):
        ode.solve_ode(drift, Y0, 0.0, 1.0, atol=-1.0)
    with pytest.raises(ValueError, match="needs num_steps"):
        ode.solve_ode(drift, Y0, 0.0, 1.0, solver="heun")
    with pytest.raises(ValueError, match="probes must have shape"):
        ode.divergence_hutchinson(lambda x: x, jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="'rademacher', 'gaussian'"):
        ode.draw_probes(jax.random.key(0), (2,), "uniform")
