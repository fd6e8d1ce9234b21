"""What `--skip-nonfinite` puts back when it skips a step: the whole training state before the step.

A skipped step must leave no trace. Its forward passes change the BatchNorm running statistics (and any
other buffer a forward writes); an update with a finite loss can still make the weights non-finite (a
huge learning rate), after which every later loss is NaN. `StepGuard` copies the trained module's
parameters and buffers, the optimizer's per-parameter state and the gradient scaler's state before each
update (one accumulation group), and `restore` puts them back; the trainer restores when the group's loss
or the updated weights are not finite on any rank, so every rank stays identical. The EMA and the
schedule step only after an update is kept, so they need no copy.

Cost: one copy of the weights, buffers and optimizer state per update (memory and a device copy), paid only
with --skip-nonfinite.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vig.trainer.distributed import DistributedContext, all_reduce_sum


def _copy(value: Any) -> Any:
    """A detached copy of a tensor (or of the tensors in a dict / list); other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item) for item in value)
    return value


class StepGuard:
    """Saves and restores a module's tensors (parameters and buffers), an optimizer's state and a scaler's state."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        self.tensors = [tensor for tensor in (*module.parameters(), *module.buffers())]
        self.floating = [tensor for tensor in self.tensors if tensor.is_floating_point()]
        self.optimizer = optimizer
        self.scaler = scaler
        self._tensors: list[torch.Tensor] = []
        self._optimizer: dict[Any, Any] = {}
        self._scaler: dict[str, Any] | None = None

    def save(self) -> None:
        """Copy the state that the next update (and its forwards) may change."""
        with torch.no_grad():
            if len(self._tensors) != len(self.tensors):
                self._tensors = [tensor.detach().clone() for tensor in self.tensors]
            else:
                for kept, tensor in zip(self._tensors, self.tensors):
                    kept.copy_(tensor)
        self._optimizer = {param: _copy(dict(state)) for param, state in self.optimizer.state.items()}
        self._scaler = _copy(self.scaler.state_dict()) if self.scaler is not None else None

    def restore(self) -> None:
        """Put back what `save` copied (optimizer state that the update created is dropped)."""
        with torch.no_grad():
            for kept, tensor in zip(self._tensors, self.tensors):
                tensor.copy_(kept)
        for param in list(self.optimizer.state):
            if param not in self._optimizer:
                del self.optimizer.state[param]
        for param, state in self._optimizer.items():
            self.optimizer.state[param] = _copy(state)
        if self.scaler is not None and self._scaler is not None:
            self.scaler.load_state_dict(_copy(self._scaler))

    def weights_finite(self, ctx: DistributedContext) -> bool:
        """Whether every rank's parameters and buffers are finite (one all-reduce and one host read). A finite loss
        does not prove the buffers finite: a BatchNorm batch variance that overflows normalises to zeros."""
        if not self.floating:
            return True
        finite = torch.stack([torch.isfinite(tensor).all() for tensor in self.floating]).all()
        bad = (~finite).to(torch.float64).reshape(())
        return all_reduce_sum(bad, ctx).item() == 0
