"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

Training: `drop_labels` replaces each label by the null class id ``num_classes`` with
probability ``p_uncond`` (the paper's p_uncond; Algorithm 1), so one network learns the
conditional eps(x, c) and the unconditional eps(x) = eps(x, null). The network must embed
num_classes + 1 classes (`models.UNet(null_class=True)`).

Sampling (Algorithm 2, Eq. 6): the guided output

  eps~ = (1 + w) eps(x, c) - w eps(x)        (convention ``'ho_salimans'``, scale w; w = 0
                                             is the plain conditional model)

or, in the other common convention (GLIDE, Stable Diffusion's ``guidance_scale``),

  eps~ = eps(x) + s (eps(x, c) - eps(x))     (convention ``'lerp'``, scale s = 1 + w).

`guided_model_fn` computes both outputs in ONE network call on the doubled batch
[x, x] with labels [c, null] and returns a ``model_fn(x, t)``: the library's one network
contract, so every sampler takes it (ancestral, DDIM, DPM-Solver++, the score-SDE and ODE
samplers, EDM's through `edm.denoiser_fn`, the flow ODE). The combination is applied to the
raw network output; every parameterisation here (eps, x0, v, score, velocity, EDM's F and
D) is affine in it at fixed (x, t), so guiding one guides them all alike. For a model that
also outputs variances (improved DDPM, 2C channels) pass ``guided_channels=C``: the
variance channels are then the conditional ones (as GLIDE).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from diffusion_jax.gaussian import check_choice

__all__ = [
    "CONVENTIONS",
    "check_labels",
    "drop_labels",
    "guidance_weight",
    "guided_model_fn",
    "guided_output",
]

CONVENTIONS = ("ho_salimans", "lerp")


def _check_scale(scale, convention):
    check_choice("guidance convention", convention, CONVENTIONS)
    if isinstance(scale, (jax.Array, np.ndarray)):
        if jnp.ndim(scale) != 0:
            raise ValueError(f"The guidance scale must be a scalar; got shape {jnp.shape(scale)}.")
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(scale):
        raise ValueError(f"The guidance scale must be a finite number; got {scale!r}.")


def guidance_weight(scale, convention: str = "ho_salimans"):
    """w of Ho & Salimans from a scale of the named convention (lerp: w = s - 1)."""
    _check_scale(scale, convention)
    return scale if convention == "ho_salimans" else scale - 1.0


def guided_output(cond, uncond, scale, *, convention: str = "ho_salimans"):
    """(1 + w) cond - w uncond (``'ho_salimans'``, scale w) or uncond + s (cond - uncond)
    (``'lerp'``, scale s); arrays of one shape."""
    _check_scale(scale, convention)
    if convention == "lerp":
        return uncond + scale * (cond - uncond)
    return (1.0 + scale) * cond - scale * uncond


def check_labels(labels, num_classes: int, *, allow_null: bool = False) -> None:
    """Raises ValueError unless concrete ``labels`` (int, shape (B,)) lie in [0, num_classes)
    (or equal the null id num_classes when ``allow_null``). Traced labels: the caller's duty."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    if jnp.ndim(labels) != 1 or not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(
            f"labels must be integers of shape (B,); got {jnp.result_type(labels)} of shape "
            f"{jnp.shape(labels)}."
        )
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    upper = num_classes + int(allow_null)
    if values.size and (values.min() < 0 or values.max() >= upper):
        raise ValueError(
            f"Class labels must lie in [0, num_classes) = [0, {num_classes})"
            + (f" or be the null id {num_classes}" if allow_null else "")
            + f"; got values in [{values.min()}, {values.max()}]."
        )


def drop_labels(key, labels, *, p_uncond: float, num_classes: int):
    """Each label replaced by the null id ``num_classes`` with probability ``p_uncond``
    (Ho & Salimans 2022, Algorithm 1, line 3), int32 (B,)."""
    if isinstance(p_uncond, bool) or not isinstance(p_uncond, (int, float)) or not (
        0.0 <= p_uncond < 1.0
    ):
        raise ValueError(
            f"p_uncond must lie in [0, 1) (the share of labels dropped in training; 0.1-0.2 "
            f"in the paper); got {p_uncond!r}."
        )
    check_labels(labels, num_classes)
    drop = jax.random.bernoulli(key, p_uncond, jnp.shape(labels))
    return jnp.where(drop, num_classes, labels).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Guided:
    """The guided call; its static settings compare by value, so a new `guided_model_fn`
    with the same settings reuses a compiled sampler."""

    num_classes: int
    convention: str
    guided_channels: int | None

    def __call__(self, cond_model_fn, labels, scale, x, t):
        batch = x.shape[0]
        null = jnp.full((batch,), self.num_classes, jnp.int32)
        both = cond_model_fn(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])
        )
        cond, uncond = both[:batch], both[batch:]
        c = self.guided_channels
        if c is None:
            return guided_output(cond, uncond, scale, convention=self.convention)
        mixed = guided_output(cond[..., :c], uncond[..., :c], scale, convention=self.convention)
        return jnp.concatenate([mixed, cond[..., c:]], axis=-1)


def _conditional(cond_model_fn, labels, x, t):
    return cond_model_fn(x, t, labels)


def guided_model_fn(
    cond_model_fn: Callable,
    labels,
    *,
    scale,
    num_classes: int | None,
    convention: str = "ho_salimans",
    guided_channels: int | None = None,
) -> Partial:
    """``model_fn(x, t)`` of the guided model (module docstring), a `Partial`.

    Args:
      cond_model_fn: ``cond_model_fn(x, t, y) -> output`` of a network that embeds the
        labels y in [0, num_classes] (num_classes = the null class).
      labels: int (B,) in [0, num_classes), the classes asked for.
      scale: w (``'ho_salimans'``) or s (``'lerp'``); a Python number or a traced scalar.
        A Python scale meaning w = 0 calls the network once, on the conditional batch only.
      num_classes: the number of real classes; None (an unconditional model) is refused.
      guided_channels: guide only the first C output channels (learned variances).
    """
    if num_classes is None:
        raise ValueError(
            "Classifier-free guidance needs a class-conditional model (model.num_classes set "
            "and a null class embedded); this model is unconditional."
        )
    check_labels(labels, num_classes)
    _check_scale(scale, convention)
    if not callable(cond_model_fn):
        raise ValueError(f"cond_model_fn must be callable as f(x, t, y); got {cond_model_fn!r}.")
    if not isinstance(cond_model_fn, Partial):
        cond_model_fn = Partial(cond_model_fn)
    labels = jnp.asarray(labels, jnp.int32)
    if not isinstance(scale, jax.core.Tracer) and guidance_weight(scale, convention) == 0:
        return Partial(_conditional, cond_model_fn, labels)
    return Partial(_Guided(num_classes, convention, guided_channels), cond_model_fn, labels,
                   jnp.float32(scale))
