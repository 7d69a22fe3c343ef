"""The ``sde`` objective: continuous-time denoising score matching (Song et al. 2021).

Config (``config.sde``, added by the configs that use it, see `add_sde_fields`):

- ``name``: 'vpsde' | 'subvpsde' | 'vesde' (score_sde's SDEs with beta_min, beta_max or
  sigma_min, sigma_max and ``num_scales`` = N), or 'ddpm': the VP SDE of the DDPM
  schedule ``config.diffusion.schedule`` / ``num_timesteps`` (`sde.DDPMVPSDE`), so that
  the network is also a DDPM eps model on that schedule and has a discrete bound.
- ``parameterization`` ('score' | 'eps' | 'x0' | 'v'), ``weighting`` ('std2' |
  'likelihood'), ``importance_sampling``, ``reduce_mean``, ``eps`` (t ~ U(eps, 1)):
  `sde_losses.dsm_loss`.

``config.sample``: ``sampler`` 'pc' | 'euler_maruyama' | 'ode'; ``predictor``,
``corrector``, ``snr``, ``corrector_steps``, ``denoise`` (PC); ``ode_solver``,
``ode_rtol``, ``ode_atol``, ``ode_max_steps``, ``num_steps`` (fixed-step ODE solvers).
``config.eval``: ``ode_likelihood`` (bool), ``ode_divergence``, ``ode_probe``,
``ode_dequant`` (K), ``ode_rtol``, ``ode_atol``, ``ode_max_steps``; with sde.name 'ddpm'
and eps outputs, also the discrete bound (and ``iw_samples``) of the DDPM schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import likelihood, ode, schedules, sde as sde_lib, sde_losses
from diffusion_jax.gaussian import check_choice
from diffusion_jax.models import factory
from diffusion_jax.sampling import pc
from diffusion_jax.training.objectives.base import Objective, data_key, model_fn_for

__all__ = ["SDE_NAMES", "SDE_SAMPLERS", "add_ode_eval_fields", "add_sde_fields", "create_sde", "sde_objective"]

SDE_NAMES = ("vpsde", "subvpsde", "vesde", "ddpm")
SDE_SAMPLERS = ("pc", "euler_maruyama", "ode")


def add_sde_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds ``config.sde`` and the sampler / evaluation fields of this objective (score_sde's
    defaults: VP SDE with beta in [0.1, 20], N = 1000, eps = 1e-5, snr 0.16, rtol = atol =
    1e-5)."""
    config.objective = "sde"
    s = config.sde = ml_collections.ConfigDict()
    s.name = "vpsde"
    s.beta_min, s.beta_max = 0.1, 20.0
    s.sigma_min, s.sigma_max = 0.01, 50.0
    s.num_scales = 1000
    s.parameterization = "eps"
    s.weighting = "std2"
    s.importance_sampling = False
    s.reduce_mean = True
    s.eps = 1e-5
    c = config.sample
    c.sampler = "pc"
    c.predictor, c.corrector = "reverse_diffusion", "langevin"
    c.snr, c.corrector_steps, c.denoise = 0.16, 1, "tweedie"
    c.ode_solver, c.ode_rtol, c.ode_atol, c.ode_max_steps = "tsit5", 1e-5, 1e-5, 4096
    c.sample_eps = 1e-3
    return add_ode_eval_fields(config)


def add_ode_eval_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the ODE likelihood's ``config.eval`` fields (also usable by a ``ddpm`` config)."""
    e = config.eval
    e.ode_likelihood = True
    e.ode_divergence, e.ode_probe, e.ode_dequant = "hutchinson", "rademacher", 1
    e.ode_rtol, e.ode_atol, e.ode_max_steps = 1e-5, 1e-5, 4096
    return config


def create_sde(config: ml_collections.ConfigDict):
    """The forward SDE of ``config.sde``."""
    s = config.sde
    check_choice("sde.name", s.name, SDE_NAMES)
    if s.name == "ddpm":
        d = config.diffusion
        return sde_lib.DDPMVPSDE.from_schedule(schedules.get_schedule(d.schedule, d.num_timesteps))
    if s.name == "vesde":
        return sde_lib.create_sde("vesde", sigma_min=s.sigma_min, sigma_max=s.sigma_max,
                                  N=s.num_scales)
    return sde_lib.create_sde(s.name, beta_min=s.beta_min, beta_max=s.beta_max, N=s.num_scales)


def _validate(config):
    s, c = config.sde, config.sample
    check_choice("sde.parameterization", s.parameterization, sde_losses.PARAMETERIZATIONS)
    check_choice("sde.weighting", s.weighting, sde_losses.WEIGHTINGS)
    check_choice("sample.sampler", c.sampler, SDE_SAMPLERS)
    check_choice("sample.predictor", c.predictor, pc.PREDICTORS)
    check_choice("sample.corrector", c.corrector, pc.CORRECTORS)
    check_choice("sample.ode_solver", c.ode_solver, ode.SOLVERS)
    check_choice("eval.ode_divergence", config.eval.ode_divergence, likelihood.DIVERGENCES)
    check_choice("eval.ode_probe", config.eval.ode_probe, ode.PROBES)
    if not c.snr > 0:
        raise ValueError(f"sample.snr must be > 0; got {c.snr}.")
    for name in ("sample.ode_rtol", "sample.ode_atol", "eval.ode_rtol", "eval.ode_atol"):
        section, field = name.split(".")
        if not config[section][field] > 0:
            raise ValueError(f"{name} must be > 0; got {config[section][field]}.")
    if s.importance_sampling and s.weighting != "likelihood":
        raise ValueError("sde.importance_sampling needs sde.weighting = 'likelihood'.")


def sde_objective(config: ml_collections.ConfigDict, info) -> Objective:
    """Continuous DSM training of ``model_fn(x, model_time(t))``; PC / EM / ODE sampling;
    ODE bits/dim (and, for sde.name 'ddpm' with eps outputs, the DDPM bound) in eval."""
    if "sde" not in config:
        raise ValueError("objective 'sde' needs config.sde (see configs/sde_digits.py).")
    _validate(config)
    sde = create_sde(config)
    s = config.sde
    model = factory.create_model(config, info, info.shape[-1])
    shape = tuple(info.shape)

    def init(key):
        x = jnp.zeros((1,) + shape, jnp.float32)
        return model.init({"params": key}, x, jnp.zeros((1,), jnp.float32), train=False)["params"]

    def loss(params, batch, key):
        x0 = batch[data_key(batch)]
        loss_key, dropout_key = jax.random.split(key)
        model_fn = model_fn_for(model, params, train=True, dropout_key=dropout_key)
        out = sde_losses.dsm_loss(
            sde, model_fn, x0, key=loss_key, parameterization=s.parameterization,
            weighting=s.weighting, importance_sampling=s.importance_sampling,
            reduce_mean=s.reduce_mean, eps=s.eps,
        )
        value = jnp.mean(out["loss"])
        return value, {"dsm": value}

    def score_fn(params):
        model_fn = jax.tree_util.Partial(
            lambda params, x, t: model_fn_for(model, params)(x, t), params)
        return sde_losses.score_fn_from_model(sde, model_fn, s.parameterization)

    def sample(params, key, num):
        c = config.sample
        if c.sampler == "ode":
            out = pc.ode_sample(sde, score_fn(params), (num,) + shape, key=key,
                                solver=c.ode_solver, rtol=c.ode_rtol, atol=c.ode_atol,
                                max_steps=c.ode_max_steps, eps=c.sample_eps,
                                num_steps=c.num_steps if c.ode_solver in ode.FIXED_SOLVERS else None,
                                denoise="tweedie" if c.denoise == "tweedie" else "none")
            # Under jit the budget cannot raise: a failed solve gives NaN samples, never
            # a silent partial result.
            return jnp.where(out["success"], out["sample"], jnp.nan)
        predictor = "euler_maruyama" if c.sampler == "euler_maruyama" else c.predictor
        corrector = "none" if c.sampler == "euler_maruyama" else c.corrector
        return pc.pc_sample(sde, score_fn(params), (num,) + shape, key=key,
                            predictor=predictor, corrector=corrector, snr=c.snr,
                            n_steps=c.corrector_steps, eps=c.sample_eps,
                            denoise=c.denoise)["sample"]

    def evaluate(params, batch, key):
        x0 = batch[data_key(batch)]
        e = config.eval
        values = {}
        bound_key, ode_key = jax.random.split(key)
        if isinstance(sde, sde_lib.DDPMVPSDE) and s.parameterization == "eps":
            values.update(_ddpm_bound(config, model, params, x0, bound_key))
        if e.ode_likelihood:
            kw = dict(divergence=e.ode_divergence, probe=e.ode_probe, rtol=e.ode_rtol,
                      atol=e.ode_atol, max_steps=e.ode_max_steps, eps=s.eps)
            if info.kind == "image":
                out = likelihood.ode_bpd(sde, score_fn(params), x0, key=ode_key,
                                         num_dequant=e.ode_dequant, **kw)
                values["ode_bpd"], values["ode_bpd_iw"] = out["bpd"], out["bpd_iw"]
                values["ode_nfe"] = jnp.mean(out["nfe"].astype(jnp.float32), axis=0)
            else:
                hutch = e.ode_divergence == "hutchinson"
                out = likelihood.ode_likelihood(sde, score_fn(params), x0,
                                                key=ode_key if hutch else None, **kw)
                nll = -out["logp"] / x0[0].size
                values["ode_nll_per_dim"] = jnp.where(out.get("success", True), nll, jnp.nan)
                values["ode_nfe"] = out["nfe"].astype(jnp.float32)
        return values

    return Objective(init=init, loss=loss, sample=sample if info.kind == "image" else None,
                     evaluate=evaluate)


def _ddpm_bound(config, model, params, x0, key):
    """The DDPM bound (and IW estimate) of the network as an eps model on its schedule."""
    d = config.diffusion
    schedule = schedules.get_schedule(d.schedule, d.num_timesteps)
    model_fn = jax.tree_util.Partial(lambda params, x, t: model_fn_for(model, params)(x, t),
                                     params)
    kw = dict(mean_type="eps", var_type=d.var_type, clip_denoised=config.eval.clip_denoised,
              decoder_type=d.decoder_type)
    bound_key, iw_key = jax.random.split(key)
    out = likelihood.calc_bpd_loop(schedule, model_fn, x0, key=bound_key, **kw)
    values = {"total_bpd": out["total_bpd"], "prior_bpd": out["prior_bpd"],
              "decoder_bpd": out["vb"][:, 0]}
    if config.eval.iw_samples > 0:
        iw = likelihood.importance_weighted_log_likelihood(
            schedule, model_fn, x0, key=iw_key, num_samples=config.eval.iw_samples, **kw)
        values["iw_bpd"], values["iw_elbo_bpd"] = iw["iw_bpd"], iw["elbo_bpd"]
    return values
