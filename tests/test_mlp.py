"""Tests for diffusion_jax.models.mlp: time-conditioned MLPs with a per-step readout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import MLP

T, BATCH, DIM = 7, 5, 2
SMALL = dict(num_timesteps=T, features=(16, 16), time_embedding_dim=8)


@pytest.fixture
def data(key):
    x = jax.random.normal(key, (BATCH, DIM))
    t = jnp.array([0, 3, 3, 6, 1], jnp.int32)
    return x, t


def _init(model, x, t):
    return model.init(jax.random.key(0), x, t)["params"]


@pytest.mark.parametrize("out_dim", [None, 2 * DIM])
@pytest.mark.parametrize("per_step_readout", [False, True])
def test_output_shape_and_dtype(data, out_dim, per_step_readout):
    x, t = data
    model = MLP(**SMALL, out_dim=out_dim, per_step_readout=per_step_readout)
    out = model.apply({"params": _init(model, x, t)}, x, t)
    assert out.shape == (BATCH, out_dim or DIM)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_sinusoidal_embedding_makes_output_depend_on_t(data):
    x, t = data
    model = MLP(**SMALL)
    params = _init(model, x, t)
    out_a = model.apply({"params": params}, x, t)
    out_b = model.apply({"params": params}, x, (t + 1) % T)
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-4


@pytest.mark.parametrize("time_embedding", ["none", "sinusoidal"])
def test_per_step_readout_uses_only_row_t(data, time_embedding):
    x, t = data
    model = MLP(**SMALL, per_step_readout=True, time_embedding=time_embedding, out_dim=3)
    params = _init(model, x, t)
    assert params["readout_kernel"].shape == (T, 16, 3)
    assert params["readout_bias"].shape == (T, 3)
    assert "readout" not in params

    for b in range(BATCH):
        grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t)[b]))(params)
        for name in ("readout_kernel", "readout_bias"):
            g = np.asarray(grads[name])
            others = np.arange(T) != int(t[b])
            np.testing.assert_array_equal(g[others], 0.0)
            assert np.any(g[int(t[b])] != 0.0)


NUMPY_ACTIVATIONS = {
    "swish": lambda a: a / (1.0 + np.exp(-a)),
    "relu": lambda a: np.maximum(a, 0.0),
    "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "centered_sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)) - 0.5,
    "tanh": np.tanh,
}


@pytest.mark.parametrize("activation", sorted(NUMPY_ACTIVATIONS))
def test_per_step_readout_model_matches_numpy(data, activation):
    # With time_embedding='none' the hidden layers ignore t (Sohl-Dickstein et al. 2015): the
    # output is the shared features times the readout of step t.
    x, t = data
    model = MLP(**SMALL, per_step_readout=True, time_embedding="none", activation=activation)
    params = _init(model, x, t)
    params["readout_bias"] = jax.random.normal(jax.random.key(1), params["readout_bias"].shape)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(x, np.float64)
    for i in range(2):
        h = NUMPY_ACTIVATIONS[activation](h @ p[f"hidden_{i}"]["kernel"] + p[f"hidden_{i}"]["bias"])
    tt = np.asarray(t)
    want = np.einsum("bh,bho->bo", h, p["readout_kernel"][tt]) + p["readout_bias"][tt]
    np.testing.assert_allclose(model.apply({"params": params}, x, t), want, rtol=1e-5, atol=1e-5)


def test_centered_sigmoid_computes_what_sigmoid_units_compute(data):
    # sigmoid(x) - 1/2 is a reparameterisation, not a new unit: moving -W 1/2 into the next
    # layer's bias turns the centred network into a plain sigmoid one with the same output.
    x, t = data
    centred = MLP(**SMALL, per_step_readout=True, time_embedding="none",
                  activation="centered_sigmoid")
    plain = MLP(**SMALL, per_step_readout=True, time_embedding="none", activation="sigmoid")
    params = _init(centred, x, t)
    hidden = params["hidden_1"]
    shifted = dict(
        params,
        hidden_1=dict(hidden, bias=hidden["bias"] - 0.5 * jnp.sum(hidden["kernel"], axis=0)),
        readout_bias=params["readout_bias"] - 0.5 * jnp.sum(params["readout_kernel"], axis=1),
    )
    out_c = centred.apply({"params": params}, x, t)
    np.testing.assert_allclose(plain.apply({"params": shifted}, x, t), out_c,
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain.apply({"params": params}, x, t), out_c, atol=1e-3)


def test_works_under_jit_with_traced_t(data):
    x, t = data
    model = MLP(**SMALL, per_step_readout=True)
    params = _init(model, x, t)
    jitted = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(params, x, t)
    np.testing.assert_allclose(jitted, model.apply({"params": params}, x, t), rtol=1e-5, atol=1e-6)


# --- errors at the boundary ---------------------------------------------------------------


def test_rejects_unknown_activation(data):
    x, t = data
    valid = r"\['centered_sigmoid', 'relu', 'sigmoid', 'swish', 'tanh'\]"
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'; valid: " + valid):
        MLP(**SMALL, activation="gelu").init(jax.random.key(0), x, t)


def test_rejects_unknown_time_embedding(data):
    x, t = data
    with pytest.raises(ValueError, match=r"unknown time_embedding 'learned'; valid: "
                                         r"\['sinusoidal', 'none'\]"):
        MLP(**SMALL, time_embedding="learned").init(jax.random.key(0), x, t)


def test_rejects_model_that_ignores_t(data):
    x, t = data
    with pytest.raises(ValueError, match="would ignore t"):
        MLP(**SMALL, time_embedding="none").init(jax.random.key(0), x, t)


def test_rejects_bad_shapes(data):
    x, t = data
    model = MLP(**SMALL)
    with pytest.raises(ValueError, match=r"x must have shape \(B, D\) .*got shape \(5, 2, 1\)"):
        model.init(jax.random.key(0), x[..., None], t)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(5,\), got shape \(4,\)"):
        model.init(jax.random.key(0), x, t[:4])
    with pytest.raises(ValueError, match="t must be an integer array, got dtype float32"):
        model.init(jax.random.key(0), x, t.astype(jnp.float32))


@pytest.mark.parametrize("bad_t", [[0, 1, 2, 3, T], [-1, 0, 0, 0, 0]])
def test_rejects_concrete_t_out_of_range(data, bad_t):
    x, _ = data
    model = MLP(**SMALL, per_step_readout=True)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 7\)"):
        model.init(jax.random.key(0), x, jnp.array(bad_t, jnp.int32))


def test_traced_t_is_not_range_checked(data):
    # Inside jit the values of t are unknown at trace time: the range is the caller's duty.
    x, t = data
    model = MLP(**SMALL, per_step_readout=True)
    params = _init(model, x, t)
    out = jax.jit(lambda t: model.apply({"params": params}, x, t))(jnp.full((BATCH,), T))
    assert out.shape == (BATCH, DIM)


def test_temporal_basis_rows_are_normalised_bumps():
    from diffusion_jax.models.mlp import temporal_basis

    phi = temporal_basis(2000, 64)
    assert phi.shape == (2000, 64) and phi.dtype == np.float32
    np.testing.assert_allclose(phi.sum(axis=1), 1.0, rtol=1e-5)
    peaks = phi.argmax(axis=1)
    assert peaks[0] == 0 and peaks[-1] == 63 and np.all(np.diff(peaks) >= 0)
    np.testing.assert_array_equal(temporal_basis(5, 1), np.ones((5, 1), np.float32))
    with pytest.raises(ValueError, match=r"readout_basis must lie in \[1, num_timesteps = 5\]; got 6"):
        temporal_basis(5, 6)


@pytest.mark.parametrize("basis", [0, 3])
def test_blocked_rows_equal_per_row_readouts(data, basis):
    """(S, B, D) blocks with one step each give what the (S B, D) rows give."""
    x, _ = data
    model = MLP(**SMALL, per_step_readout=True, time_embedding="none", readout_basis=basis)
    steps = jnp.array([0, 3, 6], jnp.int32)
    blocks = jnp.stack([x, 2 * x, -x])  # (3, BATCH, DIM)
    params = _init(model, x, jnp.zeros((BATCH,), jnp.int32))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    blocked = model.apply({"params": params}, blocks, steps)
    rows = model.apply({"params": params}, blocks.reshape(-1, DIM), jnp.repeat(steps, BATCH))
    np.testing.assert_allclose(blocked.reshape(rows.shape), rows, rtol=1e-5, atol=1e-6)


def test_basis_readout_is_smooth_in_t_and_needs_per_step_readout(data):
    x, _ = data
    model = MLP(**SMALL, per_step_readout=True, time_embedding="none", readout_basis=2)
    params = _init(model, x, jnp.zeros((BATCH,), jnp.int32))
    assert params["readout_basis_kernel"].shape == (2, 16, DIM) and "readout_kernel" not in params
    one = x[:1]
    outs = np.stack([model.apply({"params": params}, one, jnp.array([s])) for s in range(T)])[:, 0]
    # Two bumps: every step's output lies between the two basis readouts' outputs.
    ends = outs[[0, -1]]
    assert np.all(outs >= ends.min(axis=0) - 1e-5) and np.all(outs <= ends.max(axis=0) + 1e-5)
    with pytest.raises(ValueError, match="readout_basis > 0 needs per_step_readout=True"):
        MLP(**SMALL, readout_basis=2).init(jax.random.key(0), x, jnp.zeros((BATCH,), jnp.int32))
