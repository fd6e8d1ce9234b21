"""Learning-rate schedules that timm's `create_scheduler_v2` lacks, on timm's `Scheduler` interface.

``onecycle-linear`` is the published ConvMixer-XL schedule: piecewise linear in the optimizer step,
0 -> lr at 40 % of the steps -> lr / 20 at 80 % -> 0 at the last step.
"""
from __future__ import annotations

import numpy as np
import torch
from timm.scheduler.scheduler import Scheduler

__all__ = ["ONECYCLE_LINEAR", "OneCycleLinearScheduler"]

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
