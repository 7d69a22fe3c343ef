"""Tests for diffusion_jax.models.unet: the DDPM U-Net (Ho et al. 2020)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet, timestep_embedding
from diffusion_jax.models.unet import AttnBlock, Downsample, ResnetBlock, Upsample

# A tiny U-Net with every kind of layer: two levels (8x8 with 32 channels, 4x4 with 64),
# attention at 4x4, one downsample and one upsample.
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
BATCH, SIZE, CHANNELS = 2, 8, 3
# The original TensorFlow DDPM CIFAR-10 model has this many parameters.
DDPM_CIFAR10_PARAMS = 35_746_307


def _inputs(key, batch=BATCH, size=SIZE, channels=CHANNELS):
    x = jax.random.normal(key, (batch, size, size, channels), jnp.float32)
    t = jnp.arange(batch, dtype=jnp.int32) * 37 + 5
    return x, t


def _random_params(shapes, seed):
    """Random float32 parameters with the structure of ``shapes``, drawn with NumPy (compiling
    one JAX initialiser per shape costs far more than these tests' forward passes). Unlike
    DDPM's initialisation, no layer is near zero, so differences between outputs show."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if leaf.ndim >= 2:  # kernels and embeddings: unit-variance outputs
            std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(base + rng.normal(0.0, 0.1, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _param_shapes(model, *args):
    init = lambda *args: model.init(jax.random.key(0), *args, train=False)["params"]
    return jax.eval_shape(init, *args)


def _num_params(params):
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, random (not DDPM-initialised) params, and inputs."""
    model = UNet(**TINY)
    x, t = _inputs(jax.random.key(1))
    return model, _random_params(_param_shapes(model, x, t), seed=0), x, t


# --- timestep embedding -------------------------------------------------------------------


def _numpy_timestep_embedding(t, dim, max_period=10000.0):
    """DDPM's get_timestep_embedding in float64 NumPy, written from the formula."""
    half = dim // 2
    freqs = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / (half - 1))
    angles = np.asarray(t, np.float64)[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros((len(t), 1))], axis=1)
    return emb


@pytest.mark.parametrize("dim", [4, 7, 128])
@pytest.mark.parametrize("max_period", [10000.0, 100.0])
def test_timestep_embedding_matches_numpy(dim, max_period):
    t = np.array([0, 1, 5, 250, 999], np.int32)
    got = timestep_embedding(jnp.asarray(t), dim, max_period=max_period)
    assert got.shape == (len(t), dim)
    assert got.dtype == jnp.float32
    # float32 rounding of t * f (up to ~1e3) gives absolute errors of order 1e-4 in sin/cos.
    np.testing.assert_allclose(
        got, _numpy_timestep_embedding(t, dim, max_period), rtol=0, atol=2e-4
    )


def test_timestep_embedding_layout():
    # Column 0 is sin(t * 1), column half is cos(t * 1), the last sin column uses
    # frequency 1/max_period.
    emb = timestep_embedding(jnp.array([3]), 8, max_period=100.0)
    np.testing.assert_allclose(emb[0, 0], np.sin(3.0), rtol=1e-6)
    np.testing.assert_allclose(emb[0, 4], np.cos(3.0), rtol=1e-6)
    np.testing.assert_allclose(emb[0, 3], np.sin(3.0 / 100.0), rtol=1e-5)


def test_timestep_embedding_rejects_bad_input():
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        timestep_embedding(jnp.zeros((2, 1), jnp.int32), 8)
    with pytest.raises(ValueError, match="dim must be at least 4"):
        timestep_embedding(jnp.zeros((2,), jnp.int32), 3)


# --- shapes, parameter count, initialisation -----------------------------------------------


def test_output_shape_and_dtype(tiny):
    model, params, x, t = tiny
    out = model.apply({"params": params}, x, t, train=False)
    assert out.shape == x.shape
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(out))


def test_cifar10_parameter_count_is_the_papers():
    model = UNet()  # the defaults are the DDPM CIFAR-10 configuration
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
    count = _num_params(shapes["params"])
    print(f"DDPM CIFAR-10 U-Net parameters: {count:,}")
    assert count == pytest.approx(DDPM_CIFAR10_PARAMS, rel=1e-3)
    assert set(shapes) == {"params"}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))


def test_initialisation_is_ddpms():
    # Compiling the initialisers dominates this test's cost, so: the smallest U-Net (one
    # level at 4x4, which still has conv_in, res blocks, mid attention and a 64 -> 32 up
    # block), and the 'rbg' PRNG, which compiles faster than threefry on CPU (the
    # distributions checked here do not depend on the bit generator).
    model = UNet(**{**TINY, "ch_mult": (1,)})
    x, t = _inputs(jax.random.key(1), size=4)
    init = jax.jit(lambda key: model.init_with_output(key, x, t, train=False))
    out, variables = init(jax.random.key(0, impl="rbg"))
    params = variables["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    # DDPM initialises the output conv with scale 1e-10: the initial output is ~0.
    assert out.shape == x.shape
    assert 0 < float(jnp.max(jnp.abs(out))) < 1e-4
    # conv_in: variance_scaling(1, fan_avg, uniform): U(-limit, limit), limit = sqrt(3/fan_avg).
    kernel = np.asarray(params["conv_in"]["kernel"])
    assert kernel.shape == (3, 3, CHANNELS, TINY["ch"])
    fan_avg = (9 * CHANNELS + 9 * TINY["ch"]) / 2
    limit = math.sqrt(3.0 / fan_avg)
    assert np.abs(kernel).max() <= limit
    assert kernel.std() == pytest.approx(limit / math.sqrt(3.0), rel=0.1)
    np.testing.assert_array_equal(params["conv_in"]["bias"], 0.0)
    # The last layer of each residual branch, the attention output and conv_out: scale 1e-10.
    for near_zero in [
        params["down_0_block_0"]["conv2"]["kernel"],
        params["mid_attn_1"]["proj_out"]["kernel"],
        params["conv_out"]["kernel"],
    ]:
        assert 0 < float(jnp.max(jnp.abs(near_zero))) < 1e-5
    # 1x1 shortcut only where the channel count changes (32 -> 64, and on concatenations).
    assert "nin_shortcut" not in params["down_0_block_0"]
    assert params["up_0_block_0"]["nin_shortcut"]["kernel"].shape == (64, 32)


def test_shortcut_projections_where_channels_change(tiny):
    _, params, _, _ = tiny
    assert "nin_shortcut" not in params["down_0_block_0"]
    assert params["down_1_block_0"]["nin_shortcut"]["kernel"].shape == (32, 64)
    assert params["up_1_block_0"]["nin_shortcut"]["kernel"].shape == (128, 64)
    assert params["up_0_block_0"]["nin_shortcut"]["kernel"].shape == (96, 32)


def test_learned_variance_output_channels():
    model = UNet(**TINY, out_channels=2 * CHANNELS)
    x, t = _inputs(jax.random.key(0))
    out, _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), x, t, train=False)
    )
    assert out.shape == (BATCH, SIZE, SIZE, 2 * CHANNELS)
    assert out.dtype == jnp.float32


def test_non_square_input():
    model = UNet(**TINY)
    x = jax.ShapeDtypeStruct((BATCH, 8, 16, CHANNELS), jnp.float32)
    t = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
    init = lambda x, t: model.init_with_output(jax.random.key(0), x, t, train=False)
    out, _ = jax.eval_shape(init, x, t)
    assert out.shape == x.shape


# --- conditioning -------------------------------------------------------------------------


def test_class_conditioning_changes_output_and_requires_labels():
    model = UNet(**TINY, num_classes=10)
    x, t = _inputs(jax.random.key(1))
    y = jnp.array([0, 1], jnp.int32)
    shapes = _param_shapes(model, x, t, y)
    assert shapes["class_embed"]["embedding"].shape == (10, 4 * TINY["ch"])
    params = _random_params(shapes, seed=1)
    out_a = model.apply({"params": params}, x, t, y, train=False)
    out_b = model.apply({"params": params}, x, t, jnp.array([2, 3], jnp.int32), train=False)
    assert out_a.shape == x.shape
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-3
    with pytest.raises(ValueError, match="y .* is required when num_classes=10"):
        model.apply({"params": params}, x, t, train=False)
    with pytest.raises(ValueError, match=r"y must have shape \(B,\) = \(2,\)"):
        model.apply({"params": params}, x, t, y[:1], train=False)


def test_labels_rejected_by_unconditional_model(tiny):
    model, params, x, t = tiny
    with pytest.raises(ValueError, match="y .* given but the model has num_classes=None"):
        model.apply({"params": params}, x, t, jnp.zeros((BATCH,), jnp.int32), train=False)


def test_time_conditioning_changes_output(tiny):
    model, params, x, t = tiny
    out_a = model.apply({"params": params}, x, t, train=False)
    out_b = model.apply({"params": params}, x, t + 100, train=False)
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-3


# --- dropout ------------------------------------------------------------------------------


def test_dropout_only_in_training(tiny):
    model, params, x, t = tiny
    variables = {"params": params}

    def train(seed):
        rngs = {"dropout": jax.random.key(seed)}
        return model.apply(variables, x, t, train=True, rngs=rngs)

    # train=False needs no dropout rng and is deterministic.
    eval_a = model.apply(variables, x, t, train=False)
    eval_b = model.apply(variables, x, t, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_a_again, train_b = train(0), train(0), train(1)
    np.testing.assert_array_equal(train_a, train_a_again)
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-3
    # Without dropout the train and eval modes agree.
    no_dropout = UNet(**{**TINY, "dropout": 0.0})
    np.testing.assert_array_equal(no_dropout.apply(variables, x, t, train=True), eval_a)


# --- mixed precision ----------------------------------------------------------------------


def test_bfloat16_compute_float32_params_and_output(tiny):
    model32, params, x, t = tiny
    model16 = UNet(**TINY, dtype=jnp.bfloat16)
    shapes16 = _param_shapes(model16, x, t)
    assert jax.tree.structure(shapes16) == jax.tree.structure(params)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes16))

    # Under jit, as in training.
    apply16 = jax.jit(
        lambda p, x, t: model16.apply(
            {"params": p}, x, t, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
    )
    out16, state = apply16(params, x, t)
    inter = state["intermediates"]
    assert out16.dtype == jnp.float32
    assert inter["conv_in"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["down_1_block_0"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["down_1_block_0"]["norm1"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["mid_attn_1"]["q"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["conv_out"]["__call__"][0].dtype == jnp.bfloat16

    # bfloat16 keeps 8 bits of mantissa (relative rounding 2**-9 ~ 0.2%); through the
    # network the error grows to about 1%. Allow 5% of the output's norm.
    out32 = model32.apply({"params": params}, x, t, train=False)
    rel_err = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0 < rel_err < 5e-2, rel_err


def _all_equations(jaxpr):
    """Every equation of a jaxpr, including those of nested jaxprs (pjit, custom_jvp)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _all_equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _all_equations(sub)


def test_bfloat16_attention_keeps_statistics_and_softmax_in_float32():
    block = AttnBlock(dtype=jnp.bfloat16)
    x = jnp.ones((2, 4, 4, 32), jnp.bfloat16)  # the residual stream is bfloat16
    params = jax.eval_shape(block.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(block.apply)(params, x).jaxpr
    input_dtypes = {}
    for eqn in _all_equations(jaxpr):
        dtypes = {v.aval.dtype for v in eqn.invars if hasattr(v, "aval")}
        input_dtypes.setdefault(eqn.primitive.name, set()).update(dtypes)
    # GroupNorm means/variances and the softmax's max, exp and sum run in float32 ...
    for reduction in ("reduce_sum", "reduce_max", "exp"):
        assert input_dtypes[reduction] == {jnp.dtype(jnp.float32)}, reduction
    # ... while every matmul (q, k, v, the two attention einsums, proj_out) is bfloat16.
    assert input_dtypes["dot_general"] == {jnp.dtype(jnp.bfloat16)}


# --- layers against float64 NumPy references ----------------------------------------------


def _numpy_group_norm(x, scale, bias, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _f64(tree):
    return jax.tree.map(lambda p: np.asarray(p, np.float64), tree)


def _swish(x):
    return x / (1.0 + np.exp(-x))


def _numpy_conv3x3(x, kernel, bias):
    """'SAME' 3x3 convolution, stride 1, NHWC / HWIO."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out + bias


def test_attention_block_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 32))
    block = AttnBlock()
    params = _random_params(jax.eval_shape(block.init, jax.random.key(1), x)["params"], seed=2)
    got = block.apply({"params": params}, x)

    p, xs = _f64(params), np.asarray(x, np.float64)
    h = _numpy_group_norm(xs, p["norm"]["scale"], p["norm"]["bias"])
    q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in "qkv")
    b, hh, ww, c = xs.shape
    logits = np.einsum("bic,bjc->bij", q.reshape(b, -1, c), k.reshape(b, -1, c)) / np.sqrt(c)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bij,bjc->bic", weights, v.reshape(b, -1, c)).reshape(xs.shape)
    want = xs + attended @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_resnet_block_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    temb = jax.random.normal(jax.random.key(1), (2, 16))
    block = ResnetBlock(out_ch=64, dropout=0.0)
    init = lambda x, temb: block.init(jax.random.key(2), x, temb, train=False)["params"]
    params = _random_params(jax.eval_shape(init, x, temb), seed=3)
    got = block.apply({"params": params}, x, temb, train=False)

    p, xs, ts = _f64(params), np.asarray(x, np.float64), np.asarray(temb, np.float64)
    h = _swish(_numpy_group_norm(xs, p["norm1"]["scale"], p["norm1"]["bias"]))
    h = _numpy_conv3x3(h, p["conv1"]["kernel"], p["conv1"]["bias"])
    h = h + (_swish(ts) @ p["temb_proj"]["kernel"] + p["temb_proj"]["bias"])[:, None, None, :]
    h = _swish(_numpy_group_norm(h, p["norm2"]["scale"], p["norm2"]["bias"]))
    h = _numpy_conv3x3(h, p["conv2"]["kernel"], p["conv2"]["bias"])
    shortcut = xs @ p["nin_shortcut"]["kernel"] + p["nin_shortcut"]["bias"]
    np.testing.assert_allclose(got, shortcut + h, rtol=1e-4, atol=1e-4)


def test_resampling_layers():
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 32))
    up = Upsample(with_conv=False).apply({}, x)
    np.testing.assert_array_equal(up, np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2))
    up_conv, _ = jax.eval_shape(lambda: Upsample().init_with_output(jax.random.key(0), x))
    assert up_conv.shape == (2, 8, 12, 32)
    down, _ = jax.eval_shape(lambda: Downsample().init_with_output(jax.random.key(0), x))
    assert down.shape == (2, 2, 3, 32)
    pooled = Downsample(with_conv=False).apply({}, x)
    np.testing.assert_allclose(
        pooled, np.asarray(x).reshape(2, 2, 2, 3, 2, 32).mean(axis=(2, 4)), rtol=1e-6
    )


# --- errors at the boundary ---------------------------------------------------------------


def _init_shapes(model, x_shape, t_shape=(BATCH,), y=None):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    t = jax.ShapeDtypeStruct(t_shape, jnp.int32)
    return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, y, train=False), x, t)


def test_rejects_non_nhwc_input():
    with pytest.raises(ValueError, match=r"x must be NHWC \(rank 4\), got shape \(2, 8, 8\)"):
        _init_shapes(UNet(**TINY), (BATCH, 8, 8))


def test_rejects_size_not_divisible_by_downsampling():
    model = UNet(**{**TINY, "ch_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(len\(ch_mult\)-1\) = 4"):
        _init_shapes(model, (BATCH, 10, 8, CHANNELS))
    with pytest.raises(ValueError, match="divisible by"):
        _init_shapes(model, (BATCH, 8, 6, CHANNELS))


def test_rejects_bad_t_shape():
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\), got shape \(2, 1\)"):
        _init_shapes(UNet(**TINY), (BATCH, SIZE, SIZE, CHANNELS), t_shape=(BATCH, 1))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\), got shape \(3,\)"):
        _init_shapes(UNet(**TINY), (BATCH, SIZE, SIZE, CHANNELS), t_shape=(3,))


@pytest.mark.parametrize(
    "ch, ch_mult, message",
    [
        (48, (1, 2), r"ch \* ch_mult\[0\] = 48 \* 1 = 48 channels is not divisible by the 32"),
        (16, (2, 1), r"ch \* ch_mult\[1\] = 16 \* 1 = 16 channels is not divisible by the 32"),
    ],
)
def test_rejects_channels_not_divisible_by_groups(ch, ch_mult, message):
    model = UNet(**{**TINY, "ch": ch, "ch_mult": ch_mult})
    with pytest.raises(ValueError, match=message):
        _init_shapes(model, (BATCH, SIZE, SIZE, CHANNELS))
