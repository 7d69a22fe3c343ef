"""Orbax checkpoints of the train state: asynchronous saves, keep-N, safe restore.

A checkpoint is only ever restored into a state of the same parameter shapes; anything
else is refused with a message naming the first mismatching parameter, and nothing in
the checkpoint directory is changed.
"""

from __future__ import annotations

import contextlib
import errno
import logging

import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "CheckpointWriteError",
    "Checkpointer",
    "IncompatibleCheckpointError",
    "NoUsableCheckpointError",
]


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in the workdir was written by a model of other shapes."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); earlier ones are intact.

    ``errno`` is the cause's error number where the cause had one, else None.
    """

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


class NoUsableCheckpointError(FileNotFoundError):
    """Every checkpoint in the directory is damaged; none was changed."""


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
        self.damaged_steps: list[int] = []
        self._pending_step: int | None = None  # an asynchronous save not yet checked
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointWriteError(
                f"Could not write checkpoints under {self.directory}: it is a file, not a "
                "directory. Move it away or pass another --workdir.", errno.ENOTDIR,
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        # The handler is named up front so a fresh manager can read existing metadata.
        with self._write_errors(None):
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers=ocp.StandardCheckpointHandler(),
            )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def check_compatible(self, step: int, template) -> None:
        """Raises IncompatibleCheckpointError if the saved params differ from ``template``'s.

        A checkpoint whose metadata is missing is not judged here (its restore will tell).
        """
        saved = self._manager.item_metadata(step)
        saved_tree = getattr(saved, "tree", saved)
        if saved_tree is None:
            return
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
        """Restores ``step`` with ``template``'s structure and shardings.

        Without ``step``: the newest checkpoint that can be read. A damaged one (unreadable
        metadata or data) is reported in the log and skipped in favour of the next older
        one; it is not modified. Use `set_aside` to move damaged ones out of the way.

        Raises:
          FileNotFoundError: no checkpoint at all.
          IncompatibleCheckpointError: a readable checkpoint of other parameter shapes.
          NoUsableCheckpointError: checkpoints exist but none can be read.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        self.damaged_steps = []
        for candidate in steps:
            try:
                self.check_compatible(candidate, template)
                restored = self._manager.restore(
                    candidate, args=ocp.args.StandardRestore(abstract)
                )
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                logging.error(
                    "Checkpoint %s/%d cannot be read (%s: %s); it is left as it is and an "
                    "older checkpoint is tried.", self.directory, candidate, type(e).__name__,
                    str(e)[:300],
                )
                self.damaged_steps.append(candidate)
                continue
            if self.damaged_steps:
                logging.warning(
                    "Resuming from step %d: newer checkpoint(s) %s are damaged.", candidate,
                    self.damaged_steps,
                )
            return restored
        raise NoUsableCheckpointError(
            f"No usable checkpoint in {self.directory}: step(s) {self.damaged_steps} cannot be "
            "read (see the log for each error). Nothing was deleted or changed. Move them "
            "away (or use another --workdir) to start from scratch, or set "
            "train.restart_if_unreadable=True to set them aside and start over."
        )

    def set_aside(self, steps) -> list[epath.Path]:
        """Moves the given step directories to ``<directory>_damaged/`` (nothing is deleted),
        so new saves of those step numbers cannot collide with them. Process 0 moves; all
        processes then wait for each other."""
        moved = []
        if jax.process_index() == 0:
            target_root = self.directory.parent / f"{self.directory.name}_damaged"
            target_root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                source = self.directory / str(step)
                target = target_root / str(step)
                suffix = 0
                while target.exists():
                    suffix += 1
                    target = target_root / f"{step}.{suffix}"
                source.rename(target)
                logging.warning("Moved the damaged checkpoint %s to %s.", source, target)
                moved.append(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints set aside")
        self._manager.reload()
        return moved

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Starts an asynchronous save of ``state`` as ``step``; returns whether it saved.

        An earlier save still in flight is waited for first. Call `check` (cheap) or `wait`
        afterwards to learn whether this save was committed.

        Raises:
          CheckpointWriteError: this save, or the earlier asynchronous one, failed.
        """
        self.wait()
        with self._write_errors(step):
            saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        if saved:
            self._pending_step = step
        return saved

    @property
    def pending_step(self) -> int | None:
        """The step of an asynchronous save whose outcome has not been checked yet."""
        return self._pending_step

    def check(self) -> None:
        """Surfaces the failure of a finished asynchronous save without blocking (a save
        still in flight is left alone).

        Raises:
          CheckpointWriteError: the save failed in Orbax's background thread.
        """
        if self._pending_step is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is committed.

        Raises:
          CheckpointWriteError: it failed (naming its step, the cause and the last
            complete checkpoint).
        """
        step, self._pending_step = self._pending_step, None
        with self._write_errors(step):
            self._manager.wait_until_finished()

    def complete_steps(self, exclude=()) -> list[int]:
        """Steps with a committed checkpoint on disk (Orbax renames a step's temporary
        directory to the bare step number only once every file is written)."""
        try:
            names = [p.name for p in self.directory.iterdir()]
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit() and int(n) not in exclude)

    @contextlib.contextmanager
    def _write_errors(self, step):
        """Turns whatever the storage layer raised while writing (OSError, TensorStore's
        ValueError such as RESOURCE_EXHAUSTED, Orbax's own errors) into one
        CheckpointWriteError naming the step, the cause and the last intact checkpoint."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to write is a write failure
            good = self.complete_steps(exclude=() if step is None else (step,))
            cause = " ".join(f"{type(e).__name__}: {e}".split())
            if len(cause) > 500:
                cause = cause[:500] + " ..."
            what = f"checkpoint {step}" if step is not None else "a checkpoint"
            raise CheckpointWriteError(
                f"Could not write {what} under {self.directory} ({cause}). Free disk space "
                "or fix the permissions, then run the same command again: it resumes from "
                f"the last complete checkpoint ({max(good) if good else 'none yet'}), which "
                "is intact.",
                getattr(e, "errno", None),
            ) from e

    def close(self) -> None:
        """Releases Orbax's threads. Never raises: a failed pending save is logged (the
        training loop checks saves itself, with `check` and `wait`), so that closing
        always completes and the process can exit."""
        try:
            self.wait()
        except CheckpointWriteError as e:
            logging.error("%s", e)
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001 - already reported above; must not hang
            logging.error("Closing the checkpoint manager: %s: %s", type(e).__name__, e)
