"""Binomial diffusion for binary data (Sohl-Dickstein et al. 2015, Sec. 2, Table App.1).

The forward kernel flips each bit toward an independent Bernoulli(p) prior:

    q(x_t | x_{t-1}) = B(x_t; x_{t-1} (1 - beta_t) + p beta_t)            (Table App.1)

i.e. with probability 1 - beta_t a bit is kept and with probability beta_t it is redrawn
from Bernoulli(p). The paper's table uses p = 0.5; its heartbeat experiment uses the data's
mean activity. The kernel satisfies detailed balance with respect to pi = B(p), which
gives everything below in closed form:

- marginals  q(x_t = 1 | x_0) = abar_t x_0 + (1 - abar_t) p,   abar_t = prod_{s<=t}(1 - beta_s);
- posterior  q(x_{t-1} | x_t, x_0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x_0), a Bernoulli;
- the reverse kernel p(x_{t-1} | x_t) = B(x_{t-1}; f_b(x_t, t)) (Table App.1) with the
  learned rate f_b = sigmoid(z + logit(x_t (1 - beta_t) + p beta_t)): a network output
  z = 0 makes it the forward kernel run backwards, the exact reverse at equilibrium;
- the first reverse step fixed to q(x_1 | x_0) pi(x_0) / pi(x_1) (Appendix B.2), which by
  detailed balance is that same kernel, B(x_0; x_1 (1 - beta_1) + p beta_1);
- the bound K of Eq. 14 with Bernoulli KL terms and entropies, and L_null = log pi(x_0).

Conventions are those of `gaussian`: time is 0-based, so array index ``t`` holds the
paper's step t + 1 (``betas[t]`` is the rate of the kernel producing x at index t from
index t - 1; index -1 is the data x_0); ``t`` is an int array of shape (B,); data are
float arrays of 0s and 1s with shape (B, D); per-example coefficients are gathered and
broadcast from the left. The prior rate ``p`` is a scalar or a (D,) array of per-bit rates.

Units: every log-probability, KL and entropy is in nats; per-example values (shape (B,))
are summed over the D bits. Divide by ln 2 for bits per sequence.

The paper's binomial schedule (Sec. 2.4.1) erases a constant fraction 1/T of the original
signal per step: beta_t = 1 / (T - t + 1) (1-based t), so abar_t = 1 - t/T and beta_T = 1
(x_T is exactly B(p)). `binomial_schedule` builds it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlog1py, xlogy

from diffusion_jax.gaussian import extract

#: ln 2: divide nats by it for bits.
LN2 = math.log(2.0)

__all__ = [
    "LN2",
    "BinomialSchedule",
    "bernoulli_kl",
    "bernoulli_kl_logits",
    "binary_entropy",
    "binomial_schedule",
    "bound_estimate",
    "bound_k",
    "entropy_terms",
    "kl_terms",
    "null_log_likelihood",
    "p_sample",
    "p_sample_loop",
    "perturbed_reverse_logits",
    "perturbed_reverse_probs",
    "q_posterior_logits",
    "q_posterior_probs",
    "q_probs",
    "q_sample",
    "q_step_probs",
    "reverse_logits",
]


@flax.struct.dataclass
class BinomialSchedule:
    """Rates of a binomial diffusion and the coefficients derived from them; a pytree.

    Fields (1-D arrays of length T, indexed by the 0-based step t):

    - ``betas``: beta_t in (0, 1]; ``betas[T-1] = 1`` is allowed (x_T is then exactly
      B(p)).
    - ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])`` and ``one_minus_alphas_cumprod``
      (computed separately in float64, so it is accurate where abar is close to 1);
      ``alphas_cumprod_prev`` / ``one_minus_alphas_cumprod_prev``: the same one step
      earlier, with abar_{-1} = 1 (index -1 is the data).
    - ``prior_prob``: p, float32 of shape () or (D,), each in (0, 1).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    one_minus_alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    one_minus_alphas_cumprod_prev: jax.Array
    prior_prob: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps (a static Python int, also under jit)."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas, prior_prob=0.5) -> "BinomialSchedule":
        """Builds a schedule from rates of shape (T,) and the prior rate p.

        The coefficients are computed in float64 NumPy and stored as float32.

        Raises:
          ValueError: betas not 1-D, empty, or with a value outside (0, 1]; p not a scalar
            or 1-D, or with a value outside (0, 1).
        """
        betas64 = np.asarray(betas, dtype=np.float64)
        if betas64.ndim != 1 or betas64.shape[0] < 1:
            raise ValueError(f"betas must be 1-D and non-empty; got shape {betas64.shape}.")
        bad = ~(np.isfinite(betas64) & (betas64 > 0.0) & (betas64 <= 1.0))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"binomial betas must lie in (0, 1]; betas[{i}] = {float(betas64[i])!r}."
            )
        prior64 = np.asarray(prior_prob, dtype=np.float64)
        if prior64.ndim > 1 or not np.all((prior64 > 0.0) & (prior64 < 1.0)):
            raise ValueError(
                "prior_prob must be a scalar or a 1-D array of rates in (0, 1); got "
                f"{prior_prob!r}."
            )
        alphas_cumprod = np.cumprod(1.0 - betas64)
        # 1 - abar as a sum of the mass removed at each step: exact where abar is near 1.
        one_minus = 1.0 - alphas_cumprod
        small = alphas_cumprod > 0.5
        with np.errstate(divide="ignore"):  # log1p(-1) = -inf where beta = 1 is fine
            one_minus[small] = -np.expm1(np.cumsum(np.log1p(-betas64)))[small]
        as32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
        return cls(
            betas=as32(betas64),
            alphas_cumprod=as32(alphas_cumprod),
            one_minus_alphas_cumprod=as32(one_minus),
            alphas_cumprod_prev=as32(np.concatenate([[1.0], alphas_cumprod[:-1]])),
            one_minus_alphas_cumprod_prev=as32(np.concatenate([[0.0], one_minus[:-1]])),
            prior_prob=as32(prior64),
        )


def binomial_schedule(num_timesteps: int, prior_prob=0.5) -> BinomialSchedule:
    """The paper's binomial schedule (Sec. 2.4.1): beta_t = 1 / (T - t + 1), 1-based t.

    Each step erases a fraction 1/T of the original signal: abar_t = 1 - t/T, and the last
    step (beta_T = 1) leaves x_T ~ B(p) exactly. For 0-based index t, beta = 1 / (T - t).
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)):
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps!r}.")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int; got {num_timesteps}.")
    t = np.arange(num_timesteps, dtype=np.float64)
    return BinomialSchedule.from_betas(1.0 / (num_timesteps - t), prior_prob)


def _prior(schedule: BinomialSchedule, x) -> jax.Array:
    """p shaped to broadcast against x of shape (B, ..., D) without rank promotion."""
    p = schedule.prior_prob
    if p.ndim == 0:
        return p
    if jnp.shape(x)[-1] != p.shape[0]:
        raise ValueError(
            f"prior_prob has {p.shape[0]} per-bit rates but x has shape {jnp.shape(x)} "
            f"(last axis {jnp.shape(x)[-1]})."
        )
    return p.reshape((1,) * (jnp.ndim(x) - 1) + p.shape)


def _check_same_shape(name_a, a, name_b, b) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {name_a} {jnp.shape(a)} "
            f"and {name_b} {jnp.shape(b)}."
        )


def _log(x):
    # Probabilities here can be exactly 0 only where they multiply a 0 weight; the floor
    # keeps 0 * log 0 from becoming NaN in value and gradient.
    return jnp.log(jnp.maximum(x, 1e-30))


def q_probs(schedule: BinomialSchedule, x_start, t) -> jax.Array:
    """q(x_t = 1 | x_0) = abar_t x_0 + (1 - abar_t) p, elementwise, x_start's shape."""
    shape = jnp.shape(x_start)
    p = _prior(schedule, x_start)
    return (
        extract(schedule.alphas_cumprod, t, shape) * x_start
        + extract(schedule.one_minus_alphas_cumprod, t, shape) * p
    )


def q_sample(schedule: BinomialSchedule, x_start, t, *, key=None, noise=None) -> jax.Array:
    """Draws x_t ~ q(x_t | x_0) (float 0/1, x_start's shape).

    ``noise``: uniform [0, 1) draws of x_start's shape (x_t = noise < q_probs), or ``key``
    to draw them; exactly one of the two.
    """
    u = _uniform(x_start, noise=noise, key=key)
    return (u < q_probs(schedule, x_start, t)).astype(jnp.result_type(x_start))


def _uniform(x, *, noise, key) -> jax.Array:
    if (noise is None) == (key is None):
        raise ValueError("Pass exactly one of `noise` (uniform draws) and `key`.")
    if noise is None:
        return jax.random.uniform(key, jnp.shape(x), dtype=jnp.float32)
    _check_same_shape("x", x, "noise", noise)
    return noise


def q_step_probs(schedule: BinomialSchedule, x_prev, t) -> jax.Array:
    """The forward kernel's rate q(x_t = 1 | x_{t-1}) = x_{t-1}(1 - beta_t) + p beta_t.

    ``x_prev`` is x at index t - 1 (the data for t = 0). Table App.1.
    """
    beta = extract(schedule.betas, t, jnp.shape(x_prev))
    return x_prev * (1.0 - beta) + _prior(schedule, x_prev) * beta


def q_posterior_logits(schedule: BinomialSchedule, x_start, x_t, t) -> jax.Array:
    """logit q(x_{t-1} = 1 | x_t, x_0) for t >= 1 (Bayes' rule on the forward chain).

    With m = q(x_{t-1} = 1 | x_0) and a_b = q(x_t | x_{t-1} = b):
    logit = log a_1 + log m - log a_0 - log(1 - m). Every factor is formed from abar_{t-1}
    and 1 - abar_{t-1} separately, so no probability near 1 is subtracted from 1.

    At t = 0 (x_{t-1} is the data itself) the logit is +-inf (the posterior is x_0);
    use `q_posterior_probs` there.
    """
    _check_same_shape("x_start", x_start, "x_t", x_t)
    shape = jnp.shape(x_t)
    p = _prior(schedule, x_t)
    abar = extract(schedule.alphas_cumprod_prev, t, shape)
    one_minus_abar = extract(schedule.one_minus_alphas_cumprod_prev, t, shape)
    m1 = abar * x_start + one_minus_abar * p
    m0 = abar * (1.0 - x_start) + one_minus_abar * (1.0 - p)
    beta = extract(schedule.betas, t, shape)
    # q(x_t | x_{t-1} = 1) and q(x_t | x_{t-1} = 0), each for the observed x_t.
    a1 = x_t * (1.0 - beta * (1.0 - p)) + (1.0 - x_t) * beta * (1.0 - p)
    a0 = x_t * beta * p + (1.0 - x_t) * (1.0 - beta * p)
    return _log(a1) + _log(m1) - _log(a0) - _log(m0)


def q_posterior_probs(schedule: BinomialSchedule, x_start, x_t, t) -> jax.Array:
    """q(x_{t-1} = 1 | x_t, x_0), elementwise; equal to x_0 at t = 0."""
    probs = jax.nn.sigmoid(q_posterior_logits(schedule, x_start, x_t, t))
    at_data = jnp.reshape(jnp.asarray(t) == 0, (-1,) + (1,) * (jnp.ndim(x_t) - 1))
    return jnp.where(at_data, x_start, probs)


def reverse_logits(schedule: BinomialSchedule, model_output, x_t, t) -> jax.Array:
    """logit f_b(x_t, t): the learned reverse rate p(x_{t-1} = 1 | x_t) (Table App.1).

    f_b = sigmoid(z + logit(x_t (1 - beta_t) + p beta_t)), z = ``model_output``: the
    network perturbs the forward kernel run backwards (which, by detailed balance, is the
    exact reverse kernel for data distributed as the prior). The offset plays the role of
    logit(beta_t) in the Gaussian kernel's Eq. 64 and makes z = 0 a sensible start.

    Args:
      model_output: z, x_t's shape (B, ..., D).
      x_t: 0/1 array (B, ..., D). t: int (B,).
    """
    _check_same_shape("model_output", model_output, "x_t", x_t)
    return model_output + _forward_reversal_logits(schedule, x_t, t)


def _forward_reversal_logits(schedule: BinomialSchedule, x_t, t) -> jax.Array:
    shape = jnp.shape(x_t)
    p = _prior(schedule, x_t)
    beta = extract(schedule.betas, t, shape)
    one = x_t * (1.0 - beta) + p * beta
    zero = (1.0 - x_t) * (1.0 - beta) + (1.0 - p) * beta
    return _log(one) - _log(zero)


def perturbed_reverse_probs(probs, r_probs) -> jax.Array:
    """The reverse rate multiplied by r(x) = prod_i r_i^{x_i} (1 - r_i)^{1 - x_i}.

    Table App.1 (binomial, perturbed reverse kernel): c r / (c r + (1 - c)(1 - r)) with
    c = f_b the reverse rate and r the multiplying distribution's rate for the same bit
    (Sec. 2.5: p~(x_{t-1} | x_t) proportional to p(x_{t-1} | x_t) r(x_{t-1})).
    Elementwise; the arguments broadcast (same rank).
    """
    num = probs * r_probs
    return num / (num + (1.0 - probs) * (1.0 - r_probs))


def perturbed_reverse_logits(logits, r_logits) -> jax.Array:
    """`perturbed_reverse_probs` in logit space: logit c + logit r (exact, stable)."""
    return logits + r_logits


def bernoulli_kl(probs1, probs2) -> jax.Array:
    """KL(B(probs1) || B(probs2)), elementwise, in nats.

    q log(q / p) + (1 - q) log((1 - q) / (1 - p)), with 0 log 0 = 0. Exactly 0 where the
    rates are equal; +inf where q puts mass where p has none.
    """
    q, p = probs1, probs2
    return xlogy(q, q) - xlogy(q, p) + xlog1py(1.0 - q, -q) - xlog1py(1.0 - q, -p)


def bernoulli_kl_logits(logits1, logits2) -> jax.Array:
    """KL(B(sigmoid(logits1)) || B(sigmoid(logits2))), elementwise, in nats.

    Written with log_sigmoid so rates close to 0 or 1 keep their precision:
    q (ls(l1) - ls(l2)) + (1 - q)(ls(-l1) - ls(-l2)), q = sigmoid(l1). Finite logits only.
    """
    q = jax.nn.sigmoid(logits1)
    ls = jax.nn.log_sigmoid
    return q * (ls(logits1) - ls(logits2)) + (1.0 - q) * (ls(-logits1) - ls(-logits2))


def binary_entropy(probs) -> jax.Array:
    """H(B(probs)) = -q log q - (1 - q) log(1 - q), elementwise, in nats (0 log 0 = 0)."""
    return -xlogy(probs, probs) - xlog1py(1.0 - probs, -probs)


def _sum_bits(x) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, jnp.ndim(x))))


def kl_terms(schedule: BinomialSchedule, model_output, x_start, x_t, t) -> jax.Array:
    """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) summed over bits: (B,) nats.

    One term of the sum in Eq. 14, for t >= 1 (the paper's t = 2..T); p's rate is
    `reverse_logits` of ``model_output``. At t = 0 the first step is fixed (Appendix B.2)
    and has no KL term; callers must not pass t = 0 (it returns 0 there).
    """
    q_logits = q_posterior_logits(schedule, x_start, x_t, t)
    p_logits = reverse_logits(schedule, model_output, x_t, t)
    kl = _sum_bits(bernoulli_kl_logits(q_logits, p_logits))
    return jnp.where(jnp.asarray(t) == 0, 0.0, kl)


def entropy_terms(schedule: BinomialSchedule, x_start) -> jax.Array:
    """H_q(X_T | X_0) - H_q(X_1 | X_0) - H_p(X_T) of Eq. 14 per example: (B,) nats.

    The conditional entropies are those of the Bernoulli marginals q(x_T | x_0) and
    q(x_1 | x_0) for this example's x_0, summed over bits; H_p(X_T) is the prior's entropy.
    """
    batch = jnp.shape(x_start)[0]
    last = jnp.full((batch,), schedule.num_timesteps - 1, jnp.int32)
    first = jnp.zeros((batch,), jnp.int32)
    h_end = _sum_bits(binary_entropy(q_probs(schedule, x_start, last)))
    h_start = _sum_bits(binary_entropy(q_probs(schedule, x_start, first)))
    h_prior = _sum_bits(jnp.broadcast_to(binary_entropy(_prior(schedule, x_start)), jnp.shape(x_start)))
    return h_end - h_start - h_prior


def null_log_likelihood(schedule: BinomialSchedule, x_start) -> jax.Array:
    """L_null: log pi(x_0) under the prior B(p), summed over bits: (B,) nats."""
    p = _prior(schedule, x_start)
    return _sum_bits(xlogy(x_start, p) + xlog1py(1.0 - x_start, -p))


def bound_estimate(
    schedule: BinomialSchedule, model_fn: Callable, x_start, *, key
) -> dict:
    """An unbiased one-step estimate of K (Eq. 14) per example, for training.

    Each example draws its own t uniform on [1, T) and x_t ~ q(x_t | x_0); then
    K_hat = -(T - 1) KL_t + entropy_terms. (The paper's code scales by T; T - 1 is the
    number of KL terms, t = 2..T.) Needs T >= 2.

    Args:
      model_fn: ``model_fn(x_t, t) -> z`` of x_t's shape, called once on the batch.
      x_start: 0/1 float array (B, D).

    Returns:
      dict of (B,) nats: ``k`` (the estimate), ``kl`` (KL_t, unscaled), ``entropy``.
    """
    num_timesteps = schedule.num_timesteps
    if num_timesteps < 2:
        raise ValueError("The bound K needs T >= 2 (the first step has no KL term).")
    t_key, x_key = jax.random.split(key)
    batch = jnp.shape(x_start)[0]
    t = jax.random.randint(t_key, (batch,), 1, num_timesteps, dtype=jnp.int32)
    x_t = q_sample(schedule, x_start, t, key=x_key)
    kl = kl_terms(schedule, model_fn(x_t, t), x_start, x_t, t)
    entropy = entropy_terms(schedule, x_start)
    return {"k": entropy - (num_timesteps - 1) * kl, "kl": kl, "entropy": entropy}


def bound_k(
    schedule: BinomialSchedule, model_fn: Callable, x_start, *, key, batched: bool = False
) -> dict:
    """K of Eq. 14 per example with every KL term t = 1..T-1.

    K = -sum_{t=2}^{T} KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) + H_q(X_T|X_0)
        - H_q(X_1|X_0) - H_p(X_T), each KL at one draw x_t ~ q(x_t | x_0) (an unbiased
    estimate). Step t draws from ``fold_in(key, t)`` either way, so both forms give the
    same numbers.

    Args:
      model_fn: ``model_fn(x_t, t) -> z``; a `jax.tree_util.Partial` lets new parameters
        reuse the compiled loop.
      x_start: 0/1 float array (B, D).
      batched: False: one ``lax.scan`` over t, the network called on B rows per step
        (memory of order B D; for evaluation). True: the network called once on all
        (T - 1) B rows, ordered step-major (row s B + b is step s + 1, example b): much
        faster for small networks and for training, memory of order T B D.

    Returns:
      dict: ``k`` (B,) nats, ``k_minus_null`` (B,) nats (K - log pi(x_0)),
      ``kl`` (T,) the batch mean of each KL term (0 at t = 0), ``entropy`` (B,).
    """
    if schedule.num_timesteps < 2:
        raise ValueError("The bound K needs T >= 2 (the first step has no KL term).")
    fn = _bound_k_batched if batched else _bound_k
    return fn(schedule, _as_partial(model_fn), jnp.asarray(x_start), key)


def _as_partial(fn):
    if isinstance(fn, jax.tree_util.Partial):
        return fn
    if not callable(fn):
        raise ValueError(f"model_fn must be callable as model_fn(x_t, t); got {fn!r}.")
    return jax.tree_util.Partial(fn)


def _bound_from_kl(schedule, x_start, kl_sum, kl_means):
    entropy = entropy_terms(schedule, x_start)
    k = entropy - kl_sum
    return {
        "k": k,
        "k_minus_null": k - null_log_likelihood(schedule, x_start),
        "kl": jnp.concatenate([jnp.zeros((1,), kl_means.dtype), kl_means]),
        "entropy": entropy,
    }


@jax.jit
def _bound_k(schedule, model_fn, x_start, key):
    batch = x_start.shape[0]

    def step(kl_sum, t_scalar):
        t = jnp.full((batch,), t_scalar, jnp.int32)
        x_t = q_sample(schedule, x_start, t, key=jax.random.fold_in(key, t_scalar))
        kl = kl_terms(schedule, model_fn(x_t, t), x_start, x_t, t)
        return kl_sum + kl, jnp.mean(kl)

    steps = jnp.arange(1, schedule.num_timesteps, dtype=jnp.int32)
    kl_sum, kl_means = jax.lax.scan(step, jnp.zeros((batch,), jnp.float32), steps)
    return _bound_from_kl(schedule, x_start, kl_sum, kl_means)


@jax.jit
def _bound_k_batched(schedule, model_fn, x_start, key):
    batch, rest = x_start.shape[0], x_start.shape[1:]
    steps = jnp.arange(1, schedule.num_timesteps, dtype=jnp.int32)
    num = steps.shape[0]
    u = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(key, s), x_start.shape))(steps)
    t = jnp.repeat(steps, batch)
    x0 = jnp.broadcast_to(x_start[None], (num,) + x_start.shape).reshape((num * batch,) + rest)
    x_t = q_sample(schedule, x0, t, noise=u.reshape((num * batch,) + rest))
    kl = kl_terms(schedule, model_fn(x_t, t), x0, x_t, t).reshape((num, batch))
    return _bound_from_kl(schedule, x_start, jnp.sum(kl, axis=0), jnp.mean(kl, axis=1))


def p_sample(
    schedule: BinomialSchedule, model_output, x_t, t, *, key=None, noise=None,
    r_logits=None,
) -> jax.Array:
    """One reverse step x_{t-1} ~ B(f_b(x_t, t)); at t = 0 the fixed first step.

    At t = 0 the kernel is q(x_1 | x_0) pi(x_0) / pi(x_1) = B(x_1 (1 - beta_1) + p beta_1)
    (Appendix B.2) and ``model_output`` is ignored there. ``r_logits`` (optional, x_t's
    shape or broadcastable with the same rank): logit r_i of a multiplying distribution
    r(x) = prod_i r_i^{x_i}(1 - r_i)^{1 - x_i}, applied to every step (Table App.1).
    ``noise``: uniform [0, 1) draws of x_t's shape, or ``key``.
    """
    logits = reverse_logits(schedule, model_output, x_t, t)
    first = _forward_reversal_logits(schedule, x_t, t)
    at_first = jnp.reshape(jnp.asarray(t) == 0, (-1,) + (1,) * (jnp.ndim(x_t) - 1))
    logits = jnp.where(at_first, first, logits)
    if r_logits is not None:
        logits = perturbed_reverse_logits(logits, r_logits)
    u = _uniform(x_t, noise=noise, key=key)
    return (u < jax.nn.sigmoid(logits)).astype(jnp.result_type(x_t))


def p_sample_loop(
    schedule: BinomialSchedule,
    model_fn: Callable,
    shape: Sequence[int],
    *,
    key,
    r_logits=None,
    save_steps: Sequence[int] = (),
) -> dict:
    """Ancestral sampling: x_T ~ B(p), then x_{t-1} ~ p(x_{t-1} | x_t) for t = T..1.

    One ``lax.scan`` under one ``jit``. Step t (0-based) draws from ``fold_in(key, t)``;
    x_T from ``fold_in(key, T)``.

    Args:
      model_fn: ``model_fn(x_t, t) -> z`` (x_t's shape); its output at t = 0 is unused.
      shape: (B, D).
      r_logits: optional multiplying distribution, see `p_sample`.
      save_steps: the paper's step numbers s in [0, T] of the chain states to return:
        s = T is the prior draw x^(T), s = 0 the sample x^(0), and s in between x^(s), the
        state at array index s - 1. Static.

    Returns:
      dict with ``sample`` (x_0, float 0/1 of ``shape``) and ``saved`` (len(save_steps),
      *shape) holding x^(s) for each requested s.
    """
    shape = tuple(int(s) for s in shape)
    num_timesteps = schedule.num_timesteps
    save_steps = tuple(int(s) for s in save_steps)
    for s in save_steps:
        if not 0 <= s <= num_timesteps:
            raise ValueError(f"save_steps must lie in [0, {num_timesteps}]; got {s}.")
    return _p_sample_loop(schedule, _as_partial(model_fn), key, r_logits, shape=shape,
                          save_steps=save_steps)


@partial(jax.jit, static_argnames=("shape", "save_steps"))
def _p_sample_loop(schedule, model_fn, key, r_logits, *, shape, save_steps):
    num_timesteps = schedule.num_timesteps
    p = jnp.broadcast_to(_prior(schedule, jnp.zeros(shape)), shape)
    x_T = (jax.random.uniform(jax.random.fold_in(key, num_timesteps), shape) < p)
    x_T = x_T.astype(jnp.float32)
    saves = jnp.array(save_steps, dtype=jnp.int32).reshape((-1,))
    saved0 = jnp.zeros((len(save_steps),) + shape, jnp.float32)
    expand = (-1,) + (1,) * len(shape)
    saved0 = jnp.where((saves == num_timesteps).reshape(expand), x_T[None], saved0)

    def step(carry, t_scalar):
        x_t, saved = carry
        t = jnp.full((shape[0],), t_scalar, jnp.int32)
        x_prev = p_sample(schedule, model_fn(x_t, t), x_t, t,
                          key=jax.random.fold_in(key, t_scalar), r_logits=r_logits)
        saved = jnp.where((saves == t_scalar).reshape(expand), x_prev[None], saved)
        return (x_prev, saved), None

    steps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
    (x_0, saved), _ = jax.lax.scan(step, (x_T, saved0), steps)
    return {"sample": x_0, "saved": saved}

