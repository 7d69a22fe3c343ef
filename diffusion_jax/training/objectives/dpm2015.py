"""The 2015 paper's objectives: ``dpm2015_gaussian`` and ``dpm2015_binomial``.

Both maximise the bound K of Sohl-Dickstein et al. (2015), Eq. 14: the loss is -K in bits
per example (batch mean). The params pytree holds everything that is learned, so the
generic train step (optax, EMA, checkpoints, resume) trains all of it:

- ``params['network']``: the Flax network's parameters: a normalized RBF net
  (``model.name='rbf'``, Appendix D.1.1) or an MLP (``model.name='mlp'``, Appendix D.1.2),
  both with lower layers shared over time and a readout per step. Readout k serves the
  reverse kernel of 0-based step k + 1 (the paper's t = k + 2): the first reverse step is
  fixed (Appendix B.2), so there are T - 1 readouts.
- ``params['beta_offsets']`` (Gaussian, ``dpm2015.schedule='learned'``): the T - 1
  offsets of logit(beta_2..beta_T) from the baseline schedule 1 / (T - t + 1), trained
  by gradient ascent on K through the frozen noise (Sec. 2.4.1); beta_1 stays fixed.

Config fields read here (``config.dpm2015``, see `config.default_config`): ``schedule``
('learned' | 'fixed'), ``beta_1``, ``baseline`` (the learned betas' starting point:
'sohl_dickstein', 1 / (T - t + 1), or 'geometric', `dpm2015.geometric_betas`),
``mean_gain`` (scale the network's z_mu at step t by the fixed 1 / sqrt(1 - abar_{t-1})
of the baseline, see `_mean_gain`), ``prior_prob`` (binomial p), ``kl_estimator``
('all': every KL term for each example; 'uniform': one t ~ U[1, T) per example, scaled
by T - 1), ``t_per_example`` (draws of t per example for 'uniform'), ``rbf_hidden``,
``readout_basis`` (0: a free readout per step; K: combinations of K basis readouts,
`models.mlp.temporal_basis`). And
``diffusion.num_timesteps`` (T), ``model.name``, ``model.features``, ``model.activation``.

`build_model` returns a `Model2015` with what evaluation and figures need beyond the
objective: the schedule of given parameters, the network as ``model_fn(x_t, t)``, the
whole bound per example, and ancestral sampling.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import binomial, dpm2015, schedules
from diffusion_jax.gaussian import check_choice
from diffusion_jax.models import MLP
from diffusion_jax.models.rbf import NormalizedRBF
from diffusion_jax.training.objectives import base as objectives

__all__ = [
    "GAUSSIAN_SCHEDULES",
    "KL_ESTIMATORS",
    "NETWORKS",
    "Model2015",
    "binomial_objective",
    "build_model",
    "evaluate_bound",
    "gaussian_objective",
]

GAUSSIAN_SCHEDULES = ("learned", "fixed")
BASELINES = ("sohl_dickstein", "geometric")
KL_ESTIMATORS = ("all", "uniform")
NETWORKS = ("rbf", "mlp")
KINDS = ("gaussian", "binomial")


@dataclasses.dataclass(frozen=True)
class Model2015:
    """A 2015-style diffusion model: the network, and how params become a schedule.

    Attributes:
      kind: 'gaussian' or 'binomial'.
      network: the Flax module, called as ``network.apply({'params': p}, x, k)`` with
        readout index k = t - 1.
      num_timesteps: T.
      dim: D, the data dimension.
      learned_betas: whether ``params['beta_offsets']`` exists.
      baseline_betas: float64 (T,), the fixed schedule or the learned one's baseline.
      prior_prob: the binomial prior's p (binomial only).
      output_gain: None, or float32 (T - 1, out) fixed per-step factors multiplying the
        network's output (part of the per-step readout, see ``dpm2015.mean_gain``).
      input_mean, input_std: the network sees (x_t - input_mean) / input_std. Binary
        data are standardised under the prior (p, sqrt(p (1 - p))); Gaussian x_t already
        has mean 0 and variance 1.
      zero_readout: start every readout at 0 (binomial: the initial reverse kernels are
        the forward kernels run backwards, so K starts at L_null for data whose mean
        activity is p, instead of below it).
    """

    kind: str
    network: nn.Module
    num_timesteps: int
    dim: int
    learned_betas: bool
    baseline_betas: np.ndarray
    prior_prob: float = 0.5
    output_gain: np.ndarray | None = None
    input_mean: float = 0.0
    input_std: float = 1.0
    zero_readout: bool = False

    def __post_init__(self):
        # One function object per model: jit caches on it (a Partial's function is
        # static), so every model_fn(params) reuses the compiled loops.
        object.__setattr__(self, "_apply", functools.partial(
            _apply_network, self.network, self.input_mean, self.input_std))
        object.__setattr__(self, "_apply_blocked", {})
        object.__setattr__(self, "jitted_bound", jax.jit(self.bound))

    def init(self, key) -> dict:
        x = jnp.zeros((1, self.dim), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        params = {"network": self.network.init({"params": key}, x, t)["params"]}
        if self.zero_readout:
            params["network"] = {
                name: jnp.zeros_like(value) if name.startswith("readout") else value
                for name, value in params["network"].items()
            }
        if self.learned_betas:
            params["beta_offsets"] = jnp.zeros((self.num_timesteps - 1,), jnp.float32)
        return params

    def schedule(self, params):
        """The `Schedule` (Gaussian) or `BinomialSchedule` of these parameters."""
        if self.kind == "binomial":
            return binomial.BinomialSchedule.from_betas(self.baseline_betas, self.prior_prob)
        if self.learned_betas:
            return dpm2015.schedule_from_offsets(params["beta_offsets"], self.baseline_betas)
        return schedules.Schedule.from_betas(self.baseline_betas)

    def model_fn(self, params, block_size: int | None = None) -> jax.tree_util.Partial:
        """``model_fn(x_t, t)`` for 0-based t in [1, T) (t = 0 maps to readout 0; the
        math never uses the output there). A Partial: jit-compatible, params traced.

        ``block_size``: the caller promises rows in blocks of this many that share a step
        (the step-major layout of `dpm2015.bound_k` and ``binomial.bound_k(batched=True)``
        with block_size = B); the network then reads each block's readout once instead of
        gathering one per row. Only the first row's t of each block is used.
        """
        apply = self._apply_blocked.get(block_size)
        if apply is None:  # one function object per block size: jit caches stay valid
            apply = self._apply_blocked[block_size] = functools.partial(self._apply, block_size)
        return jax.tree_util.Partial(apply, params["network"], self.output_gain)

    def bound(self, params, x_start, key) -> dict:
        """K of Eq. 14 with every KL term, per example: dict of (B,) values in nats
        (``k``, ``k_minus_null``) and the per-step KL (see `dpm2015.bound_k`,
        `binomial.bound_k`)."""
        schedule = self.schedule(params)
        fn = self.model_fn(params)
        if self.kind == "binomial":
            return binomial.bound_k(schedule, fn, x_start, key=key)
        return dpm2015.bound_k(schedule, fn, x_start, key=key)

    def sample(self, params, key, num: int, save_steps=()) -> dict:
        """Ancestral samples: dict with ``sample`` (num, D) and ``saved`` chain states."""
        schedule = self.schedule(params)
        fn = self.model_fn(params)
        module = binomial if self.kind == "binomial" else dpm2015
        return module.p_sample_loop(schedule, fn, (num, self.dim), key=key,
                                    save_steps=tuple(save_steps))


def _apply_network(network, input_mean, input_std, block_size, params, gain, x_t, t):
    readout = jnp.maximum(t - 1, 0)
    x_in = (x_t - input_mean) / input_std if (input_mean, input_std) != (0.0, 1.0) else x_t
    if block_size is None:
        out = network.apply({"params": params}, x_in, readout)
        return out if gain is None else out * jnp.asarray(gain)[readout]
    rows, dim = x_in.shape
    if rows % block_size:
        raise ValueError(f"{rows} rows do not split into blocks of {block_size}.")
    blocks = readout.reshape((rows // block_size, block_size))[:, 0]
    out = network.apply({"params": params}, x_in.reshape((-1, block_size, dim)), blocks)
    if gain is not None:
        out = out * jnp.asarray(gain)[blocks][:, None, :]
    return out.reshape((rows, out.shape[-1]))


def _mean_gain(betas: np.ndarray, dim: int) -> np.ndarray:
    """(T - 1, 2D) gains: 1 / sqrt(1 - abar_{t-1}) on z_mu, 1 on z_Sigma, for t = 1..T-1.

    Near the data the best z_mu of Eq. 65 is about (E[x_0 | x_t] - x_t) / (1 - abar_{t-1}),
    a noise estimate times 1 / sqrt(1 - abar_{t-1}): with this fixed factor the network
    outputs O(1) values at every step instead of values up to 1 / sqrt(beta_1).
    """
    one_minus = -np.expm1(np.cumsum(np.log1p(-betas)))
    mu_gain = 1.0 / np.sqrt(one_minus[:-1])
    gain = np.concatenate(
        [np.repeat(mu_gain[:, None], dim, 1), np.ones((len(mu_gain), dim))], axis=1
    )
    return gain.astype(np.float32)


def _network(config: ml_collections.ConfigDict, kind: str, dim: int) -> nn.Module:
    num_readouts = config.diffusion.num_timesteps - 1
    out_dim = 2 * dim if kind == "gaussian" else dim
    name = config.model.name
    check_choice("model.name (for the 2015 objectives)", name, NETWORKS)
    basis = config.dpm2015.readout_basis
    if isinstance(basis, bool) or not isinstance(basis, int) or not 0 <= basis <= num_readouts:
        raise ValueError(
            f"dpm2015.readout_basis must be an int in [0, T - 1 = {num_readouts}] (0: a free "
            f"readout per step); got {basis!r}."
        )
    if name == "rbf":
        if basis:
            raise ValueError("dpm2015.readout_basis applies to model.name 'mlp'; set it to 0 "
                             "for the RBF net.")
        return NormalizedRBF(
            num_timesteps=num_readouts, num_hidden=int(config.dpm2015.rbf_hidden),
            out_dim=out_dim,
        )
    return MLP(
        num_timesteps=num_readouts, features=tuple(config.model.features), out_dim=out_dim,
        activation=config.model.activation, time_embedding="none", per_step_readout=True,
        readout_basis=basis,
    )


def build_model(config: ml_collections.ConfigDict, info, kind: str) -> Model2015:
    """The `Model2015` of a config for data described by ``info`` (`data.DataInfo`).

    Raises:
      ValueError: an unknown name (listing the valid ones), T < 2, non-vector data,
        beta_1 or prior_prob outside (0, 1).
    """
    check_choice("kind", kind, KINDS)
    d = config.dpm2015
    num_timesteps = config.diffusion.num_timesteps
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(
            f"diffusion.num_timesteps must be an int >= 2 for the 2015 bound (the first "
            f"step has no KL term); got {num_timesteps!r}."
        )
    if info.kind != "vector" or len(info.shape) != 1:
        raise ValueError(
            f"The 2015 objectives need vector data of shape (D,); data.name {info.name!r} "
            f"has {info.kind} data of shape {info.shape}."
        )
    dim = int(info.shape[0])
    check_choice("dpm2015.kl_estimator", d.kl_estimator, KL_ESTIMATORS)
    if kind == "binomial":
        if not 0.0 < d.prior_prob < 1.0:
            raise ValueError(f"dpm2015.prior_prob must lie in (0, 1); got {d.prior_prob}.")
        betas = 1.0 / (num_timesteps - np.arange(num_timesteps, dtype=np.float64))
        p = float(d.prior_prob)
        return Model2015("binomial", _network(config, kind, dim), num_timesteps, dim, False,
                         betas, p, input_mean=p, input_std=float(np.sqrt(p * (1 - p))),
                         zero_readout=True)
    check_choice("dpm2015.schedule", d.schedule, GAUSSIAN_SCHEDULES)
    check_choice("dpm2015.baseline", d.baseline, BASELINES)
    if not 0.0 < d.beta_1 < 1.0:
        raise ValueError(f"dpm2015.beta_1 must lie in (0, 1); got {d.beta_1}.")
    if d.baseline == "geometric" and d.schedule == "fixed":
        raise ValueError(
            "dpm2015.baseline 'geometric' is a start for learned betas; the fixed schedule "
            "is the paper's 1 / (T - t + 1): set dpm2015.schedule='learned' or "
            "dpm2015.baseline='sohl_dickstein'."
        )
    if d.baseline == "geometric":
        betas = dpm2015.geometric_betas(num_timesteps, beta_1=float(d.beta_1))
    else:
        betas = schedules.sohl_dickstein_betas(num_timesteps, beta_1=float(d.beta_1))
    gain = _mean_gain(betas, dim) if d.mean_gain else None
    return Model2015("gaussian", _network(config, kind, dim), num_timesteps, dim,
                     d.schedule == "learned", betas, output_gain=gain)


def _estimate(model: Model2015, params, x_start, key, config) -> dict:
    """K per example (nats) by the configured estimator."""
    d = config.dpm2015
    schedule = model.schedule(params)
    module = binomial if model.kind == "binomial" else dpm2015
    if d.kl_estimator == "all":
        # Step-major rows (step s + 1 in rows s B .. s B + B - 1): blocked readouts.
        fn = model.model_fn(params, block_size=x_start.shape[0])
        if model.kind == "binomial":
            return binomial.bound_k(schedule, fn, x_start, key=key, batched=True)
        return dpm2015.bound_k(schedule, fn, x_start, key=key)
    fn = model.model_fn(params)
    repeats = int(d.t_per_example)
    if repeats < 1:
        raise ValueError(f"dpm2015.t_per_example must be a positive int; got {repeats}.")
    tiled = jnp.tile(x_start, (repeats, 1))
    out = module.bound_estimate(schedule, fn, tiled, key=key)
    batch = x_start.shape[0]
    k = jnp.mean(out["k"].reshape((repeats, batch)), axis=0)
    null = (binomial.null_log_likelihood(schedule, x_start) if model.kind == "binomial"
            else dpm2015.null_log_likelihood(x_start))
    return {"k": k, "k_minus_null": k - null}


def _objective(config: ml_collections.ConfigDict, info, kind: str) -> objectives.Objective:
    model = build_model(config, info, kind)

    def loss(params, batch, key):
        x_start = batch[objectives.data_key(batch)]
        out = _estimate(model, params, x_start, key, config)
        k_bits = jnp.mean(out["k"]) / dpm2015.LN2
        metrics = {
            "K_bits": k_bits,
            "K_minus_null_bits": jnp.mean(out["k_minus_null"]) / dpm2015.LN2,
        }
        return -k_bits, metrics

    def evaluate(params, batch, key):
        x_start = batch[objectives.data_key(batch)]
        out = model.bound(params, x_start, key)
        return {
            "K_bits": out["k"] / dpm2015.LN2,
            "K_minus_null_bits": out["k_minus_null"] / dpm2015.LN2,
        }

    return objectives.Objective(init=model.init, loss=loss, sample=None, evaluate=evaluate)


def gaussian_objective(config: ml_collections.ConfigDict, info) -> objectives.Objective:
    """``dpm2015_gaussian``: Eq. 64-65 kernels, the bound K of Eq. 14, fixed or learned
    betas. Loss: -K in bits per example; metrics ``K_bits``, ``K_minus_null_bits``."""
    return _objective(config, info, "gaussian")


def binomial_objective(config: ml_collections.ConfigDict, info) -> objectives.Objective:
    """``dpm2015_binomial``: binary data, Bernoulli(p) prior, the schedule 1 / (T - t + 1),
    learned reverse rates f_b. Loss: -K in bits per example."""
    return _objective(config, info, "binomial")


def evaluate_bound(
    model: Model2015, params, x, *, key, batch_size: int = 1000
) -> dict[str, np.ndarray]:
    """K and K - L_null (bits) for every example of a held-out set, every KL term each.

    Args:
      x: float32 (N, D) examples; N need not be a multiple of ``batch_size`` (the last
        batch is padded and the padding dropped).
      key: batch i draws its noise from ``fold_in(key, i)``.

    Returns:
      dict of float64 (N,) arrays: ``K_bits``, ``K_minus_null_bits``.
    """
    x = np.asarray(x, np.float32)
    fn = model.jitted_bound
    ks, diffs = [], []
    for i, start in enumerate(range(0, x.shape[0], batch_size)):
        chunk = x[start:start + batch_size]
        pad = batch_size - chunk.shape[0]
        padded = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)]) if pad else chunk
        out = jax.device_get(fn(params, padded, jax.random.fold_in(key, i)))
        ks.append(np.asarray(out["k"], np.float64)[: chunk.shape[0]])
        diffs.append(np.asarray(out["k_minus_null"], np.float64)[: chunk.shape[0]])
    return {
        "K_bits": np.concatenate(ks) / dpm2015.LN2,
        "K_minus_null_bits": np.concatenate(diffs) / dpm2015.LN2,
    }
