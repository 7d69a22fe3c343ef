"""The output directory of a run: resolved once, checked writable, and held by one run.

Every entry point (``launch.py`` in each mode, the experiment scripts) passes the
directory it was given through `resolve_workdir` before anything else sees it, so that
Orbax, TensorStore and the writers only ever see an absolute local path (TensorStore
refuses relative ones, and in Orbax's background thread that refusal is easy to miss).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import logging
import os
import socket

from etils import epath

__all__ = ["WorkdirInUseError", "is_remote", "lock_workdir", "prepare_workdir",
           "resolve_workdir"]

# Remote schemes epath reads through fsspec, and the package each needs.
_REMOTE_PACKAGES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", None)}


class WorkdirInUseError(ValueError):
    """Another live process is running in the same workdir."""


def is_remote(path) -> bool:
    return "://" in str(path)


def resolve_workdir(workdir) -> str:
    """The absolute form of a local ``workdir`` (``~`` expanded, relative paths taken from
    the current directory); a remote one (``gs://...``) unchanged.

    Raises:
      ValueError: an empty workdir, or a remote scheme whose filesystem package is missing
        (the message names the package and the extra that installs it).
    """
    text = os.fspath(workdir) if not isinstance(workdir, str) else workdir
    if not text or not text.strip():
        raise ValueError("--workdir is empty; pass the directory for checkpoints and logs.")
    if is_remote(text):
        scheme = text.split("://", 1)[0]
        package, extra = _REMOTE_PACKAGES.get(scheme, (None, None))
        if package and importlib.util.find_spec(package) is None:
            how = f'pip install -e ".[{extra}]"' if extra else f"pip install {package}"
            raise ValueError(
                f"--workdir={text} is on {scheme}://, which needs the {package!r} package "
                f"(not installed). Install it with `{how}`, or pass a local --workdir."
            )
        return text
    resolved = os.path.abspath(os.path.expanduser(text))
    if resolved != text:
        logging.info("Workdir %r resolved to %s.", text, resolved)
    return resolved


def prepare_workdir(workdir, *, process_index: int = 0) -> epath.Path:
    """Resolves ``workdir``, creates it and checks that it can be written to.

    Raises:
      ValueError: the directory cannot be created or written.
    """
    path = epath.Path(resolve_workdir(workdir))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{process_index}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"The workdir {str(path)!r} is not writable ({type(e).__name__}: {e}). Pass a "
            "--workdir this user can create and write to."
        ) from e
    return path


@contextlib.contextmanager
def lock_workdir(workdir: epath.Path, *, enabled: bool = True):
    """Holds ``workdir/.lock`` for the duration of a training run.

    The lock is an advisory ``flock`` on a local file, released by the kernel when the
    holder exits in any way (a killed process leaves no stale lock). The file names the
    holder (host and pid) so that a refused run can say who holds it. Remote workdirs
    (``gs://``) cannot be locked this way and are not locked (logged).

    Raises:
      WorkdirInUseError: another live process holds the lock.
    """
    if not enabled:
        yield
        return
    if is_remote(workdir):
        logging.warning("The workdir %s is remote and cannot be locked: make sure no other "
                        "run uses it.", workdir)
        yield
        return
    path = os.path.join(os.fspath(workdir), ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirInUseError(
                f"The workdir {workdir} is in use by another run ({holder}). Two runs in one "
                "workdir would overwrite each other's checkpoints. Wait for it to finish, "
                "stop it, or pass another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
