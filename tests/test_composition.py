"""The math functions and a U-Net train step compose with JAX's three ways of spreading a
batch over devices: ``jax.pmap``, ``shard_map`` and ``jit`` with shardings, on the 8 fake
CPU devices of tests/conftest.py. Each way gives what one device gives on the whole batch
(float32, rtol 1e-5: the same per-example arithmetic; the gradient's mean is an all-reduce
summing in another order).

The noise is passed in (``noise=``) so that every example's draws are the same however
the batch is split; the U-Net has no dropout here (a mask drawn per shard would differ
from one drawn for the whole batch).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import gaussian, likelihood, losses, schedules
from diffusion_jax.models import UNet
from diffusion_jax.sampling import ancestral

DEVICES = 8
BATCH = 16
T = 3
MODEL = UNet(ch=32, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), dropout=0.0)
KW = dict(mean_type="eps", var_type="fixed_large")


@pytest.fixture(scope="module")
def problem():
    assert jax.device_count() == DEVICES
    schedule = schedules.get_schedule("cosine", T)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.uniform(keys[0], (BATCH, 4, 4, 3), minval=-1.0, maxval=1.0)
    t = jax.random.randint(keys[1], (BATCH,), 0, T)
    noise = jax.random.normal(keys[2], (BATCH, 4, 4, 3))
    bpd_noise = jax.random.normal(keys[3], (T, BATCH, 4, 4, 3))
    params = MODEL.init(keys[4], x, t, train=False)["params"]
    return schedule, params, dict(x=x, t=t, noise=noise, bpd_noise=bpd_noise)


def _model_fn(params):
    return lambda x_t, t: MODEL.apply({"params": params}, x_t, t, train=False)


def _pieces(schedule, params):
    """Per-batch functions of (x, t, noise, bpd_noise) -> per-example arrays."""
    model_fn = _model_fn(params)

    def q_sample(b):
        return gaussian.q_sample(schedule, b["x"], b["t"], noise=b["noise"])

    def training_losses(b):
        return losses.training_losses(schedule, model_fn, b["x"], b["t"], noise=b["noise"],
                                      loss_type="mse", **KW)["loss"]

    def p_sample(b):
        x_t = gaussian.q_sample(schedule, b["x"], b["t"], noise=b["noise"])
        out = model_fn(x_t, b["t"])
        return ancestral.p_sample(schedule, out, x_t, b["t"], noise=b["noise"], **KW)["sample"]

    def calc_bpd_loop(b):
        # The noise axis T leads; the batch is axis 1 of it.
        return likelihood.calc_bpd_loop(schedule, model_fn, b["x"], noise=b["bpd_noise"],
                                        **KW)["total_bpd"]

    return dict(q_sample=q_sample, training_losses=training_losses, p_sample=p_sample,
                calc_bpd_loop=calc_bpd_loop)


# Where each input's batch axis is: bpd_noise is (T, B, ...).
_BATCH_AXIS = dict(x=0, t=0, noise=0, bpd_noise=1)


def _split(batch):
    """(B, ...) -> (devices, B / devices, ...) along each input's batch axis."""
    def split(name, v):
        axis = _BATCH_AXIS[name]
        v = jnp.moveaxis(v, axis, 0)
        v = v.reshape(DEVICES, v.shape[0] // DEVICES, *v.shape[1:])
        return jnp.moveaxis(v, 1, axis + 1)
    return {k: split(k, v) for k, v in batch.items()}


def _mesh():
    return Mesh(np.asarray(jax.devices()), ("data",))


def _specs(batch):
    return {k: P(*([None] * _BATCH_AXIS[k]), "data") for k in batch}


def _three_ways(fn, batch):
    """fn under pmap, shard_map and jit with shardings, each on the whole batch."""
    mesh = _mesh()
    by_pmap = jax.pmap(fn)(_split(batch)).reshape(BATCH, *fn(batch).shape[1:])
    by_shard_map = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(_specs(batch),),
                                         out_specs=P("data")))(batch)
    shardings = {k: NamedSharding(mesh, s) for k, s in _specs(batch).items()}
    by_jit = jax.jit(fn, out_shardings=NamedSharding(mesh, P("data")))(
        jax.device_put(batch, shardings))
    return dict(pmap=by_pmap, shard_map=by_shard_map, jit_sharded=by_jit)


@pytest.mark.parametrize("name", ["q_sample", "training_losses", "p_sample", "calc_bpd_loop"])
def test_math_functions_three_ways(problem, name):
    schedule, params, batch = problem
    fn = _pieces(schedule, params)[name]
    want = jax.jit(fn)(batch)
    assert want.shape[0] == BATCH and bool(jnp.all(jnp.isfinite(want)))
    for way, got in _three_ways(fn, batch).items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=way)


def _train_step(schedule, optimizer, way="jit"):
    """One Adam step on the mean L_simple of the batch. Under pmap the per-device
    gradients and losses are averaged (``pmean``) after differentiating; under shard_map
    the loss is averaged before (the gradient of replicated parameters is then summed
    over the devices by shard_map's own transpose rule, so averaging again would count
    it 8 times)."""

    def step(params, opt_state, b):
        def loss_fn(p):
            loss = jnp.mean(losses.training_losses(
                schedule, _model_fn(p), b["x"], b["t"], noise=b["noise"], loss_type="mse",
                **KW)["loss"])
            return jax.lax.pmean(loss, "data") if way == "shard_map" else loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        if way == "pmap":
            loss, grads = jax.lax.pmean((loss, grads), "data")
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def test_unet_train_step_three_ways(problem):
    schedule, params, batch = problem
    batch = {k: v for k, v in batch.items() if k != "bpd_noise"}
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    want = jax.jit(_train_step(schedule, optimizer))(params, opt_state, batch)
    mesh = _mesh()
    replicate = lambda tree: jax.tree.map(
        lambda v: jnp.broadcast_to(v, (DEVICES, *v.shape)), tree)

    p_params, _, p_loss = jax.pmap(_train_step(schedule, optimizer, "pmap"), axis_name="data")(
        replicate(params), replicate(opt_state), _split(batch))
    by_pmap = (jax.tree.map(lambda v: v[0], p_params), p_loss[0])

    specs = {k: P("data") for k in batch}
    sm = jax.shard_map(_train_step(schedule, optimizer, "shard_map"), mesh=mesh,
                       in_specs=(P(), P(), specs), out_specs=(P(), P(), P()))
    s_params, _, s_loss = jax.jit(sm)(params, opt_state, batch)

    sharded = jax.device_put(batch, {k: NamedSharding(mesh, s) for k, s in specs.items()})
    j_params, _, j_loss = jax.jit(_train_step(schedule, optimizer))(params, opt_state, sharded)

    for way, (got_params, got_loss) in dict(
            pmap=by_pmap, shard_map=(s_params, s_loss), jit_sharded=(j_params, j_loss)).items():
        np.testing.assert_allclose(got_loss, want[2], rtol=1e-5, err_msg=way)
        for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want[0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=way)
    # The step moved the parameters (a step that changed nothing would compare equal).
    moved = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(want[0]), jax.tree.leaves(params)))
    assert moved > 1e-4
