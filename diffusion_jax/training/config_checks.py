"""The valid range of every numeric config field, checked before anything runs.

`check_ranges` is called by `setup.validate_config`; a value outside its range is a
ValueError naming the field, the value and the valid range. (Names are checked against
their valid choices in `setup`; ``data.*`` fields by the data pipeline.)
"""

from __future__ import annotations

import math

import ml_collections

__all__ = ["check_ranges"]


def _int(lo: int | None = None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return False
        return lo is None or v >= lo
    return check, f"an int >= {lo}" if lo is not None else "an int"


def _number(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))
    left = "" if lo is None else ("(" if lo_open else "[") + f"{lo}"
    right = "" if hi is None else f"{hi}" + (")" if hi_open else "]")
    if lo is not None and hi is not None:
        text = f"a number in {left}, {right}"
    elif lo is not None:
        text = f"a number {'>' if lo_open else '>='} {lo}"
    else:
        text = "a finite number"
    return check, text


def _ints(lo: int):
    def check(v):
        return isinstance(v, (tuple, list)) and len(v) > 0 and all(
            not isinstance(x, bool) and isinstance(x, int) and x >= lo for x in v)
    return check, f"a non-empty tuple of ints >= {lo}"


def _ints_or_empty(lo: int):
    def check(v):
        return isinstance(v, (tuple, list)) and all(
            not isinstance(x, bool) and isinstance(x, int) and x >= lo for x in v)
    return check, f"a tuple of ints >= {lo} (may be empty)"


RANGES = {
    "seed": _int(0),
    "model.ch": _int(1),
    "model.ch_mult": _ints(1),
    "model.num_res_blocks": _int(1),
    "model.attn_resolutions": _ints_or_empty(1),
    "model.dropout": _number(0.0, 1.0, hi_open=True),
    "model.features": _ints(1),
    "optim.lr": _number(0.0, lo_open=True),
    "optim.warmup_steps": _int(0),
    "optim.grad_clip": _number(),  # <= 0 disables clipping
    "optim.beta1": _number(0.0, 1.0, hi_open=True),
    "optim.beta2": _number(0.0, 1.0, hi_open=True),
    "optim.eps": _number(0.0, lo_open=True),
    "optim.weight_decay": _number(0.0),
    "train.sample_every": _int(0),
    "sample.batch_size": _int(1),
    "sample.grid_upscale": _int(1),
    "eval.num_examples": _int(1),
    "eval.batch_size": _int(1),
    "eval.iw_samples": _int(0),
}


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for the first field outside its valid range (see `RANGES`)."""
    for name, (check, valid) in RANGES.items():
        node, present = config, True
        for part in name.split("."):
            if part not in node:
                present = False
                break
            node = node[part]
        if present and not check(node):
            raise ValueError(f"config.{name} must be {valid}; got {node!r}.")
