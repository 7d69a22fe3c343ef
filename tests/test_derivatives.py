"""Derivatives in every direction through the default model path: ``jax.jvp`` against
central finite differences and against ``jax.vjp`` transposes, ``jax.jacfwd`` against
``jax.jvp``, ``jax.linearize`` against ``jax.jvp``, and Hessian-vector products
(forward over reverse) against finite differences of the gradient. All in float64 on the
CPU, so that the finite differences are accurate far below the tolerances.

The CIFAR-10 U-Net is checked with its channel configuration (ch 128, ch_mult
(1, 2, 2, 2), two residual blocks per level, dropout 0.1, 35.7M parameters) on 8x8
images instead of 32x32, with its attention moved from the 16x16 level to the 4x4 level
(at 32x32 the attention sits at the second level; at 8x8 the second level is 4x4): the
same layers and parameter shapes at a sixteenth of the pixels, so the test stays cheap.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import MLP, NormalizedRBF, UNet

CIFAR_AT_8X8 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(4,),
                    dropout=0.1)
# Two levels with no block of their own on the way down: conv_in, the stride-2
# downsampling, the middle (two residual blocks around attention), one residual block per
# level on the way up and the upsampling's phase convolutions: every kind of layer.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=0, attn_resolutions=(), dropout=0.1)
# Central differences in float64: truncation error ~ h**2 |f'''|, rounding ~ 1e-16 / h.
_STEP = 1e-5


def _random_like(tree, key, scale=1.0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])


def _axpy(a, x, y):
    return jax.tree.map(lambda x_, y_: a * x_ + y_, x, y)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _params(shapes, seed):
    """Random float64 parameters of the given shapes (NumPy: initialising 35.7M float64
    parameters with JAX's initialisers op by op takes minutes on two cores). Kernels
    ~ N(0, 1 / fan_in), so that activations stay O(1) through every layer (DDPM's own
    init puts the last layer of every block near 0, which would hide those layers from
    the derivatives); GroupNorm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        z = rng.standard_normal(shape.shape)
        if len(shape.shape) >= 2:
            return jnp.asarray(z / np.sqrt(np.prod(shape.shape[:-1])))
        offset = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(offset + 0.1 * z)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _unet_problem(config, size, batch, *, train):
    """f(params, x) of a float64 U-Net, its inputs, and random directions of both."""
    model = UNet(**config, dtype=jnp.float64, param_dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (batch, size, size, 3), jnp.float64)
    t = jnp.arange(batch, dtype=jnp.int32) * 97 + 5
    shapes = jax.eval_shape(lambda: model.init(keys[1], x, t, train=False)["params"])
    params = _params(shapes, seed=1)
    rngs = {"dropout": keys[3]}

    def f(p, x_):
        return model.apply({"params": p}, x_, t, train=train, rngs=rngs)

    return f, params, x, _params(shapes, seed=2), jax.random.normal(keys[5], x.shape,
                                                                        jnp.float64)


def _check_jvp(f, params, x, dparams, dx, rtol):
    """jvp against central differences, op by op (no whole-program compile)."""
    _, ydot = jax.jvp(f, (params, x), (dparams, dx))
    plus = f(_axpy(_STEP, dparams, params), x + _STEP * dx)
    minus = f(_axpy(-_STEP, dparams, params), x - _STEP * dx)
    fd = (plus - minus) / (2 * _STEP)
    assert ydot.dtype == jnp.float64 and float(jnp.max(jnp.abs(ydot))) > 1e-3
    np.testing.assert_allclose(ydot, fd, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(fd))))


def test_cifar_unet_jvp_matches_finite_differences_and_vjp():
    """The CIFAR channel configuration (module doc), eval mode, in every parameter and
    the input at once: rtol 1e-5 (the target), atol 1e-5 of the largest component. (The
    vjp transpose is checked on the tiny U-Net below, whose layers are the same kinds.)"""
    with jax.enable_x64(True):
        f, params, x, dparams, dx = _unet_problem(CIFAR_AT_8X8, 8, 1, train=False)
        assert sum(p.size for p in jax.tree.leaves(params)) == 35_746_307
        _check_jvp(f, params, x, dparams, dx, rtol=1e-5)


def _every_direction(f, params, x, dparams, dx):
    """One program (one compile) with every derivative of ``f(params, x)`` the tests
    compare: jvp in (params, x) and its central difference, the two sides of
    <u, J v> = <J^T u, v>, jacfwd in x (contracted with dx: the jvp), linearize's jvp
    (against jvp's), and a Hessian-vector
    product (forward over reverse) of a scalar loss in x with the central difference of
    its gradient."""
    fx = lambda x_: f(params, x_)
    loss = lambda x_: jnp.sum(jnp.sin(fx(x_)))
    grad = jax.grad(loss)

    @jax.jit
    def run(p, x_, dp, dx_):
        y, ydot = jax.jvp(f, (p, x_), (dp, dx_))
        fd = (f(_axpy(_STEP, dp, p), x_ + _STEP * dx_)
              - f(_axpy(-_STEP, dp, p), x_ - _STEP * dx_)) / (2 * _STEP)
        u = jax.random.normal(jax.random.key(7), y.shape, y.dtype)
        transposed = _vdot(jax.vjp(f, p, x_)[1](u), (dp, dx_))
        _, f_lin = jax.linearize(fx, x_)
        return dict(
            ydot=ydot, fd=fd, forward=jnp.vdot(u, ydot), transposed=transposed,
            jacfwd=jax.jacfwd(fx)(x_),
            lin=f_lin(dx_), jvp_x=jax.jvp(fx, (x_,), (dx_,))[1],
            hvp=jax.jvp(grad, (x_,), (dx_,))[1],
            hvp_fd=(grad(x_ + _STEP * dx_) - grad(x_ - _STEP * dx_)) / (2 * _STEP),
            dx=dx_)

    return run(params, x, dparams, dx)


def _assert_every_direction(r, rtol):
    assert r["ydot"].dtype == jnp.float64 and float(jnp.max(jnp.abs(r["ydot"]))) > 1e-3
    for got, want in (("ydot", "fd"), ("hvp", "hvp_fd")):
        scale = float(jnp.max(jnp.abs(r[want])))
        np.testing.assert_allclose(r[got], r[want], rtol=rtol, atol=rtol * scale,
                                   err_msg=got)
    np.testing.assert_allclose(r["forward"], r["transposed"], rtol=1e-10)
    jac_dx = jnp.tensordot(r["jacfwd"], r["dx"], r["dx"].ndim)
    np.testing.assert_allclose(jac_dx, r["jvp_x"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(r["lin"], r["jvp_x"], rtol=1e-10, atol=1e-12)


def test_tiny_unet_in_training_mode_every_direction():
    """Two levels (a stride-2 downsampling, the phase convolutions of the upsampling),
    attention, and dropout active (its mask fixed by the rng): `_every_direction`."""
    with jax.enable_x64(True):
        f, params, x, dparams, dx = _unet_problem(TINY, 4, 1, train=True)
        r = _every_direction(f, params, x, dparams, dx)
        assert r["jacfwd"].shape == x.shape + x.shape
        _assert_every_direction(r, rtol=1e-6)


@pytest.mark.parametrize("make_model", [
    lambda: MLP(num_timesteps=10, features=(16, 16)),
    lambda: MLP(num_timesteps=10, features=(16,), activation="centered_sigmoid",
                time_embedding="none", per_step_readout=True, readout_basis=3),
    lambda: NormalizedRBF(num_timesteps=10, num_hidden=8),
], ids=["mlp", "mlp_2015_readout", "rbf"])
def test_vector_models_every_direction(make_model):
    """The MLPs and the RBF net: `_every_direction`."""
    with jax.enable_x64(True):
        model = make_model()
        keys = jax.random.split(jax.random.key(1), 5)
        x = jax.random.normal(keys[0], (4, 3), jnp.float64)
        t = jnp.asarray([0, 3, 6, 9], jnp.int32)
        params = jax.tree.map(lambda p: p.astype(jnp.float64),
                              model.init(keys[1], x, t)["params"])
        params = _axpy(1.0, _random_like(params, keys[2], 0.1), params)
        f = lambda p, x_: model.apply({"params": p}, x_, t)
        r = _every_direction(f, params, x, _random_like(params, keys[3]),
                             jax.random.normal(keys[4], x.shape, jnp.float64))
        _assert_every_direction(r, rtol=1e-6)


def test_opt_in_cpu_kernels_are_reverse_mode_only():
    """The opt-ins are custom_vjps: forward mode through them fails with JAX's own error,
    which the README and the docstrings state; the default path has no such limit."""
    model = UNet(**TINY, cpu_kernels="dilated")
    x = jnp.ones((1, 4, 4, 3))
    t = jnp.zeros((1,), jnp.int32)
    params = _params(jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False)),
                     seed=0)
    f = lambda x_: model.apply(params, x_, t, train=False)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(f, (x,), (x,))
