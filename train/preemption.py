"""Stopping a run cleanly when the machine is about to be taken (preemption) or the user asks.

TPU VMs, GKE and SLURM send SIGTERM some seconds to minutes before they take a machine; a user
presses Ctrl-C (SIGINT). Either way the trainer finishes the step in flight, saves a checkpoint
of that step, waits for the save, and exits with 128 + the signal's number (143 for SIGTERM,
130 for SIGINT), so that the same command resumes from that step.

- One process: a Python handler records the first signal; the loop asks `reached(step)` after
  every step.
- Several processes: every process must stop at the same step, whichever of them got the signal
  and whenever. SIGTERM is left to JAX's preemption service (the coordination service's notifier
  catches it and agrees on a step with every process); `reached(step)` is
  `multihost_utils.reached_preemption_sync_point(step)`, true on every process at that same
  step. A SIGINT is handed to the same service (the process sends itself SIGTERM).

A second signal while the checkpoint is being written changes nothing: the handler only notes
it. SIGKILL cannot be caught; asynchronous saves are atomic, so the previous checkpoint stays.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped at `step` on `signum`, with a checkpoint of that step in `directory`."""

    def __init__(self, step: int, signum: int, directory: str):
        self.step, self.signum, self.directory = step, signum, directory
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}: checkpoint of step {step} saved in {directory}; "
            "run the same command to resume"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Watcher:
    """Installs the handlers (on the main thread only) for the duration of a `with` block and
    answers `reached(step)`: whether the run must stop after `step`."""

    def __init__(self):
        self.signum: int | None = None
        self.multi = jax.process_count() > 1
        self._previous: dict = {}

    def __enter__(self) -> Watcher:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set on the main thread
        handled = (signal.SIGINT,) if self.multi else SIGNALS  # SIGTERM: JAX's service
        for s in handled:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signum is not None:
            print(
                f"{signal.Signals(signum).name} again: already stopping after this step's "
                "checkpoint",
                file=sys.stderr,
                flush=True,
            )
            return
        self.signum = signum
        print(
            f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint",
            file=sys.stderr,
            flush=True,
        )
        if self.multi:  # every process has to agree on the step: JAX's preemption service
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (call it after every step, on every process)."""
        if not self.multi:
            return self.signum is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False
