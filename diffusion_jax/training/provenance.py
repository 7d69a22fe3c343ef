"""Which config trained which steps, and which config a result came from.

``config.json`` holds the config of the run that started the workdir. Every run that
trains at least one step adds a line to ``config_history.jsonl``:
``{"first_step": a, "last_step": b, "config": {...}, "config_sha256": h}``, the steps
a..b (1-based, inclusive) it trained and checkpointed, updated at each checkpoint. A
result line in ``metrics.jsonl`` (``--mode=eval``) and a sample file carry the
``config_sha256`` of the config that produced them.
"""

from __future__ import annotations

import hashlib
import json
import logging

import ml_collections
from etils import epath

__all__ = ["ConfigHistory", "MODEL_DEFINING_FIELDS", "config_sha256", "model_mismatches",
           "trained_config"]

HISTORY = "config_history.jsonl"

# Fields whose value changes what a checkpoint's parameters mean: sampling or evaluating
# with another value would silently use the wrong process.
MODEL_DEFINING_FIELDS = (
    "objective", "data.name", "data.image_size", "diffusion.schedule",
    "diffusion.num_timesteps", "diffusion.mean_type", "diffusion.var_type",
    "diffusion.decoder_type", "model",
    # The continuous-time objectives: the process and the network's output parameterisation.
    "sde.name", "sde.beta_min", "sde.beta_max", "sde.sigma_min", "sde.sigma_max",
    "sde.num_scales", "sde.parameterization", "edm.preconditioning", "edm.sigma_data",
    "flow.path", "flow.time_scale",
)
# Model fields that choose how the same function is computed, not which function.
_HOW_COMPUTED = {"cpu_kernels", "conv_impl", "conv_weight_grad", "dropout", "dropout_rng",
                 "dtype", "remat"}


def _to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_sha256(config) -> str:
    """First 16 hex digits of the SHA-256 of the config's canonical JSON."""
    text = json.dumps(_to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ConfigHistory:
    """Records, at each checkpoint, the steps this run has trained with its config."""

    def __init__(self, workdir, config: ml_collections.ConfigDict, start_step: int, *,
                 enabled: bool):
        self.enabled = enabled
        self.path = epath.Path(workdir) / HISTORY
        self.start_step = start_step
        self.entry = {"config_sha256": config_sha256(config), "config": _to_dict(config)}
        self._index = None
        if not enabled:
            return
        first = epath.Path(workdir) / "config.json"
        text = config.to_json_best_effort(indent=2, sort_keys=True)
        if not first.exists():
            first.write_text(text)
        elif first.read_text() != text:
            logging.warning("The config differs from the one in %s; the steps it trains are "
                            "recorded with it in %s.", first, self.path)

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def trained_to(self, last_step: int) -> None:
        """Records that this run's config trained steps start_step+1 .. last_step."""
        if not self.enabled or last_step <= self.start_step:
            return
        lines = self._lines()
        if self._index is None:
            self._index = len(lines)
            lines.append("")
        record = {"first_step": self.start_step + 1, "last_step": int(last_step),
                  **self.entry}
        lines[self._index] = json.dumps(record, sort_keys=True)
        tmp = self.path.parent / f"{HISTORY}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.path)


def trained_config(workdir, step: int) -> dict | None:
    """The config (a dict) that trained ``step`` of the run in ``workdir``: the history
    line covering it, else ``config.json``; None when neither exists."""
    workdir = epath.Path(workdir)
    path = workdir / HISTORY
    if path.exists():
        for line in reversed(path.read_text().splitlines()):
            record = json.loads(line)
            if record["first_step"] <= step <= record["last_step"]:
                return record["config"]
    first = workdir / "config.json"
    return json.loads(first.read_text()) if first.exists() else None


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def model_mismatches(config, trained: dict) -> list[str]:
    """``'field: trained value -> this value'`` for each model-defining field that differs
    (tuples and lists compare alike)."""
    mine = _to_dict(config)
    out = []
    for name in MODEL_DEFINING_FIELDS:
        a, b = _get(trained, name), _get(mine, name)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted((set(a) | set(b)) - _HOW_COMPUTED):
                if json.dumps(a.get(key)) != json.dumps(b.get(key)):
                    out.append(f"{name}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
        elif json.dumps(a) != json.dumps(b):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
