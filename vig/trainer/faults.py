"""Failpoints: named places in the training loop and the save sequence where a test can stop the process.

The mechanism of etcd's gofail and TiKV's fail-rs, reduced to what the fault tests need. The code marks a
place with ``fault_point(POINT, EPOCH, STEP)``; the failpoints are configured once, when a run starts
(`vig.trainer.run.run` calls `configure_from_env`), from two environment variables:

- ``VIG_FAULT_AT=POINT:EPOCH[:STEP]`` (several comma-separated): the failpoints armed;
- ``VIG_FAULT_ACTION``: what an armed failpoint does when it is reached with those values: ``kill`` (the
  default: the process SIGKILLs itself, a kill at exactly that instant) or ``pause:PATH`` (create PATH, then
  wait until a stop signal of `vig.trainer.signals` arrives, so that a test can deliver a real signal at a known
  step).

Unset, nothing is armed and `fault_point` is one set lookup that finds nothing: free in production. The
variables are read at configuration only, never on a step.

Points: ``train-step`` (after a training step, STEP 1-based), ``epoch-end`` (epoch trained and validated,
nothing saved), ``after-last`` (last.pth.tar renamed into place), ``after-checkpoint`` (checkpoint-<epoch>
linked), ``after-best`` (model_best linked), ``after-summary`` (summary.csv written), ``after-curves``
(curves.png written).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from vig.errors import UsageError
from vig.trainer.signals import stop_requested

ENV_POINT = "VIG_FAULT_AT"
ENV_ACTION = "VIG_FAULT_ACTION"
POINTS = ("train-step", "epoch-end", "after-last", "after-checkpoint", "after-best", "after-summary",
          "after-curves")


@dataclass(frozen=True)
class _Armed:
    """The configured failpoints ("POINT:EPOCH[:STEP]" keys) and their action ('kill' or a pause marker path)."""

    keys: frozenset[str] = frozenset()
    pause_marker: str | None = None


_ARMED = _Armed()


def configure(spec: str, action: str = "kill") -> None:
    """Arm the failpoints of ``spec`` (``POINT:EPOCH[:STEP]``, comma-separated; '' disarms all) with ``action``
    ('kill' or 'pause:PATH'). UsageError for an unknown point or action."""
    global _ARMED
    keys = frozenset(item for item in spec.split(",") if item)
    for key in keys:
        point, *numbers = key.split(":")
        if point not in POINTS or not 1 <= len(numbers) <= 2 or not all(number.isdigit() for number in numbers):
            raise UsageError(f"{ENV_POINT}: {key!r} is not POINT:EPOCH[:STEP] with POINT one of {', '.join(POINTS)}")
    kind, _, marker = action.partition(":")
    if not (action == "kill" or (kind == "pause" and marker)):
        raise UsageError(f"{ENV_ACTION}: expected kill or pause:PATH, got {action!r}")
    _ARMED = _Armed(keys, marker if kind == "pause" else None)


def configure_from_env(environ: Mapping[str, str] | None = None) -> None:
    """`configure` from ``VIG_FAULT_AT`` / ``VIG_FAULT_ACTION`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    configure(environ.get(ENV_POINT, ""), environ.get(ENV_ACTION, "kill"))


def fault_point(name: str, epoch: int, step: int = 0) -> None:
    """Kill or pause this process when the failpoint ``name`` is armed for this epoch (and step)."""
    if not _ARMED.keys or f"{name}:{epoch}" + (f":{step}" if step else "") not in _ARMED.keys:
        return
    if _ARMED.pause_marker is None:
        os.kill(os.getpid(), signal.SIGKILL)
    Path(_ARMED.pause_marker).touch()
    while not stop_requested():
        time.sleep(0.01)
