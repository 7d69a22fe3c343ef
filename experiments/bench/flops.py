"""FLOP counts of a program, and the rates derived from them.

- `xla_flops`: XLA's cost analysis of a compiled program (every op, elementwise included;
  a loop body counts once, and a partitioned program is one device's share);
- `model_flops`: 2 x the multiply-adds of every convolution and matmul of a jaxpr, loops
  multiplied out, oneDNN's convolution passes (`diffusion_jax.models.onednn`) counted as
  XLA's convolutions are;
- `add_rates`: a case's images/s, FLOP/s and fractions of the matmul peak.
"""

from __future__ import annotations

import math

import jax

from diffusion_jax.models import onednn as onednn_lib

# FFI target name -> the convolution pass it computes ('forward', 'input_grad', ...).
ONEDNN_CONV_PASSES = {target: kind for kind, target in onednn_lib.FFI_TARGETS.items()}


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of ``compiled`` from XLA's cost analysis; None where it has none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def _subjaxprs(params: dict):
    for value in params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(sub, jax.extend.core.ClosedJaxpr):
                yield sub.jaxpr
            elif isinstance(sub, jax.extend.core.Jaxpr):
                yield sub


def onednn_pass_flops(kind: str, a, b, result) -> float | None:
    """2 x multiply-adds of one oneDNN convolution pass (`diffusion_jax.models.onednn`)
    from its operands' and result's shapes: every pass takes one multiply-add per element
    of the (B, OH, OW, O) output-shaped array and per kernel element of its output
    feature, as XLA's convolutions count. None when a shape is unknown."""
    out, kernel = {"forward": (result, b), "input_grad": (a, b),
                   "weight_grad": (b, result)}[kind]
    return 2.0 * math.prod(out) * math.prod(kernel[:3]) if out and kernel else None


def _onednn_conv_flops(eqn) -> float:
    """`onednn_pass_flops` of a jaxpr's FFI call."""
    shapes = [v.aval.shape for v in (*eqn.invars, eqn.outvars[0])]
    return onednn_pass_flops(ONEDNN_CONV_PASSES[eqn.params["target_name"]], *shapes)


def model_flops(jaxpr) -> float:
    """2 x multiply-adds of every convolution and dot in a jaxpr, loops multiplied out.

    A convolution's output element takes one multiply-add per kernel element of its output
    feature (padding included, as profilers count it); a dot's, one per contracted index.
    ``scan`` bodies count ``length`` times; ``cond`` counts its costliest branch; a
    ``while`` body (trip count unknown here) counts once.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / rhs.shape[
                out_feature_dim]
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            contracted = math.prod(lhs.shape[d] for d in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
        elif name == "ffi_call" and eqn.params.get("target_name") in ONEDNN_CONV_PASSES:
            total += _onednn_conv_flops(eqn)
        elif name == "cond":
            total += max(model_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            inner = sum(model_flops(sub) for sub in _subjaxprs(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def add_rates(case: dict, *, images: float, flops: float, extra: float, peak: float | None):
    """images/s; FLOP/s of our network and of DDPM's as written (``ddpm_flops``: ``extra``
    on top of ours, the convention of published figures); both as fractions of the matmul
    peak ``peak`` (FLOP/s). Reads ``step_s`` (and ``xla_flops`` where set) of ``case``."""
    seconds = case["step_s"]
    case["images_per_s"] = images / seconds
    case["model_flops"], case["ddpm_flops"] = flops, flops + extra
    case["model_flops_per_s"] = flops / seconds
    case["ddpm_flops_per_s"] = (flops + extra) / seconds
    if peak:
        case["fraction_of_peak"] = flops / seconds / peak
        case["ddpm_fraction_of_peak"] = (flops + extra) / seconds / peak
    if case.get("xla_flops") is not None:
        case["xla_flops_per_s"] = case["xla_flops"] / seconds
