"""Stopping a run cleanly: SIGTERM (a preemption notice) and Ctrl-C (SIGINT).

On several processes, JAX's coordination service carries the notice: its preemption
notifier catches SIGTERM on any process and the processes agree, in the background, on
the step at which all of them save (`multihost_utils.reached_preemption_sync_point`, a
local read at each step: no collective in the training loop). On one process a Python
handler records the signal.
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

__all__ = ["Interrupted", "StopSignals", "record_early_signals"]

_early: list[str] = []  # signals received before the training loop's handlers existed


def record_early_signals() -> None:
    """Records SIGTERM from the start of a training program (flag parsing, connecting to
    other processes, building the model) until `StopSignals` takes over, so that a
    preemption notice during setup still ends the run cleanly, with exit status 0. (On
    several processes `jax.distributed.initialize` then installs JAX's notifier.)"""
    def handler(signum, frame):
        logging.warning("SIGTERM received during setup: stopping before the first step.")
        _early.append("SIGTERM")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


class Interrupted(Exception):
    """Training was interrupted with Ctrl-C; the current step was saved."""


def _sync_manager_available() -> bool:
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class StopSignals:
    """Context manager recording SIGTERM and SIGINT for the training loop.

    - SIGTERM: with a distributed runtime, JAX's preemption notifier (installed by
      `jax.distributed.initialize`) is left in place and consulted; otherwise a handler
      records it. The loop then saves the agreed step and exits normally.
    - SIGINT (one process): the first Ctrl-C asks the loop to save the current step and
      stop with `Interrupted`; a second one raises KeyboardInterrupt at once. With several
      processes Ctrl-C keeps its default (immediate) behaviour: the others could not agree
      on a step in time.
    """

    def __init__(self):
        self._previous: dict[int, object] = {}
        self._use_sync_point = _sync_manager_available()
        self.reason: str | None = _early[0] if _early and not self._use_sync_point else None

    def __enter__(self):
        if not self._use_sync_point:
            self._install(signal.SIGTERM, self._on_sigterm)
            self._install(signal.SIGINT, self._on_sigint)
        return self

    def _install(self, signum, handler):
        try:
            self._previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.reason = self.reason or "SIGTERM"

    def _on_sigint(self, signum, frame):
        if self.reason == "SIGINT":
            raise KeyboardInterrupt
        logging.warning("Ctrl-C: saving a checkpoint of the current step, then stopping "
                        "(press Ctrl-C again to stop at once, without saving).")
        self.reason = "SIGINT"

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def requested(self, step: int) -> str | None:
        """'SIGTERM' or 'SIGINT' when the loop should save ``step`` and stop, else None.

        Called after every step with the number of steps done; on several processes every
        process must call it at every step (it returns 'SIGTERM' on all of them at the
        same step).
        """
        if self._use_sync_point:
            return "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
        return self.reason
