"""Learning-rate schedules that timm's `create_scheduler_v2` lacks, on timm's `Scheduler` interface.

``onecycle-linear`` is the published ConvMixer-XL schedule: piecewise linear in the optimizer step,
0 -> lr at 40 % of the steps -> lr / 20 at 80 % -> 0 at the last step.

`scheduler_state` / `load_scheduler_state` save and restore any of the schedules for resume, including the
plateau schedule's counters, which timm's own `PlateauLRScheduler.state_dict` leaves out.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timm.scheduler import PlateauLRScheduler
from timm.scheduler.scheduler import Scheduler

__all__ = ["ONECYCLE_LINEAR", "OneCycleLinearScheduler", "load_scheduler_state", "plateau_mode", "scheduler_state"]

ONECYCLE_LINEAR = "onecycle-linear"
PEAK_AT = 0.4
LOW_AT = 0.8
LOW_FACTOR = 1 / 20


class OneCycleLinearScheduler(Scheduler):
    """Per-update piecewise-linear learning rate through (0, 0), (0.4 T, lr), (0.8 T, lr / 20), (T, 0)
    for T = ``total_updates``, lr being each parameter group's initial learning rate.

    Driven by `step_update` (``num_updates`` optimizer steps done -> the rate of the next step); `step` at
    epoch ends changes nothing. Its state (for resume) is timm's `Scheduler.state_dict`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_updates: int, initialize: bool = True) -> None:
        if total_updates < 1:
            raise ValueError(f"total_updates must be positive, got {total_updates}")
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False, initialize=initialize)
        self.total_updates = total_updates
        self.update_groups(self._get_lr(0))

    def _get_lr(self, t: int) -> list[float]:
        knots = [0.0, PEAK_AT * self.total_updates, LOW_AT * self.total_updates, float(self.total_updates)]
        return [float(np.interp(t, knots, [0.0, base, base * LOW_FACTOR, 0.0])) for base in self.base_values]


# checkpoint key of the plateau schedule's full state (torch's ReduceLROnPlateau state and timm's noise restore)
PLATEAU_STATE = "plateau_state"


def plateau_mode(eval_metric: str) -> str:
    """The plateau schedule's direction for --eval-metric: 'min' for a loss, else 'max' (timm train.py's rule)."""
    return "min" if "loss" in eval_metric else "max"


def scheduler_state(scheduler: Scheduler) -> dict[str, Any]:
    """What a checkpoint holds of ``scheduler``: timm's `state_dict`, and for timm's `PlateauLRScheduler`
    also its counters (best metric, epochs without improvement, cooldown left: torch's `ReduceLROnPlateau`
    state), which timm 1.0.31 does not save, so that a resumed run decays the rate when the uninterrupted
    one does."""
    state = dict(scheduler.state_dict())
    if isinstance(scheduler, PlateauLRScheduler):
        state[PLATEAU_STATE] = {"reduce_on_plateau": scheduler.lr_scheduler.state_dict(),
                                "restore_lr": scheduler.restore_lr}
    return state


def load_scheduler_state(scheduler: Scheduler, state: dict[str, Any]) -> None:
    """Restore what `scheduler_state` saved (a checkpoint without the plateau counters restores timm's part)."""
    plateau = state.get(PLATEAU_STATE)
    scheduler.load_state_dict({key: value for key, value in state.items() if key != PLATEAU_STATE})
    if isinstance(scheduler, PlateauLRScheduler) and isinstance(plateau, dict):
        scheduler.lr_scheduler.load_state_dict(plateau["reduce_on_plateau"])
        scheduler.restore_lr = plateau["restore_lr"]
