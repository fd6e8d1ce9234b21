"""Test-only fault injection: stop the process at a named point of the training loop or the save sequence.

With ``VIG_FAULT_AT=POINT:EPOCH[:STEP]`` (or several, comma-separated) in the environment, `fault_point(POINT, EPOCH, STEP)` acts when
it is reached with those values: by default the process SIGKILLs itself (a kill at exactly that
instant); with ``VIG_FAULT_ACTION=pause:PATH`` it creates PATH and waits there until a stop signal
(`vig.trainer.signals`) arrives, so that a test can deliver a real signal at a known step. Without the
variable, `fault_point` does nothing.

Points: ``train-step`` (after a training step, STEP 1-based), ``epoch-end`` (epoch trained and
validated, nothing saved), ``after-last`` (last.pth.tar renamed into place), ``after-checkpoint``
(checkpoint-<epoch> linked), ``after-best`` (model_best linked), ``after-summary`` (summary.csv
written), ``after-curves`` (curves.png written).

Values: `fault_active(NAME, EPOCH, STEP, RANK)` says whether the variable names a point that changes a value
instead; ``nan-loss:EPOCH:STEP`` makes that step's training loss NaN on every rank, ``nan-loss:EPOCH:STEP@R``
on rank R only (``@0+1``: ranks 0 and 1).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV_POINT = "VIG_FAULT_AT"
ENV_ACTION = "VIG_FAULT_ACTION"


def fault_active(name: str, epoch: int, step: int = 0, rank: int = 0) -> bool:
    """Whether ``VIG_FAULT_AT`` names this value fault at this epoch, step (and rank, after ``@``)."""
    spec = os.environ.get(ENV_POINT)
    if not spec:
        return False
    point = f"{name}:{epoch}" + (f":{step}" if step else "")
    for item in spec.split(","):
        where, _, ranks = item.partition("@")
        if where == point and (not ranks or str(rank) in ranks.split("+")):
            return True
    return False


def fault_point(name: str, epoch: int, step: int = 0) -> None:
    """Kill or pause this process when ``VIG_FAULT_AT`` names this point, epoch (and step)."""
    spec = os.environ.get(ENV_POINT)
    if not spec:
        return
    if f"{name}:{epoch}" + (f":{step}" if step else "") not in spec.split(","):
        return
    action = os.environ.get(ENV_ACTION, "kill")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    from vig.trainer.signals import stop_requested
    Path(action.partition(":")[2]).touch()
    while not stop_requested():
        time.sleep(0.01)
