"""The ``flow`` objective: conditional flow matching (Lipman et al. 2023) on an affine path.

Config (``config.flow``, added by `add_flow_fields`): ``path`` ('cond_ot' | 'cosine' | 'vp',
`diffusion_jax.flow`; noise at t = 0, data at t = 1) and ``time_scale``: the network sees
``time_scale * t`` (999: the range of DDPM's step indices, which the U-Net's sinusoidal
embedding resolves; t itself in [0, 1] would use only its lowest frequencies).

``config.sample``: ``sampler`` one of `ode.SOLVERS` ('euler' | 'heun' with ``num_steps``;
'tsit5' | 'dopri5' with ``ode_rtol``, ``ode_atol``, ``ode_max_steps``), and
classifier-free guidance (`conditioning`). ``config.eval``: ``flow_likelihood`` (bits/dim
of the flow with uniform dequantization, offset 7 for 8-bit data in [-1, 1] as
`likelihood.ode_bpd`), ``flow_divergence`` ('exact' | 'hutchinson'), ``flow_rtol``,
``flow_atol``, ``flow_max_steps``; also the velocity loss per example.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.tree_util import Partial

from diffusion_jax import flow, likelihood, ode
from diffusion_jax.gaussian import check_choice
from diffusion_jax.models import factory
from diffusion_jax.sampling import flow as flow_sampling
from diffusion_jax.training.objectives import conditioning
from diffusion_jax.training.objectives.base import Objective, data_key, model_fn_for
from diffusion_jax.training.objectives.edm import check_image_model, init_params

__all__ = ["add_flow_fields", "flow_objective"]


def add_flow_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds ``config.flow`` and its sampler / evaluation fields (Heun, 25 steps = 50
    evaluations; adaptive solves with rtol = atol = 1e-5)."""
    config.objective = "flow"
    f = config.flow = ml_collections.ConfigDict()
    f.path = "cond_ot"
    f.time_scale = 999.0
    c = config.sample
    c.sampler = "heun"
    c.num_steps = 25
    c.ode_rtol, c.ode_atol, c.ode_max_steps = 1e-5, 1e-5, 4096
    e = config.eval
    e.flow_likelihood = True
    e.flow_divergence = "hutchinson"
    e.flow_rtol, e.flow_atol, e.flow_max_steps = 1e-5, 1e-5, 4096
    return config


def _scaled_time(model_fn, scale, x, t):
    return model_fn(x, t * scale)


def _validate(config):
    c, e = config.sample, config.eval
    check_choice("sample.sampler", c.sampler, ode.SOLVERS)
    check_choice("eval.flow_divergence", e.flow_divergence, flow.DIVERGENCES)
    if c.sampler in ode.FIXED_SOLVERS and not (isinstance(c.num_steps, int) and c.num_steps > 0):
        raise ValueError(f"sample.num_steps must be a positive int for sampler {c.sampler!r}; "
                         f"got {c.num_steps!r}.")
    for name in ("sample.ode_rtol", "sample.ode_atol", "eval.flow_rtol", "eval.flow_atol"):
        section, field = name.split(".")
        if not config[section][field] > 0:
            raise ValueError(f"{name} must be > 0; got {config[section][field]}.")
    if not config.flow.time_scale > 0:
        raise ValueError(f"flow.time_scale must be > 0; got {config.flow.time_scale}.")


def flow_objective(config: ml_collections.ConfigDict, info) -> Objective:
    """Velocity regression on ``config.flow.path``; ODE sampling; flow bits/dim in eval."""
    if "flow" not in config:
        raise ValueError("objective 'flow' needs config.flow (see configs/flow_digits.py).")
    check_image_model(config, info, "flow")
    _validate(config)
    num_classes = conditioning.check_conditioning(config)
    path = flow.get_path(config.flow.path)
    model = factory.create_model(config, info, info.shape[-1])
    shape, scale = tuple(info.shape), float(config.flow.time_scale)

    def init(key):
        return init_params(model, key, shape, num_classes)

    def loss(params, batch, key):
        x1 = batch[data_key(batch)]
        label_key, loss_key, dropout_key = jax.random.split(key, 3)
        labels = conditioning.training_labels(config, batch, label_key)
        model_fn = model_fn_for(model, params, labels=labels, train=True, dropout_key=dropout_key)
        out = flow.velocity_loss(path, Partial(_scaled_time, model_fn, scale), x1, key=loss_key)
        value = jnp.mean(out["loss"])
        return value, {"velocity_loss": value}

    def sample(params, key, num):
        c = config.sample
        velocity = Partial(_scaled_time, conditioning.sampling_model_fn(config, model, params, num),
                           scale)
        fixed = c.sampler in ode.FIXED_SOLVERS
        out = flow_sampling.sample_ode(
            velocity, (num,) + shape, key=key, solver=c.sampler,
            num_steps=c.num_steps if fixed else None, rtol=c.ode_rtol, atol=c.ode_atol,
            max_steps=c.ode_max_steps)
        return jnp.where(out["success"], out["sample"], jnp.nan)  # never a partial solve

    def evaluate(params, batch, key):
        x1 = batch[data_key(batch)]
        e = config.eval
        labels = batch.get("label") if num_classes is not None else None
        model_fn = Partial(_scaled_time, Partial(
            lambda p, y, x, t: model_fn_for(model, p, labels=y)(x, t), params, labels), scale)
        loss_key, dequant_key, probe_key = jax.random.split(key, 3)
        values = {"velocity_loss": flow.velocity_loss(path, model_fn, x1, key=loss_key)["loss"]}
        if e.flow_likelihood:
            x = likelihood.dequantize(x1, jax.random.uniform(dequant_key, x1.shape))
            out = flow.log_likelihood(
                model_fn, x, divergence=e.flow_divergence,
                key=probe_key if e.flow_divergence == "hutchinson" else None,
                rtol=e.flow_rtol, atol=e.flow_atol, max_steps=e.flow_max_steps)
            bpd = out["bpd"] + math.log2(128.0)
            values["flow_bpd"] = jnp.where(out["success"], bpd, jnp.nan)
            values["flow_nfe"] = jnp.full(x1.shape[:1], out["nfe"], jnp.float32)
        return values

    return Objective(init=init, loss=loss, sample=sample, evaluate=evaluate)
