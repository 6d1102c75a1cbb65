"""Preemption: SIGTERM/SIGINT turned into a save-and-stop that every process agrees on.

The training loop polls `PreemptionWatch.requested()` between steps; a signal
while it waits for data ends the wait at once (`Preempted`), and a second signal
ends the process.
"""

from __future__ import annotations

import contextlib
import signal
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preempted(Exception):
    """A signal arrived while no step ran (the loop was waiting for data)."""


class PreemptionWatch:
    """Turns SIGTERM/SIGINT into a request to save and exit, agreed by every process.

    `requested()` is True on every process once any process got a signal (a
    tiny all-gather when there are several processes), so all of them save the
    same step. A signal received inside `waiting()` (no step runs: the loop
    waits for data, which may never come) raises `Preempted` at once when
    there is one process; with several, only the next step can agree on a
    save. A second signal ends the process at once (the signal's default
    action, which works even when Python code no longer runs). Use as a
    context manager to restore the previous handlers.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self._flag = False
        self._waiting = False
        self._previous = {}

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self._flag = True
        for sig in self.signals:  # the next signal terminates the process
            signal.signal(sig, signal.SIG_DFL)
        print(
            f"received {signal.Signals(signum).name}: saving and stopping "
            "(a second signal ends the process without saving)",
            file=sys.stderr,
        )
        if self._waiting and jax.process_count() == 1:
            raise Preempted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def waiting(self):
        """Marks a wait outside any step (for data): a signal in it raises `Preempted`."""
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        flags = multihost_utils.process_allgather(np.int32(self._flag))
        return bool(np.any(flags))
