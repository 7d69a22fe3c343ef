"""Classifier-free guidance: the combination, one doubled-batch call, every sampler, dropout."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from diffusion_jax import edm, guidance, sampling, schedules, sde, sde_losses
from diffusion_jax.models.unet import UNet
from diffusion_jax.sampling import edm as edm_sampling
from diffusion_jax.sampling import flow as flow_sampling
from diffusion_jax.sampling import pc

NUM_CLASSES = 3
EMB = jnp.asarray(np.random.default_rng(0).normal(size=(NUM_CLASSES + 1, 2)), jnp.float32)
LABELS = jnp.array([0, 2, 1, 2], jnp.int32)
SHAPE = (4, 2)


def _network(emb, x, t, y):
    """A conditional 'network' that embeds NUM_CLASSES + 1 classes (the last: null)."""
    return 0.3 * x + emb[y] * (1.0 + 0.001 * t.astype(jnp.float32))[:, None]


NET = Partial(_network, EMB)


def _two_calls(emb, w, x, t):
    """The reference: the conditional and unconditional outputs from two separate calls."""
    cond = _network(emb, x, t, LABELS)
    uncond = _network(emb, x, t, jnp.full_like(LABELS, NUM_CLASSES))
    return (1.0 + w) * cond - w * uncond


def test_guided_output_conventions():
    c, u = jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0])
    np.testing.assert_array_equal(guidance.guided_output(c, u, 0.0), c)  # w = 0: exactly c
    np.testing.assert_allclose(guidance.guided_output(c, u, 2.0), 3 * c - 2 * u)
    np.testing.assert_allclose(guidance.guided_output(c, u, 3.0, convention="lerp"),
                               guidance.guided_output(c, u, 2.0), rtol=1e-6)
    np.testing.assert_array_equal(guidance.guided_output(c, u, 1.0, convention="lerp"), c)
    assert guidance.guidance_weight(3.0, "lerp") == 2.0


def test_one_call_on_the_doubled_batch_equals_two_calls():
    shapes = []

    def counting(x, t, y):
        shapes.append(x.shape)
        return _network(EMB, x, t, y)

    x = jax.random.normal(jax.random.key(0), SHAPE)
    t = jnp.array([3, 50, 700, 999], jnp.int32)
    got = guidance.guided_model_fn(counting, LABELS, scale=2.0, num_classes=NUM_CLASSES)(x, t)
    assert shapes == [(8, 2)]  # one call, doubled batch
    np.testing.assert_allclose(got, _two_calls(EMB, 2.0, x, t), rtol=1e-6, atol=1e-6)
    shapes.clear()
    zero = guidance.guided_model_fn(counting, LABELS, scale=0.0, num_classes=NUM_CLASSES)(x, t)
    assert shapes == [(4, 2)]  # w = 0: the conditional batch only
    np.testing.assert_array_equal(zero, _network(EMB, x, t, LABELS))
    lerp = guidance.guided_model_fn(counting, LABELS, scale=3.0, num_classes=NUM_CLASSES,
                                    convention="lerp")(x, t)
    np.testing.assert_allclose(lerp, got, rtol=1e-6, atol=1e-6)


def test_learned_variance_channels_are_the_conditional_ones():
    def net(x, t, y):
        return jnp.concatenate([_network(EMB, x, t, y), 2.0 * _network(EMB, x, t, y)], -1)

    x, t = jnp.ones(SHAPE), jnp.zeros((4,), jnp.int32)
    got = guidance.guided_model_fn(net, LABELS, scale=2.0, num_classes=NUM_CLASSES,
                                   guided_channels=2)(x, t)
    np.testing.assert_allclose(got[:, :2], _two_calls(EMB, 2.0, x, t), rtol=1e-6)
    np.testing.assert_allclose(got[:, 2:], 2.0 * _network(EMB, x, t, LABELS), rtol=1e-6)


def _ddpm(kind):
    schedule = schedules.get_schedule("cosine", 20)

    def run(model_fn):
        return sampling.sample(schedule, model_fn, SHAPE, sampler=kind, key=jax.random.key(1),
                               num_steps=5 if kind == "dpm_solver++" else 10,
                               mean_type="eps", var_type="fixed_large")
    return run


def _edm(model_fn):
    denoiser = edm.denoiser_fn(edm.EDMPrecond(), model_fn)
    return edm_sampling.edm_sampler(denoiser, SHAPE, key=jax.random.key(2), num_steps=4,
                                    S_churn=1.0)["sample"]


def _flow(model_fn):
    x0 = jax.random.normal(jax.random.key(3), SHAPE)
    return flow_sampling.sample_ode(model_fn, x0=x0, solver="heun", num_steps=4)["sample"]


def _pc(model_fn):
    vp = sde.VPSDE(N=5)
    score_fn = sde_losses.score_fn_from_model(vp, model_fn, "eps")
    return pc.pc_sample(vp, score_fn, SHAPE, key=jax.random.key(4), n_steps=1)["sample"]


def _pf_ode(model_fn):
    vp = sde.VPSDE(N=1000)
    score_fn = sde_losses.score_fn_from_model(vp, model_fn, "eps")
    return pc.ode_sample(vp, score_fn, SHAPE, key=jax.random.key(4), solver="heun",
                         num_steps=4)["sample"]


SAMPLERS = {"ancestral": _ddpm("ancestral"), "ddim": _ddpm("ddim"),
            "dpm_solver++": _ddpm("dpm_solver++"), "edm_heun": _edm, "flow_ode": _flow,
            "pc_sde": _pc, "probability_flow_ode": _pf_ode}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_takes_the_guided_model(name):
    """The guided model (one doubled-batch call per evaluation) gives the samples of the
    two-call reference; w = 0's single call is tested above, exactly."""
    run = SAMPLERS[name]
    guided = run(guidance.guided_model_fn(NET, LABELS, scale=2.0, num_classes=NUM_CLASSES))
    np.testing.assert_allclose(guided, run(Partial(_two_calls, EMB, 2.0)), rtol=1e-5, atol=1e-5)
    conditional = run(Partial(_two_calls, EMB, 0.0))  # the same compiled loop, w = 0
    assert not np.allclose(guided, conditional, atol=1e-3)  # the guidance did something


def test_label_dropout_rate():
    """100,000 labels at p_uncond = 0.2: the dropped share within 4 standard errors
    (4 sqrt(0.16 / 1e5) = 0.005); the kept labels unchanged."""
    labels = jnp.arange(100_000, dtype=jnp.int32) % NUM_CLASSES
    out = guidance.drop_labels(jax.random.key(5), labels, p_uncond=0.2, num_classes=NUM_CLASSES)
    dropped = np.asarray(out) == NUM_CLASSES
    assert abs(dropped.mean() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / labels.size)
    np.testing.assert_array_equal(np.asarray(out)[~dropped], np.asarray(labels)[~dropped])
    same = guidance.drop_labels(jax.random.key(5), labels, p_uncond=0.0, num_classes=NUM_CLASSES)
    np.testing.assert_array_equal(same, labels)


def test_unet_embeds_the_null_class():
    net = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
               num_classes=NUM_CLASSES, null_class=True)
    x, t = jnp.ones((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
    params = jax.eval_shape(partial(net.init, train=False), jax.random.key(0), x, t,
                            jnp.zeros((2,), jnp.int32))["params"]
    assert params["class_embed"]["embedding"].shape == (NUM_CLASSES + 1, 128)
    with pytest.raises(ValueError, match="null_class=True needs num_classes"):
        jax.eval_shape(partial(UNet(ch=32, ch_mult=(1,), null_class=True).init, train=False),
                       jax.random.key(0), x, t)


@pytest.mark.parametrize("call,match", [
    (lambda: guidance.guided_model_fn(NET, LABELS, scale=1.0, num_classes=None),
     "needs a class-conditional model"),
    (lambda: guidance.guided_model_fn(NET, jnp.array([0, 3]), scale=1.0, num_classes=3),
     r"must lie in \[0, num_classes\) = \[0, 3\); got values in \[0, 3\]"),
    (lambda: guidance.guided_model_fn(NET, jnp.array([-1, 0]), scale=1.0, num_classes=3),
     "must lie in"),
    (lambda: guidance.guided_model_fn(NET, LABELS, scale=1.0, num_classes=3, convention="cfg"),
     r"valid values are \['ho_salimans', 'lerp'\]"),
    (lambda: guidance.guided_model_fn(NET, LABELS, scale=float("nan"), num_classes=3),
     "finite number"),
    (lambda: guidance.drop_labels(jax.random.key(0), LABELS, p_uncond=1.0, num_classes=3),
     r"p_uncond must lie in \[0, 1\)"),
    (lambda: guidance.drop_labels(jax.random.key(0), LABELS, p_uncond=-0.1, num_classes=3),
     r"p_uncond must lie in \[0, 1\)"),
    (lambda: guidance.drop_labels(jax.random.key(0), jnp.array([5]), p_uncond=0.1,
                                  num_classes=3), "must lie in"),
])
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
