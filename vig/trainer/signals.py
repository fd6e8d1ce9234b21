"""Graceful stop on SIGTERM / SIGUSR1 / SIGINT (what SLURM, Kubernetes and Ctrl-C send before a kill).

`catch_stop_signals` replaces the handlers of those signals by one that only records the signal;
the training loop polls `stop_requested` after every step (reduced over ranks, so that all ranks stop
at the same step), writes a mid-epoch checkpoint and raises `Interrupted`. A second signal of the same
kind while the first is being handled restores the default action, so a repeated Ctrl-C still stops
a stuck process at once.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_received: list[int] = []


class Interrupted(Exception):
    """The run stopped on a signal after saving a resumable checkpoint (the message is one line)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _record(signum: int, frame: object) -> None:
    if signum in _received:
        signal.signal(signum, signal.SIG_DFL)
    _received.append(signum)


def stop_requested() -> int:
    """The first stop signal received since `catch_stop_signals` began (0: none)."""
    return _received[0] if _received else 0


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextmanager
def catch_stop_signals() -> Iterator[None]:
    """Record STOP_SIGNALS instead of acting on them (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {signum: signal.signal(signum, _record) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()
