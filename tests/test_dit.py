"""DiT (Peebles & Xie 2023): sizes, adaLN-Zero start, conditioning, bf16, a float64 block."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.models.dit import (
    DiT, DiTBlock, dit_size_kwargs, dit_timestep_embedding, patchify, sincos_pos_embed_2d,
    unpatchify,
)
from diffusion_jax.training import objectives, setup
from diffusion_jax.training.state import TrainState, make_optimizer
from diffusion_jax.training import step as step_lib

from helpers import ROOT, load_config

TINY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4)


def _inputs(rng, batch=2, size=8, channels=3):
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    return x, t


def _randomize(params, key, scale=0.3):
    """Non-zero values everywhere (adaLN-Zero would otherwise hide every block)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


# The paper's Table 4 (256x256 images: 32x32x4 latents, 1000 classes, learned sigma).
PAPER_GFLOPS_PARAMS = {"DiT-S/2": 33e6, "DiT-B/2": 130e6, "DiT-L/2": 458e6, "DiT-XL/2": 675e6}


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS_PARAMS))
def test_parameter_counts_match_the_paper(name):
    """Counted on abstract shapes (jax.eval_shape): nothing is materialised."""
    model = DiT(**dit_size_kwargs(name), out_channels=8, num_classes=1000)
    shapes = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,), jnp.int32),
                             jnp.zeros((1,), jnp.int32), train=False)["params"],
        jax.random.key(0))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert abs(count / PAPER_GFLOPS_PARAMS[name] - 1) < 0.01, count
    if name == "DiT-XL/2":
        # The reference code's count (675,129,632) includes its fixed position embedding
        # (256 tokens x 1152), a constant here.
        assert count + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_shapes_and_learned_sigma(patch, rng):
    x, t = _inputs(rng, size=16)
    model = DiT(**dict(TINY, patch_size=patch), out_channels=6)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, train=False)["params"]
    assert params["x_embedder"]["kernel"].shape == (patch * patch * 3, 32)
    assert params["final_linear"]["kernel"].shape == (32, patch * patch * 6)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t, train=False), params)
    assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32


def test_patchify_round_trip_and_token_order(rng):
    x = jnp.asarray(rng.standard_normal((2, 8, 12, 3)))
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    # Token 4 is patch row 1, column 1; its first features are pixel (4, 4)'s channels.
    np.testing.assert_array_equal(tokens[:, 4, :3], x[:, 4, 4, :])
    np.testing.assert_array_equal(tokens[:, 4, 3:6], x[:, 4, 5, :])
    np.testing.assert_array_equal(unpatchify(tokens, 4, (2, 3)), x)


def test_position_embedding_formula():
    emb = sincos_pos_embed_2d(16, (3, 5))
    assert emb.shape == (15, 16)
    row, col = 2, 3
    token = emb[row * 5 + col]
    freqs = 10000.0 ** (-np.arange(4) / 4)
    np.testing.assert_allclose(token[:4], np.sin(col * freqs), rtol=1e-12)
    np.testing.assert_allclose(token[4:8], np.cos(col * freqs), rtol=1e-12)
    np.testing.assert_allclose(token[8:12], np.sin(row * freqs), rtol=1e-12)
    np.testing.assert_allclose(token[12:], np.cos(row * freqs), rtol=1e-12)


def test_initial_output_is_exactly_zero_and_blocks_start_as_identity(rng):
    x, t = _inputs(rng)
    y = jnp.asarray([3, 7], jnp.int32)
    model = DiT(**TINY, num_classes=10, out_channels=6)
    params = model.init(jax.random.key(1), x, t, y, train=False)["params"]
    out = model.apply({"params": params}, x, t, y, train=False)
    assert np.all(np.asarray(out) == 0.0)
    block = DiTBlock(32, 4)
    h = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    block_params = block.init(jax.random.key(2), h, c)["params"]
    np.testing.assert_array_equal(block.apply({"params": block_params}, h, c), h)


def test_class_conditioning_and_the_null_class(rng):
    x, t = _inputs(rng)
    model = DiT(**TINY, num_classes=10, class_dropout_prob=1.0)
    y = jnp.asarray([3, 7], jnp.int32)
    params = _randomize(model.init(jax.random.key(1), x, t, y, train=False)["params"],
                        jax.random.key(2))
    assert params["y_embedder"]["embedding"].shape == (11, 32)  # 10 classes + null
    apply = jax.jit(lambda y, train, force_drop=None, rngs=None: model.apply(
        {"params": params}, x, t, y, train=train, force_drop=force_drop, rngs=rngs),
        static_argnames="train")
    cond = apply(y, train=False)
    assert not np.allclose(cond, apply(jnp.asarray([4, 7], jnp.int32), train=False))
    null = apply(jnp.full((2,), 10, jnp.int32), train=False)
    forced = apply(y, train=False, force_drop=jnp.asarray([True, False]))
    np.testing.assert_array_equal(forced[0], null[0])
    np.testing.assert_array_equal(forced[1], cond[1])
    # class_dropout_prob = 1 in training: every label becomes the null class.
    dropped = apply(y, train=True, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(dropped, null)


def test_bfloat16_compute_with_float32_params(rng):
    x, t = _inputs(rng)
    model = DiT(**TINY, dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), x, t, train=False)["params"]
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, train=False))(params)
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    # 2 timestep + 1 patch embed + per block (adaLN, qkv, proj, fc1, fc2 and attention's
    # two products) + final adaLN and linear.
    assert len(dots) >= 3 + 7 * TINY["depth"] + 2
    for e in dots:
        assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e
    out = model.apply({"params": params}, x, t, train=False)
    assert out.dtype == jnp.float32


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else _subjaxprs(e):
            yield from _all_eqns(sub)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for item in v if isinstance(v, (list, tuple)) else [v]:
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


# ---- float64 NumPy reference of one block, written from the paper's equations ----

def _np_layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6)


def _np_dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_block(p, x, c, heads):
    b, n, d = x.shape
    silu = c / (1 + np.exp(-c))
    mod = _np_dense(p["adaLN_modulation"], silu)
    shift1, scale1, gate1, shift2, scale2, gate2 = np.split(mod, 6, axis=-1)
    h = _np_layer_norm(x) * (1 + scale1[:, None]) + shift1[:, None]
    qkv = _np_dense(p["qkv"], h).reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, n, heads, dh)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d)
    x = x + gate1[:, None] * _np_dense(p["proj"], attn)
    h = _np_layer_norm(x) * (1 + scale2[:, None]) + shift2[:, None]
    h = _np_dense(p["fc2"], _np_gelu_tanh(_np_dense(p["fc1"], h)))
    return x + gate2[:, None] * h


def test_one_block_against_a_float64_reference(rng):
    """float32 block vs float64 NumPy: rtol/atol 2e-5 (float32 rounding through ~6
    matmuls of width <= 128 with O(1) values)."""
    block = DiTBlock(32, 4)
    x = jnp.asarray(rng.standard_normal((2, 16, 32)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
    params = _randomize(block.init(jax.random.key(0), x, c)["params"], jax.random.key(1), 0.2)
    got = np.asarray(block.apply({"params": params}, x, c), np.float64)
    want = _np_block(jax.tree.map(np.asarray, params), np.asarray(x, np.float64),
                     np.asarray(c, np.float64), 4)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # The reference is not trivially close: the block moved x by O(1).
    assert np.abs(want - np.asarray(x)).max() > 0.5


def test_timestep_embedding_formula():
    t = jnp.asarray([0, 7, 999])
    emb = np.asarray(dit_timestep_embedding(t, 8), np.float64)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    want = np.concatenate([np.cos(np.outer([0, 7, 999], freqs)),
                           np.sin(np.outer([0, 7, 999], freqs))], axis=1)
    np.testing.assert_allclose(emb, want, atol=1e-4)


def test_bad_inputs(rng):
    x, t = _inputs(rng, size=9)
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        DiT(**TINY).init(jax.random.key(0), x, t, train=False)
    x, t = _inputs(rng)
    with pytest.raises(ValueError, match="hidden_size 32 is not divisible by num_heads 5"):
        DiT(**dict(TINY, num_heads=5)).init(jax.random.key(0), x, t, train=False)
    with pytest.raises(ValueError, match=r"Unknown DiT size 'DiT-M/2'.*'DiT-S/2'"):
        dit_size_kwargs("DiT-M/2")
    config = load_config(ROOT / "configs" / "dit_digits.py", "tiny")
    info = data.dataset_info(config.data)
    config.model.dit.patch_size = 3
    with pytest.raises(ValueError, match="patch_size = 3 does not divide the image size 8x8"):
        setup.create_model(config, info)
    config.model.dit.patch_size, config.model.dit.num_heads = 2, 3
    with pytest.raises(ValueError, match="hidden_size = 32 is not divisible by model.dit.num_heads = 3"):
        setup.create_model(config, info)


def test_tiny_digits_dit_trains_with_the_ddpm_objective():
    """Twelve steps of the digits config's tiny variant lower the loss (a plain-language
    check that gradients reach every part; the full config is the README's run)."""
    config = load_config(ROOT / "configs" / "dit_digits.py", "tiny")
    config.optim.lr, config.optim.warmup_steps = 3e-3, 0
    info = data.dataset_info(config.data)
    objective = objectives.create_objective(config, info)
    optimizer = make_optimizer(config.optim)
    state = TrainState.create(jax.jit(objective.init)(jax.random.key(0)), optimizer)
    step = jax.jit(step_lib.make_train_step(loss_fn=objective.loss, optimizer=optimizer,
                                            root_key=jax.random.key(1), ema_decay=0.9))
    it = data.create_data_iterator(config.data, per_process_batch=32, seed=0, start_step=0,
                                   process_index=0, process_count=1)
    batch = jax.tree.map(jnp.asarray, next(it))
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    # Every parameter group moved (adaLN-Zero layers too, after their first update).
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         state.params, jax.jit(objective.init)(jax.random.key(0)))
    assert all(jax.tree.leaves(moved))


def test_remat_gives_the_same_loss_and_gradients(rng):
    """Recomputing the blocks in the backward pass does not change values (float32;
    the same operations in the same order, so to float rounding of fused programs)."""
    x, t = _inputs(rng)
    plain, remat = DiT(**TINY), DiT(**TINY, remat=True)
    params = _randomize(plain.init(jax.random.key(0), x, t, train=False)["params"],
                        jax.random.key(1), 0.2)

    def grads(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, x, t, train=False) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (l1, g1), (l2, g2) = grads(plain), grads(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(remat.apply(
        {"params": p}, x, t, train=False))))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
