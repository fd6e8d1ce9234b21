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

Values: `fault_active(NAME, EPOCH, STEP, RANK)` says whether a failpoint that changes a value instead is armed;
``nan-loss:EPOCH:STEP`` makes that step's training loss NaN on every rank, ``nan-loss:EPOCH:STEP@R`` on rank R
only (``@0+1``: ranks 0 and 1).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from vig.errors import UsageError
from vig.trainer.signals import stop_requested

ENV_POINT = "VIG_FAULT_AT"
ENV_ACTION = "VIG_FAULT_ACTION"
POINTS = ("train-step", "epoch-end", "after-last", "after-checkpoint", "after-best", "after-summary",
          "after-curves")
VALUE_POINTS = ("nan-loss",)


@dataclass(frozen=True)
class _Armed:
    """The configured failpoints ("POINT:EPOCH[:STEP]" keys), their action ('kill' or a pause marker path), and the
    value failpoints (key -> the ranks it applies to; None: every rank)."""

    keys: frozenset[str] = frozenset()
    pause_marker: str | None = None
    values: dict[str, frozenset[int] | None] = field(default_factory=dict)


_ARMED = _Armed()


def configure(spec: str, action: str = "kill") -> None:
    """Arm the failpoints of ``spec`` (``POINT:EPOCH[:STEP]``, a value point with ``@RANK[+RANK...]``,
    comma-separated; '' disarms all) with ``action`` ('kill' or 'pause:PATH'). UsageError for an unknown point or
    action."""
    global _ARMED
    keys, values = set(), {}
    for item in filter(None, spec.split(",")):
        key, _, ranks = item.partition("@")
        point, *numbers = key.split(":")
        if (point not in POINTS + VALUE_POINTS or not 1 <= len(numbers) <= 2
                or not all(number.isdigit() for number in numbers)
                or (ranks and (point not in VALUE_POINTS or not all(rank.isdigit() for rank in ranks.split("+"))))):
            raise UsageError(f"{ENV_POINT}: {item!r} is not POINT:EPOCH[:STEP] with POINT one of "
                             f"{', '.join(POINTS + VALUE_POINTS)} (@RANK[+RANK] after a value point)")
        if point in VALUE_POINTS:
            values[key] = frozenset(int(rank) for rank in ranks.split("+")) if ranks else None
        else:
            keys.add(key)
    kind, _, marker = action.partition(":")
    if not (action == "kill" or (kind == "pause" and marker)):
        raise UsageError(f"{ENV_ACTION}: expected kill or pause:PATH, got {action!r}")
    _ARMED = _Armed(frozenset(keys), marker if kind == "pause" else None, values)


def configure_from_env(environ: Mapping[str, str] | None = None) -> None:
    """`configure` from ``VIG_FAULT_AT`` / ``VIG_FAULT_ACTION`` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    configure(environ.get(ENV_POINT, ""), environ.get(ENV_ACTION, "kill"))


def fault_active(name: str, epoch: int, step: int = 0, rank: int = 0) -> bool:
    """Whether the value failpoint ``name`` is armed for this epoch, step (and rank)."""
    if not _ARMED.values:
        return False
    key = f"{name}:{epoch}" + (f":{step}" if step else "")
    if key not in _ARMED.values:
        return False
    ranks = _ARMED.values[key]
    return ranks is None or rank in ranks


def fault_point(name: str, epoch: int, step: int = 0) -> None:
    """Kill or pause this process when the failpoint ``name`` is armed for this epoch (and step)."""
    if not _ARMED.keys or f"{name}:{epoch}" + (f":{step}" if step else "") not in _ARMED.keys:
        return
    if _ARMED.pause_marker is None:
        os.kill(os.getpid(), signal.SIGKILL)
    Path(_ARMED.pause_marker).touch()
    while not stop_requested():
        time.sleep(0.01)
