"""Orbax checkpoints of the train state: asynchronous saves, keep-N, safe restore.

A checkpoint is only ever restored into a state of the same parameter shapes; anything
else is refused with a message naming the first mismatching parameter, and nothing in
the checkpoint directory is changed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "CheckpointWriteError",
    "Checkpointer",
    "CheckpointReadError",
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


class CheckpointReadError(OSError):
    """A checkpoint could not be read for a reason outside it (permissions, a timeout or a
    lost connection to a remote filesystem, memory); it was retried, then left as it is."""


# Errors of the environment, not of the checkpoint: the same read may succeed later.
_TRANSIENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN, errno.ENOMEM,
                     errno.EIO, errno.ESTALE}
# TensorStore reports its errors as ValueError with an absl status code in the text.
_TRANSIENT_STATUSES = ("PERMISSION_DENIED", "DEADLINE_EXCEEDED", "UNAVAILABLE",
                       "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED", "UNAUTHENTICATED")


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is environmental: permission
    denied, a timeout or connection failure, out of memory. Anything else met while
    reading a checkpoint (a file that fails to decode, metadata missing or inconsistent)
    means the checkpoint is damaged."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (MemoryError, TimeoutError, ConnectionError, PermissionError)):
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        if any(status in str(error) for status in _TRANSIENT_STATUSES):
            return True
        error = error.__cause__ or error.__context__
    return False


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

    def __init__(self, directory, *, max_to_keep: int = 3, async_save: bool = True,
                 read_attempts: int = 3, retry_delay_s: float = 2.0):
        self.directory = epath.Path(directory)
        self.read_attempts, self.retry_delay_s = read_attempts, retry_delay_s
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
        """Raises IncompatibleCheckpointError if the saved train state differs from
        ``template``'s in structure or shapes: parameters first, then the rest (optimizer
        state, EMA, counters), naming what differs.

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
        want, have = _shapes(template), _shapes(saved_tree)
        differ = [n for n in sorted(set(want) | set(have)) if want.get(n) != have.get(n)]
        if differ:
            shown = "; ".join(f"{n!r}: {have.get(n, 'absent')} there, "
                              f"{want.get(n, 'absent')} here" for n in differ[:4])
            more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
            raise IncompatibleCheckpointError(
                f"The checkpoint {where} holds a train state of another structure than this "
                f"config's: {shown}{more}. The parameters match; a setting that changes "
                "the optimizer's state (optim.grad_clip on or off, optim.weight_decay on or "
                "off, ...) differs from the run that wrote it. Use the config that wrote it "
                "or another --workdir. Nothing in the workdir was changed."
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
                restored = self._read(candidate, template, abstract)
            except (IncompatibleCheckpointError, CheckpointReadError):
                raise
            except Exception as e:  # noqa: BLE001 - any other read failure means "damaged"
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

    def _read(self, step: int, template, abstract):
        """One checkpoint, retried ``read_attempts`` times on environmental errors.

        Raises:
          CheckpointReadError: the environment kept failing the read (nothing moved).
        """
        for attempt in range(1, self.read_attempts + 1):
            try:
                self.check_compatible(step, template)
                return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted by is_transient
                if not is_transient(e):
                    raise
                cause = " ".join(f"{type(e).__name__}: {e}".split())[:500]
                if attempt == self.read_attempts:
                    raise CheckpointReadError(
                        f"Could not read the checkpoint {self.directory}/{step} after "
                        f"{attempt} attempts ({cause}). This is an error of the environment "
                        "(permissions, a remote filesystem, memory), not of the checkpoint: "
                        "nothing was moved or changed. Fix it and run the same command again."
                    ) from e
                delay = self.retry_delay_s * 2 ** (attempt - 1)
                logging.warning("Reading checkpoint %s/%d failed (%s); retrying in %.0f s "
                                "(attempt %d of %d).", self.directory, step, cause, delay,
                                attempt, self.read_attempts)
                time.sleep(delay)
        raise AssertionError("unreachable")

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
