"""Orbax checkpoints of the train state: asynchronous saves, keep-N, safe restore.

A checkpoint is only ever restored into a state of the same parameter shapes; anything
else is refused with a message naming the first mismatching parameter, and nothing in
the checkpoint directory is changed.
"""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "IncompatibleCheckpointError"]


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in the workdir was written by a model of other shapes."""


def _path_str(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(path): tuple(leaf.shape) for path, leaf in leaves}


class Checkpointer:
    """Saves and restores `TrainState`s under ``directory`` (local or gs://)."""

    def __init__(self, directory, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        # The handler is named up front so a fresh manager can read existing metadata.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def check_compatible(self, step: int, template) -> None:
        """Raises IncompatibleCheckpointError if the saved params differ from ``template``'s."""
        saved = self._manager.item_metadata(step)
        saved_tree = getattr(saved, "tree", saved)
        saved_params = saved_tree["params"] if isinstance(saved_tree, dict) else saved_tree.params
        want, have = _shapes(template.params), _shapes(saved_params)
        where = f"{self.directory}/{step}"
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                raise IncompatibleCheckpointError(
                    f"The checkpoint {where} was written by a different model: parameter "
                    f"{name!r} has shape {have.get(name, 'absent')} there and "
                    f"{want.get(name, 'absent')} in this config. Use another --workdir, or the "
                    "config that wrote it. Nothing in the workdir was changed."
                )

    def restore(self, template, step: int | None = None):
        """Restores ``step`` (default: latest) with ``template``'s structure and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        self.check_compatible(step, template)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        logging.info("Restoring checkpoint %s/%d.", self.directory, step)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Starts an asynchronous save of ``state`` as ``step``; returns whether it saved."""
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
