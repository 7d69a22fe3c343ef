"""The full variational bound on -log p(x_0), in bits per dimension.

`calc_bpd_loop` evaluates every term of DDPM's bound (Ho et al. 2020, Eq. 5) for a batch,
L_0 (decoder) + L_1 + ... + L_{T-1} (KLs) + L_T (prior), in one compiled ``lax.scan``
over the T steps: one dispatch, memory independent of T (unless a fixed noise sequence of
shape (T, *x.shape) is passed in for replay).

Models are passed as ``model_fn(x_t, t) -> output``. Wrap parameters with
``jax.tree_util.Partial(apply_fn, params)``: the parameters are then traced arguments of
the compiled loop, not constants baked into it, and a new set of parameters of the same
shapes reuses the compiled code. A plain function is wrapped the same way (and compiled
once per function object).

`bpd_over_dataset` averages the bound over an iterable of batches, with its standard
error. `importance_weighted_log_likelihood` gives the tighter importance-weighted estimate
of log p(x_0) (Sohl-Dickstein et al. 2015, Eq. 9, before Jensen's inequality) and the
ELBO from the same forward trajectories.

`ode_likelihood` and `ode_bpd` give the exact log-likelihood of the probability-flow ODE
of a score SDE (Song et al. 2021), with `ode.solve_ode` and its divergences; a DDPM eps
model enters through `sde.DDPMVPSDE` and `sde_losses.score_fn_from_model`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax import gaussian, losses, ode, sde as sde_lib
from diffusion_jax.gaussian import MEAN_TYPES, VAR_TYPES, check_choice
from diffusion_jax.schedules import Schedule

__all__ = [
    "DIVERGENCES",
    "as_model_fn",
    "check_images",
    "dequantize",
    "ode_bpd",
    "ode_likelihood",
    "bpd_over_dataset",
    "calc_bpd_loop",
    "importance_weighted_log_likelihood",
]


def as_model_fn(model_fn: Callable) -> Partial:
    """Wraps a callable as a `jax.tree_util.Partial`, a pytree that ``jit`` can take."""
    if isinstance(model_fn, Partial):
        return model_fn
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable as model_fn(x_t, t); got {model_fn!r}.")
    return Partial(model_fn)


def calc_bpd_loop(
    schedule: Schedule,
    model_fn: Callable,
    x_start,
    *,
    key=None,
    noise=None,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    decoder_type: str = "discretized",
) -> dict:
    """Every term of the variational bound for a batch (DDPM Eq. 5; improved DDPM Sec. 4).

    For each t in [0, T): x_t = q_sample(x_0, t, noise_t), the model is called at
    (x_t, t), and L_t is computed (`losses.vb_terms_bpd`). One Monte Carlo sample of x_t
    per step and example: the total is an unbiased estimate of the bound.

    Args:
      schedule: the diffusion schedule (T steps).
      model_fn: ``model_fn(x_t, t) -> output``; preferably a `jax.tree_util.Partial`.
      x_start: x_0, shape (B, ..., C), scaled to [-1, 1] for the discretized decoder.
      key: PRNG key; step t draws its noise from ``fold_in(key, t)``. Or:
      noise: a fixed noise sequence of shape (T, *x_start.shape), noise[t] for step t,
        to replay results against another implementation.
      clip_denoised: clip pred_xstart to [-1, 1] (images).
      decoder_type: ``discretized`` (8-bit data) or ``gaussian`` (continuous data).

    Returns:
      dict of bits/dim values: ``total_bpd`` (B,) = sum of ``vb`` over t + ``prior_bpd``;
      ``prior_bpd`` (B,) = L_T; ``vb`` (B, T) = L_t for each t; ``xstart_mse`` (B, T),
      mean squared error of pred_xstart; ``mse`` (B, T), mean squared error of the eps
      implied by the prediction against the true noise.
    """
    check_choice("mean_type", mean_type, MEAN_TYPES)
    check_choice("var_type", var_type, VAR_TYPES)
    check_choice("decoder_type", decoder_type, losses.DECODER_TYPES)
    x_start = jnp.asarray(x_start)
    if (key is None) == (noise is None):
        raise ValueError("Pass exactly one of `key` and `noise` to calc_bpd_loop.")
    if noise is not None:
        want = (schedule.num_timesteps,) + x_start.shape
        if jnp.shape(noise) != want:
            raise ValueError(
                f"noise must have shape (T, *x_start.shape) = {want}; got {jnp.shape(noise)}."
            )
    return _calc_bpd_loop(
        schedule,
        as_model_fn(model_fn),
        x_start,
        key,
        noise,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        decoder_type=decoder_type,
    )


@partial(jax.jit, static_argnames=("mean_type", "var_type", "clip_denoised", "decoder_type"))
def _calc_bpd_loop(
    schedule, model_fn, x_start, key, noise, *, mean_type, var_type, clip_denoised, decoder_type
):
    batch = x_start.shape[0]

    def step(_, inputs):
        t_scalar, noise_t = inputs
        if noise_t is None:
            noise_t = jax.random.normal(
                jax.random.fold_in(key, t_scalar), x_start.shape, x_start.dtype
            )
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
        x_t = gaussian.q_sample(schedule, x_start, t, noise=noise_t)
        terms = losses.vb_terms_bpd(
            schedule,
            model_fn(x_t, t),
            x_start,
            x_t,
            t,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
            decoder_type=decoder_type,
        )
        pred_xstart = terms["pred_xstart"]
        eps = gaussian.predict_eps_from_xstart(schedule, x_t, t, pred_xstart)
        return None, (
            terms["output"],
            losses.mean_flat(jnp.square(pred_xstart - x_start)),
            losses.mean_flat(jnp.square(eps - noise_t)),
        )

    steps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    _, (vb, xstart_mse, mse) = jax.lax.scan(step, None, (steps, noise))
    prior = losses.prior_bpd(schedule, x_start)
    return {
        "total_bpd": jnp.sum(vb, axis=0) + prior,
        "prior_bpd": prior,
        "vb": vb.T,
        "xstart_mse": xstart_mse.T,
        "mse": mse.T,
    }


def bpd_over_dataset(
    schedule: Schedule,
    model_fn: Callable,
    batches: Iterable,
    *,
    key,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    decoder_type: str = "discretized",
    field: str | None = None,
) -> dict:
    """The variational bound (DDPM Eq. 5) averaged over a data set, with its standard error.

    Runs `calc_bpd_loop` on each batch (batch i draws its noise with ``fold_in(key, i)``)
    and averages over all examples. Per-batch results stay on the device until the end,
    so the loop does not wait for each batch. A batch may be a global ``jax.Array``
    sharded over a mesh's data axis: ``calc_bpd_loop`` is jitted and follows its input's
    sharding, so the bound is computed data-parallel (per-host batches must first be
    assembled into global arrays by the caller, e.g. with
    ``jax.make_array_from_process_local_data``).

    Args:
      batches: an iterable of arrays (B_i, ..., C) (batch sizes may differ), or of
        mappings holding the array under ``field`` (e.g. ``'image'``).
      Others: as `calc_bpd_loop`.

    Returns:
      dict of Python floats and float64 NumPy arrays, in bits/dim: ``total_bpd`` (the
      mean over examples) and ``total_bpd_stderr`` (its standard error: the sample
      standard deviation of the per-example totals over sqrt(N); it covers both the data
      and the one-sample Monte Carlo noise of each bound); per-term means ``prior_bpd``
      (L_T), ``decoder_bpd`` (L_0), ``vb`` (T,) (L_t), ``xstart_mse`` (T,), ``mse`` (T,);
      and ``num_examples`` (int).

    Raises:
      ValueError: an empty iterable, a mapping without ``field``, or (from
        `calc_bpd_loop`) bad names or shapes.
    """
    totals, sums, count = [], None, 0
    for index, batch in enumerate(batches):
        if field is not None or not hasattr(batch, "shape"):
            if field is None or field not in batch:
                raise ValueError(
                    f"Batch {index} is not an array; pass `field`, the key of the data in "
                    f"each batch (got field={field!r})."
                )
            batch = batch[field]
        out = calc_bpd_loop(
            schedule, model_fn, batch, key=jax.random.fold_in(key, index),
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
            decoder_type=decoder_type,
        )
        totals.append(out["total_bpd"])
        batch_sums = {
            name: jnp.sum(out[name], axis=0)
            for name in ("prior_bpd", "vb", "xstart_mse", "mse")
        }
        sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
        count += out["total_bpd"].shape[0]
    if count == 0:
        raise ValueError("bpd_over_dataset got no batches (an empty iterable).")
    total = np.concatenate([np.asarray(t, np.float64) for t in totals])
    means = {name: np.asarray(value, np.float64) / count for name, value in sums.items()}
    stderr = float(np.std(total, ddof=1) / np.sqrt(count)) if count > 1 else float("nan")
    return {
        "total_bpd": float(total.mean()),
        "total_bpd_stderr": stderr,
        "prior_bpd": float(means["prior_bpd"]),
        "decoder_bpd": float(means["vb"][0]),
        "vb": means["vb"],
        "xstart_mse": means["xstart_mse"],
        "mse": means["mse"],
        "num_examples": count,
    }


def importance_weighted_log_likelihood(
    schedule: Schedule,
    model_fn: Callable,
    x_start,
    *,
    key,
    num_samples: int,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    decoder_type: str = "discretized",
) -> dict:
    """Importance-weighted estimate of log p(x_0) (Sohl-Dickstein et al. 2015, Eq. 9).

    p(x_0) = E_{q(x_{1:T} | x_0)}[w], w = p(x_T) prod_t p(x_{t-1} | x_t) / q(x_t | x_{t-1})
    (the annealed-importance-sampling view of the paper's Sec. 2.4). For each example,
    K forward trajectories are drawn step by step, x_t = sqrt(1 - beta_t) x_{t-1} +
    sqrt(beta_t) eps (DDPM's 1-based t), and with log w_k = log p(x_T) +
    sum_t [log p(x_{t-1} | x_t) - log q(x_t | x_{t-1})] (nats):

    - the IW estimate logsumexp_k(log w_k) - log K (Burda et al. 2016), a lower bound on
      log p(x_0) whose expectation increases with K towards log p(x_0);
    - the ELBO mean_k(log w_k) from the same trajectories (the bound of Eq. 11 before the
      KLs are taken in closed form: same expectation as `calc_bpd_loop`'s total, noisier).

    p(x_{t-1} | x_t) is `gaussian.p_mean_variance`'s Gaussian for t > 1 and the decoder
    for t = 1: ``discretized`` (8-bit bins: log p is a log probability mass, x_0 must
    hold 8-bit values in [-1, 1]) or ``gaussian`` (a density), as in `losses.vb_terms_bpd`;
    both estimates use the same decoder. Step t (0-based) draws its forward noise with
    ``fold_in(key, t)``. One ``lax.scan`` over t, the K samples batched with the B
    examples (the model sees batches of K * B; memory K * B * dims).

    Args:
      x_start: x_0, shape (B, ..., C).
      num_samples: K >= 1.
      Others: as `calc_bpd_loop`.

    Returns:
      dict: ``iw_bpd`` (B,) and ``elbo_bpd`` (B,), negative log-likelihoods in bits/dim
      (-estimate / (D ln 2), D = dims per example; iw_bpd <= elbo_bpd for every example);
      ``log_weights`` (K, B), log w in nats per example.
    """
    check_choice("mean_type", mean_type, MEAN_TYPES)
    check_choice("var_type", var_type, VAR_TYPES)
    check_choice("decoder_type", decoder_type, losses.DECODER_TYPES)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int; got {num_samples!r}.")
    if key is None:
        raise ValueError("importance_weighted_log_likelihood needs `key` (a PRNG key).")
    x_start = jnp.asarray(x_start)
    if x_start.ndim < 2:
        raise ValueError(f"x_start must have shape (B, ..., C); got {x_start.shape}.")
    log_weights = _importance_log_weights(
        schedule, as_model_fn(model_fn), x_start, key, num_samples=num_samples,
        mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        decoder_type=decoder_type,
    )
    nats_to_bpd = -1.0 / (math.prod(x_start.shape[1:]) * math.log(2.0))
    iw = jax.nn.logsumexp(log_weights, axis=0) - math.log(num_samples)
    return {
        "iw_bpd": iw * nats_to_bpd,
        "elbo_bpd": jnp.mean(log_weights, axis=0) * nats_to_bpd,
        "log_weights": log_weights,
    }


def _sum_flat(x):
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


@partial(
    jax.jit,
    static_argnames=("num_samples", "mean_type", "var_type", "clip_denoised", "decoder_type"),
)
def _importance_log_weights(
    schedule, model_fn, x_start, key, *, num_samples, mean_type, var_type, clip_denoised,
    decoder_type,
):
    batch, example_shape = x_start.shape[0], x_start.shape[1:]
    shape = (num_samples * batch,) + example_shape
    # Row k * B + b holds sample k of example b.
    x0 = jnp.broadcast_to(x_start[None], (num_samples,) + x_start.shape).reshape(shape)
    log_two_pi = math.log(2.0 * math.pi)

    def step(carry, t_scalar):
        x_prev, log_w = carry
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), shape, x0.dtype)
        beta = schedule.betas[t_scalar]
        x_t = jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * noise
        # log q(x_t | x_{t-1}) from the noise itself: no cancellation of x_t - mean.
        log_q = -0.5 * _sum_flat(log_two_pi + jnp.log(beta) + jnp.square(noise))
        t = jnp.full((shape[0],), t_scalar, dtype=jnp.int32)
        out = gaussian.p_mean_variance(
            schedule, model_fn(x_t, t), x_t, t,
            mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised,
        )
        log_scales = 0.5 * out.log_variance
        log_p = _sum_flat(
            losses.gaussian_log_likelihood(x_prev, means=out.mean, log_scales=log_scales)
        )
        if decoder_type == "discretized":
            log_decoder = _sum_flat(
                losses.discretized_gaussian_log_likelihood(
                    x_prev, means=out.mean, log_scales=log_scales
                )
            )
            log_p = jnp.where(t_scalar == 0, log_decoder, log_p)
        return (x_t, log_w + (log_p - log_q)), None

    steps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    init = (x0, jnp.zeros((shape[0],), x0.dtype))
    (x_T, log_w), _ = jax.lax.scan(step, init, steps)
    log_prior = _sum_flat(losses.gaussian_log_likelihood(
        x_T, means=jnp.zeros_like(x_T), log_scales=jnp.zeros_like(x_T)
    ))
    return (log_w + log_prior).reshape((num_samples, batch))


# ------------------------------------------------------------------------------------------
# The probability-flow ODE likelihood (Song et al. 2021, Appendix D.2; Chen et al. 2018).
# ------------------------------------------------------------------------------------------

DIVERGENCES = ("exact", "hutchinson")


def _ode_drift(sde, score_fn, state, time, *, divergence):
    """d/d(time) (x, log-density change) for ONE example: (f~, div f~).

    For a `DDPMVPSDE` the integration variable is r = -log alpha^2 = int beta dt instead of
    t: dx/dr = -(x + score) / 2 (the VP flow divided by beta(t)), smooth in r although
    beta(t) jumps at each of the N grid times (an adaptive solver's error estimate does
    not see such jumps; in t its result was off by O(1/N)).
    """
    x, _, probe = state
    if isinstance(sde, sde_lib.DDPMVPSDE):
        t = jnp.full((1,), sde.time_of_noise_level(time), jnp.float32)

        def drift(x_batch):
            return -0.5 * (x_batch + score_fn(x_batch, t))
    else:
        t = jnp.full((1,), time, jnp.float32)
        rsde = sde.reverse(score_fn, probability_flow=True)

        def drift(x_batch):
            return rsde.sde(x_batch, t)[0]

    x_batch = x[None]
    if divergence == "exact":
        div = ode.divergence_exact(drift, x_batch)
    else:
        div = ode.divergence_hutchinson(drift, x_batch, probe[:, None])
    return drift(x_batch)[0], div[0], jnp.zeros_like(probe)


_ODE_DRIFTS = {d: partial(_ode_drift, divergence=d) for d in DIVERGENCES}  # stable objects


def ode_likelihood(
    sde,
    score_fn: Callable,
    x,
    *,
    divergence: str = "exact",
    key=None,
    probes=None,
    probe: str = "rademacher",
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    eps: float = 1e-5,
) -> dict:
    """log p_eps(x) of the probability-flow ODE by the instantaneous change of variables.

    d log p(x(t)) / dt = -div f~(x(t), t) with f~ = f - g^2 score / 2 (Song et al. 2021,
    Eq. 13 and Appendix D.2; Chen et al. 2018, Thm. 1), integrated with (x, .) from eps to
    T by `ode.solve_ode`: log p_eps(x) = log p_T(x(T)) + int_eps^T div f~ dt. Each example
    is solved on its own (``vmap``: its own steps and NFE; values independent of the
    batch it is in); the batch of the model call is the whole batch. Jitted: a batch
    sharded over a mesh's data axis is computed data-parallel. The value is the density
    of the model's ODE flow, not a bound (the flow's density equals the data model's only
    for the exact score).

    Args:
      sde: a forward SDE; score_fn: ``score_fn(x, t)`` (t of shape (B,)), a `Partial`.
      x: data, shape (B, ...).
      divergence: ``'exact'`` (D VJPs per evaluation) or ``'hutchinson'`` (one probe per
        example, held fixed along the solve as score_sde does).
      key / probes: the probes for Hutchinson: drawn from ``key`` (``probe`` kind), or given
        with shape x.shape or (P, *x.shape) (P probes averaged) so results replay.
      solver, rtol, atol, max_steps: `ode.solve_ode`'s; the budget, when exhausted, raises
        `ode.ODEBudgetExhaustedError`.
      eps: the start time (score_sde: 1e-5).

    Returns:
      dict: ``logp`` (B,) nats per example; ``prior_logp`` (B,); ``delta_logp`` (B,) the
      integral; ``z`` (B, ...) = x(T); ``nfe`` (B,) evaluations of the model per example;
      under an outer ``jit`` also ``success`` (B,) (no error can be raised there).
    """
    check_choice("divergence", divergence, DIVERGENCES)
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (B, ...); got {x.shape}.")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T = {sde.T}); got {eps}.")
    probes = _ode_probes(x, divergence, key, probes, probe)
    if solver not in ode.ADAPTIVE_SOLVERS:
        raise ValueError(f"ode_likelihood needs an adaptive solver {ode.ADAPTIVE_SOLVERS}; "
                         f"got {solver!r}.")
    for name, value in (("rtol", rtol), ("atol", atol)):
        ode._check_tolerance(name, value)
    score_fn = as_model_fn(score_fn)
    out = _ode_likelihood(sde, score_fn, x, probes, divergence=divergence, solver=solver,
                          rtol=float(rtol), atol=float(atol), max_steps=int(max_steps),
                          eps=float(eps))
    if not isinstance(out["success"], jax.core.Tracer):
        ode.raise_if_exhausted(out.pop("success"), max_steps)
    return out


def _ode_probes(x, divergence, key, probes, probe):
    if divergence == "exact":
        return jnp.zeros((x.shape[0], 1) + x.shape[1:], x.dtype)  # unused
    if (key is None) == (probes is None):
        raise ValueError("divergence 'hutchinson' needs exactly one of `key` and `probes`.")
    if probes is None:
        probes = ode.draw_probes(key, x.shape, probe, x.dtype)
    probes = jnp.asarray(probes)
    if probes.shape == x.shape:
        probes = probes[None]
    if probes.shape[1:] != x.shape:
        raise ValueError(
            f"probes must have shape x.shape = {x.shape} or (P, *x.shape); got {probes.shape}."
        )
    return jnp.moveaxis(probes, 0, 1)  # (B, P, ...)


@partial(jax.jit, static_argnames=("divergence", "solver", "rtol", "atol", "max_steps", "eps"))
def _ode_likelihood(sde, score_fn, x, probes, *, divergence, solver, rtol, atol, max_steps, eps):
    drift = Partial(_ODE_DRIFTS[divergence], sde, score_fn)

    t0, t1 = jnp.float32(eps), jnp.float32(sde.T)
    if isinstance(sde, sde_lib.DDPMVPSDE):  # integrate in r = -log alpha^2 (see _ode_drift)
        t0, t1 = sde.noise_level(t0), sde.noise_level(t1)

    def solve_one(x_one, probe_one):
        state = (x_one, jnp.zeros((), x.dtype), probe_one)
        return ode._solve(drift, state, t0, t1, solver=solver,
                          num_steps=None, rtol=rtol, atol=atol, max_steps=max_steps)

    out = jax.vmap(solve_one)(x, probes)
    z, delta_logp, _ = out["y"]
    prior_logp = sde.prior_logp(z)
    per_eval = 1  # one model evaluation per drift evaluation (the VJPs reuse it)
    return {
        "logp": prior_logp + delta_logp,
        "prior_logp": prior_logp,
        "delta_logp": delta_logp,
        "z": z,
        "nfe": out["nfe"] * per_eval,
        "success": out["success"],
    }


def dequantize(images, u):
    """Uniform dequantization of 8-bit images in [-1, 1]: 2 (k + u) / 256 - 1, k in 0..255.

    score_sde's (x 255 + u) / 256 on [0, 1] data, then scaled to [-1, 1].
    """
    k = jnp.round((images + 1.0) * 127.5)
    return 2.0 * (k + u) / 256.0 - 1.0


def check_images(images) -> None:
    """Raises ValueError unless concrete ``images`` lie in [-1, 1] (8-bit data scaled)."""
    if isinstance(images, jax.core.Tracer):
        return
    values = np.asarray(images)
    if values.size and (values.min() < -1.0 or values.max() > 1.0 or not np.isfinite(values).all()):
        raise ValueError(
            f"The bits/dim path needs 8-bit images scaled to [-1, 1]; got values in "
            f"[{values.min()}, {values.max()}]."
        )


def ode_bpd(sde, score_fn: Callable, images, *, key, num_dequant: int = 1, **kwargs) -> dict:
    """Bits/dim of 8-bit images under the probability-flow ODE with uniform dequantization.

    For each of K draws u ~ U[0, 1)^D: bpd_k = -log p(dequantize(x, u)) / (D ln 2) + 7, the
    offset of score_sde for data scaled to [-1, 1] (7 = log2(256 / 2): 256 bins over an
    interval of width 2). ``bpd`` is the mean over the K draws (score_sde's estimate: a
    bound on the discrete model's bits/dim given the ODE density, E_u[-log p(x + u)]);
    ``bpd_iw`` is -log mean_k p, the tighter importance-weighted dequantization estimate.
    Draw k uses ``fold_in(key, k)`` for u and the Hutchinson probes.

    Args:
      images: (B, H, W, C) in [-1, 1] holding 8-bit values.
      num_dequant: K >= 1.
      kwargs: `ode_likelihood`'s (divergence, solver, rtol, atol, max_steps, eps, probe).

    Returns:
      dict: ``bpd`` (B,), ``bpd_iw`` (B,), ``bpd_draws`` (K, B), ``nfe`` (K, B).
    """
    if isinstance(num_dequant, bool) or not isinstance(num_dequant, int) or num_dequant < 1:
        raise ValueError(f"num_dequant must be a positive int; got {num_dequant!r}.")
    if "probes" in kwargs:
        raise ValueError("ode_bpd draws its probes from `key`; do not pass `probes`.")
    images = jnp.asarray(images)
    check_images(images)
    dims = math.prod(images.shape[1:])
    draws, nfes = [], []
    for k in range(num_dequant):
        u_key, probe_key = jax.random.split(jax.random.fold_in(key, k))
        x = dequantize(images, jax.random.uniform(u_key, images.shape, images.dtype))
        hutch = kwargs.get("divergence", "exact") == "hutchinson"
        out = ode_likelihood(sde, score_fn, x, key=probe_key if hutch else None, **kwargs)
        bpd = -out["logp"] / (dims * math.log(2.0)) + 7.0
        # Under jit an exhausted budget cannot raise: its value becomes NaN, not a partial one.
        draws.append(jnp.where(out.get("success", True), bpd, jnp.nan))
        nfes.append(out["nfe"])
    draws = jnp.stack(draws)
    log_mean_p = jax.nn.logsumexp(-draws * dims * math.log(2.0), axis=0) - math.log(num_dequant)
    return {
        "bpd": jnp.mean(draws, axis=0),
        "bpd_iw": -log_mean_p / (dims * math.log(2.0)),
        "bpd_draws": draws,
        "nfe": jnp.stack(nfes),
    }
