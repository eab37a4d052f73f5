"""A watchdog for hung steps. A multi-host run whose processes wait on each other (a collective
one process never joins, a stuck data read, a wedged device) is otherwise silent: the process
lives, nothing is logged. The watchdog is a thread that, when the step in progress has taken more
than `factor` times the median of the recent steps (after `warmup` steps), writes every thread's
Python stack of this process to stderr once per hung step, and leaves the run alone.

A "step" here is what the loop repeats every iteration: fetching the batch and the train step
(not compiling a new batch shape, evaluating or checkpointing, which legitimately take longer).
"""

from __future__ import annotations

import collections
import faulthandler
import statistics
import sys
import threading
import time


class Watchdog:
    def __init__(self, factor: float, *, warmup: int = 5, poll_s: float = 1.0, out=None):
        self.factor, self.warmup, self.poll_s = factor, warmup, poll_s
        self.out = out or sys.stderr
        self.recent: collections.deque[float] = collections.deque(maxlen=100)
        self._started: float | None = None
        self._paused = 0.0  # seconds of the step before pause()
        self._step = 0
        self._reported = -1  # the last step reported
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if self.factor > 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def begin(self, step: int) -> None:
        """Step `step` (1-based: the step being taken) starts now."""
        self._step, self._started = step, time.monotonic()

    def end(self) -> None:
        """The step begun last has finished."""
        if self._started is not None:
            self.recent.append(time.monotonic() - self._started)
        self._started = None

    def pause(self) -> None:
        """What follows (compiling a new batch shape) is not part of the step, until resume()."""
        if self._started is not None:
            self._paused = time.monotonic() - self._started
        self._started = None

    def resume(self) -> None:
        self._started = time.monotonic() - self._paused

    def limit(self) -> float | None:
        """Seconds after which the step in progress counts as hung (None: still warming up)."""
        if len(self.recent) < self.warmup:
            return None
        return self.factor * statistics.median(self.recent)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            started, step, limit = self._started, self._step, self.limit()
            if started is None or limit is None or step == self._reported:
                continue
            took = time.monotonic() - started
            if took > limit:
                self._reported = step
                print(
                    f"watchdog: step {step} has taken {took:.1f}s, over {self.factor:g}x the "
                    f"median step ({limit / self.factor:.3g}s); the stacks of every thread "
                    "(the run goes on):",
                    file=self.out,
                    flush=True,
                )
                faulthandler.dump_traceback(file=self.out, all_threads=True)
