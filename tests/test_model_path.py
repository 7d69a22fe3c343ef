"""The default model path's attention and mixed precision.

- `unet.attention` (``jax.nn.dot_product_attention``) computes what the U-Net's attention
  computed before it (two einsums around a float32 softmax), in float32 and bfloat16.
- A bfloat16 train step (the project's own, `training.step.make_train_step`) keeps the
  parameters, optimizer state, EMA and loss in float32 and computes every matmul and
  convolution in bfloat16, except the documented ones (`DOCUMENTED_FLOAT32`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.models import UNet
from diffusion_jax.models.unet import AttnBlock, attention
from diffusion_jax.training import objectives, step as step_lib
from diffusion_jax.training.state import TrainState, make_optimizer

from tests.helpers import tiny_cifar_config


def _einsum_attention(q, k, v):
    """The attention as the U-Net wrote it before jax.nn.dot_product_attention: logits
    accumulated in float32, softmax in float32, weights cast to v's dtype."""
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1).astype(v.dtype)
    return jnp.einsum("bqk,bkc->bqc", weights, v)


def _numpy_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 2e-6), (jnp.bfloat16, 1e-2)])
def test_attention_equals_the_einsum_attention(dtype, rtol):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (3.0 * jax.random.normal(key, (2, 64, 32)) for key in keys)
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    got = jax.jit(attention)(q, k, v)
    want = jax.jit(_einsum_attention)(q, k, v)
    assert got.dtype == dtype
    scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=rtol, atol=rtol * scale)
    # And both against float64 NumPy (bfloat16 inputs: the rounding of the weights).
    np.testing.assert_allclose(np.asarray(got, np.float32), _numpy_attention(q, k, v),
                               rtol=10 * rtol, atol=10 * rtol * scale)


def test_attention_block_output_unchanged(monkeypatch):
    """The whole attention block with random parameters, float32: the new attention
    against the einsum one swapped in."""
    from diffusion_jax.models import unet

    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 64))
    block = AttnBlock()
    params = block.init(jax.random.key(2), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape),
                          params)
    got = block.apply(params, x)
    monkeypatch.setattr(unet, "attention", _einsum_attention)
    want = block.apply(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# (what, why): the float32 contractions a bfloat16 train step keeps on purpose.
DOCUMENTED_FLOAT32 = {
    "upsample_phase_kernels": (
        "`_UpsampleConv` sums the 3x3 kernel's taps into its four 2x2 phase kernels in the "
        "parameters' float32 (an einsum of the (2, 2, 3) tap matrix with the kernel, and "
        "its transpose in the backward pass): a few multiply-adds per kernel weight, "
        "independent of the batch and image size"),
    "attention_logits_gradient": (
        "the attention's logits are accumulated and its softmax computed in float32, so "
        "their cotangent is float32: the backward pass contracts it with the bfloat16 "
        "queries or keys (XLA upcasts the bfloat16 operand), B x L x L x C multiply-adds "
        "per attention layer (jax.nn.dot_product_attention's own rule)"),
}


def _contractions(jaxpr):
    """Every dot_general and conv_general_dilated of a closed jaxpr, nested ones too:
    (primitive, operand dtypes, operand shapes)."""
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append((eqn.primitive.name,
                              tuple(str(v.aval.dtype) for v in eqn.invars),
                              tuple(tuple(v.aval.shape) for v in eqn.invars)))
            for value in eqn.params.values():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if hasattr(item, "eqns"):  # a Jaxpr
                        walk(item)
                    elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):  # closed
                        walk(item.jaxpr)

    walk(jaxpr.jaxpr)
    return found


def _is_upsample_phase_kernel(dtypes, shapes):
    # The (2, 2, 3) tap matrix against a (3, 3, C, F)-derived operand, or the transposes.
    return any(s[:3] == (2, 2, 3) or s == (2, 2, 3) for s in shapes)


def _is_attention_logits_gradient(dtypes, shapes):
    # A float32 (B, N, L, [1,] L) logits cotangent against a bfloat16 (B, L, ...) operand.
    if sorted(dtypes[:2]) != ["bfloat16", "float32"]:
        return False
    logits = shapes[dtypes.index("float32")]
    return len(logits) >= 4 and logits[2] == logits[-1] and logits[-1] > 1


def test_bfloat16_train_step_computes_in_bfloat16():
    config = tiny_cifar_config()
    config.model.dtype = "bfloat16"
    info = data.dataset_info(config.data)
    objective = objectives.create_objective(config, info)
    optimizer = make_optimizer(config.optim)
    params = jax.eval_shape(objective.init, jax.random.key(0))
    state = jax.eval_shape(lambda p: TrainState.create(p, optimizer), params)
    batch = jax.eval_shape(lambda: next(data.create_data_iterator(
        config.data, per_process_batch=4, seed=0, start_step=0, process_index=0,
        process_count=1)))
    step_fn = step_lib.make_train_step(loss_fn=objective.loss, optimizer=optimizer,
                                       root_key=jax.random.key(1), ema_decay=0.9)
    closed = jax.make_jaxpr(step_fn)(state, batch)
    new_state, metrics = jax.eval_shape(step_fn, state, batch)

    # Parameters, optimizer state, EMA and the loss in float32.
    for leaf in jax.tree.leaves((new_state, metrics["loss"])):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf
    contractions = _contractions(closed)
    assert len(contractions) > 20  # the step's forward and backward passes
    float32 = [c for c in contractions if "float32" in c[1][:2]]
    undocumented = [c for c in float32 if not (_is_upsample_phase_kernel(c[1], c[2])
                                               or _is_attention_logits_gradient(c[1], c[2]))]
    assert not undocumented, undocumented
    assert any(_is_upsample_phase_kernel(c[1], c[2]) for c in float32)
    assert any(_is_attention_logits_gradient(c[1], c[2]) for c in float32)
    bf16 = [c for c in contractions if c[1][:2] == ("bfloat16", "bfloat16")]
    assert len(bf16) >= len(contractions) - len(float32)
