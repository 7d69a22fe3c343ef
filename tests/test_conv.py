"""The convolution of `diffusion_jax.models.conv`: values and both gradients in every
weight-gradient form against float64 NumPy sums over windows, the program each form
compiles to, the drop-in `Conv` module, and the U-Net with either form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet, conv

from tests.test_unet import TINY, _inputs, _param_shapes, _random_params


def _windows(x, kernel_shape, strides, padding, out_shape):
    """xp[n, o_h * s_h + i, o_w * s_w + j, c] for every tap (i, j): (KH, KW, N, OH, OW, C)."""
    (lo_h, hi_h), (lo_w, hi_w) = padding
    xp = np.pad(x, ((0, 0), (lo_h, max(hi_h, 0)), (lo_w, max(hi_w, 0)), (0, 0)))
    kh, kw = kernel_shape[:2]
    _, oh, ow, _ = out_shape
    sh, sw = strides
    return np.stack([np.stack([xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                               for j in range(kw)]) for i in range(kh)])


def _numpy_conv_and_weight_grad(x, kernel, dy, strides, padding):
    """Float64 forward convolution and dL/dkernel, written from the definition:
    y[n, p, q, o] = sum_{i, j, c} xp[n, p s + i, q s + j, c] w[i, j, c, o] and
    dL/dw[i, j, c, o] = sum_{n, p, q} xp[n, p s + i, q s + j, c] dy[n, p, q, o]."""
    x, kernel, dy = (np.asarray(a, np.float64) for a in (x, kernel, dy))
    win = _windows(x, kernel.shape, strides, padding, dy.shape)
    y = np.einsum("ijnpqc,ijco->npqo", win, kernel)
    dw = np.einsum("ijnpqc,npqo->ijco", win, dy)
    return y, dw


# (image (H, W), kernel (KH, KW), strides, padding): the U-Net's 3x3 'SAME' convolutions,
# its stride-2 downsampling (even size; odd size, whose last row is never read), the 2x2
# phase convolutions of its upsampling (asymmetric padding), a 1x1 'VALID' one, and a
# rectangular image with a rectangular kernel and unequal strides.
CASES = [
    ((8, 8), (3, 3), (1, 1), "SAME"),
    ((8, 8), (3, 3), (2, 2), "SAME"),
    ((7, 7), (3, 3), (2, 2), "SAME"),
    ((6, 6), (2, 2), (1, 1), ((1, 0), (0, 1))),
    ((5, 5), (1, 1), (1, 1), "VALID"),
    ((6, 10), (3, 1), (1, 2), ((1, 1), (0, 0))),
]


@pytest.mark.parametrize("image, kernel_hw, strides, padding", CASES)
@pytest.mark.parametrize("cpu_kernels", ["none", "dilated"])
def test_values_and_gradients_match_numpy(image, kernel_hw, strides, padding, cpu_kernels):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, *image, 3))
    kernel = jax.random.normal(keys[1], (*kernel_hw, 3, 4))
    fn = lambda x, k: conv.conv2d(x, k, strides, padding, cpu_kernels=cpu_kernels)
    y, vjp = jax.vjp(jax.jit(fn), x, kernel)
    dy = jax.random.normal(keys[2], y.shape)
    dx, dkernel = vjp(dy)

    pads = (jax.lax.padtype_to_pads(image, kernel_hw, strides, padding)
            if isinstance(padding, str) else padding)
    y_np, dw_np = _numpy_conv_and_weight_grad(x, kernel, dy, strides, pads)
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dkernel, dw_np, rtol=1e-5, atol=1e-5)
    # dL/dx is XLA's own in both forms: the transpose of the plain convolution.
    plain = lambda x: jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    (dx_plain,) = jax.vjp(plain, x)[1](dy)
    np.testing.assert_allclose(dx, dx_plain, rtol=1e-6, atol=1e-6)


def test_dilated_weight_grad_at_a_size_xla_runs_in_a_library():
    """At the CIFAR U-Net's first level (32x32, 128 channels; XLA sends such convolutions
    to YNNPACK or Eigen rather than its generic loop) the two forms agree to float32
    rounding of a 512-term-per-thread sum."""
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (2, 32, 32, 128))
    kernel = jax.random.normal(keys[1], (3, 3, 128, 128)) * 0.05
    dy = jax.random.normal(keys[2], (2, 32, 32, 128))

    def weight_grad(form):
        f = lambda k: conv.conv2d(x, k, cpu_kernels=form)
        return jax.jit(lambda dy: jax.vjp(f, kernel)[1](dy)[0])(dy)

    _, expected = _numpy_conv_and_weight_grad(x, kernel, dy, (1, 1), ((1, 1), (1, 1)))
    for form in ("none", "dilated"):
        np.testing.assert_allclose(weight_grad(form), expected, rtol=1e-4, atol=2e-3)


def _lowered_gradient(cpu_kernels):
    x = jnp.zeros((2, 8, 8, 3))
    kernel = jnp.zeros((3, 3, 3, 4))
    loss = lambda k: jnp.sum(conv.conv2d(x, k, cpu_kernels=cpu_kernels) ** 2)
    return jax.jit(jax.grad(loss)).lower(kernel).as_text()


def test_dilated_form_is_a_convolution_with_input_dilation():
    """The point of the dilated form is the program XLA gets: a convolution with input
    (lhs) dilation 2, which XLA's CPU backend runs in Eigen; the default has none."""
    assert "lhs_dilate = [2, 2]" in _lowered_gradient("dilated")
    assert "lhs_dilate = [2, 2]" not in _lowered_gradient("none")


def test_cpu_kernels_are_checked_at_config_time(monkeypatch):
    """Unknown names list the valid ones; an opt-in that cannot run here names the cause
    and the alternative ('none'); 'none' is accepted for every dtype and backend."""
    assert jax.default_backend() == "cpu"
    for dtype in (jnp.float32, jnp.bfloat16):
        conv.check_cpu_kernels("none", dtype)
    conv.check_cpu_kernels("dilated", jnp.float32)
    with pytest.raises(ValueError, match=r"model.cpu_kernels must be one of \['none', "
                                         r"'dilated', 'onednn'\]; got 'mkl'"):
        conv.check_cpu_kernels("mkl", jnp.float32)
    with pytest.raises(ValueError, match=r"'dilated' computes in float32; the model "
                                         r"computes in bfloat16\. Use model.cpu_kernels='none'"):
        conv.check_cpu_kernels("dilated", jnp.bfloat16)
    with pytest.raises(ValueError, match=r"'onednn' computes in float32.*Use "
                                         r"model.cpu_kernels='none'"):
        conv.check_cpu_kernels("onednn", jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match=r"'onednn' are CPU kernels; the default JAX "
                                         r"backend here is 'gpu'\. Use model.cpu_kernels='none'"):
        conv.check_cpu_kernels("onednn", jnp.float32)


def test_cpu_kernels_refused_where_onednn_cannot_run(monkeypatch):
    """Not x86_64, no compiler: the reason and the alternative, before anything is built
    (the build would need both)."""
    from diffusion_jax.models import onednn

    monkeypatch.setattr(onednn.platform, "machine", lambda: "aarch64")
    with pytest.raises(ValueError, match=r"'onednn' cannot run here: oneDNN's wheels exist "
                                         r"for x86_64 Linux only; this is Linux on aarch64\."
                                         r".*Use model.cpu_kernels='none'"):
        conv.check_cpu_kernels("onednn", jnp.float32, build=False)
    monkeypatch.undo()
    monkeypatch.setattr(onednn, "_find_onednn", lambda: (None, None))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(onednn.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"'onednn' cannot run here: .*need a C\+\+17 "
                                         r"compiler: none found.*Use model.cpu_kernels='none'"):
        conv.check_cpu_kernels("onednn", jnp.float32, build=False)


def test_default_path_imports_no_onednn():
    """Building and running the default U-Net neither imports the oneDNN module nor
    compiles anything (a fresh interpreter, so other tests' imports do not count)."""
    import subprocess
    import sys

    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "from diffusion_jax.models import UNet\n"
        "m = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())\n"
        "x, t = jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,), jnp.int32)\n"
        # Jitted: one compile each, not one per op (the interpreter has 8 fake devices).
        "params = jax.jit(lambda k: m.init(k, x, t, train=False))(jax.random.key(0))\n"
        "jax.jit(jax.grad(lambda p: m.apply(p, x, t, train=False).sum()))(params)\n"
        "assert 'diffusion_jax.models.onednn' not in sys.modules, 'onednn imported'\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "CXX"}
    env["CXX"] = "/nonexistent/compiler-that-must-not-run"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bad_arguments_are_refused():
    x, kernel = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"cpu_kernels must be one of \['none', 'dilated', "
                                         r"'onednn'\]; got 'eigen'"):
        conv.conv2d(x, kernel, cpu_kernels="eigen")
    with pytest.raises(ValueError, match=r"x must be NHWC and kernel HWIO \(rank 4\); got "
                                         r"shapes \(4, 4, 2\) and \(3, 3, 2, 2\)"):
        conv.conv2d(x[0], kernel)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_conv_module_is_a_drop_in_for_flax_conv(strides):
    """The same parameter tree, initial values (same key) and outputs as ``nn.Conv``."""
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
    ours = conv.Conv(5, (3, 3), strides=strides, kernel_init=init)
    flax_conv = nn.Conv(5, (3, 3), strides=strides, kernel_init=init)
    params = ours.init(jax.random.key(3), x)
    flax_params = flax_conv.init(jax.random.key(3), x)
    assert jax.tree.structure(params) == jax.tree.structure(flax_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x),
                               rtol=1e-5, atol=1e-5)


def test_unet_gradients_are_the_same_in_either_form():
    """The tiny U-Net (3x3 convolutions, a stride-2 downsampling and the 2x2 phase
    convolutions of the upsampling): loss and every parameter's gradient agree."""
    x, t = _inputs(jax.random.key(1))
    models = {form: UNet(**TINY, cpu_kernels=form) for form in ("none", "dilated")}
    params = _random_params(_param_shapes(models["none"], x, t), seed=0)
    assert jax.tree.structure(_param_shapes(models["dilated"], x, t)) == jax.tree.structure(
        params)

    def loss_and_grad(model):
        loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, train=False) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    loss_xla, grads_xla = loss_and_grad(models["none"])
    loss_dilated, grads_dilated = loss_and_grad(models["dilated"])
    np.testing.assert_allclose(loss_dilated, loss_xla, rtol=1e-6)

    def check(path, a, b):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(b / scale, a / scale, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(check, grads_xla, grads_dilated)


def test_unet_refuses_an_unknown_form():
    x, t = _inputs(jax.random.key(1))
    with pytest.raises(ValueError, match=r"cpu_kernels must be one of .*got 'fast'"):
        UNet(**TINY, cpu_kernels="fast").init(jax.random.key(0), x, t, train=False)



def test_only_the_differentiated_arguments_get_a_gradient_program():
    """The dilated form computes dL/dx only when x is differentiated and dL/dkernel only
    when the kernel is, as XLA's own differentiation does: the count of convolutions in
    each gradient's jaxpr (one forward, plus one per gradient)."""
    x, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    loss = lambda x, k: jnp.sum(conv.conv2d(x, k, cpu_kernels="dilated") ** 2)

    def convolutions(argnums):
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=argnums))(x, kernel).jaxpr
        return [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]

    assert len(convolutions((0, 1))) == 3
    (_, dx) = convolutions(0)
    assert dx.params["lhs_dilation"] == (1, 1)
    (_, dkernel) = convolutions(1)
    assert dkernel.params["lhs_dilation"] == (2, 2)


def test_onednn_wheels_are_an_install_extra_only():
    """`pip install -e .` pulls no oneDNN wheel; `.[onednn]` pulls both (pinned)."""
    import pathlib
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).resolve().parent.parent
                             / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "onednn" in d.lower()]
    extra = project["optional-dependencies"]["onednn"]
    assert sorted(d.split("==")[0] for d in extra) == ["onednn-cpu-gomp",
                                                       "onednn-devel-cpu-gomp"]
    assert all("==2023.2.0;" in d and "platform_machine == 'x86_64'" in d for d in extra)
