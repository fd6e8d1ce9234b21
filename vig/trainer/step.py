"""One training step: the loss recipe, chosen once before the loop, and the small pieces of state a step keeps.

A `LossRecipe` turns a batch into the loss to back-propagate: `PlainLoss` (the classification loss),
`EdgeLoss` (plus a weighted extra loss term of the model, `vig.models.training_api.ExtraLosses`: the batch-graph
model's ``edge`` term) or `DistillLoss` (a `timm.task` distillation task's weighted task + distillation loss).
`choose_recipe` picks one from the run's settings. `Accumulation` walks the accumulation groups of an epoch and
sums the figures of the current group; `NonFiniteGuard` holds what ``--skip-nonfinite`` and the stop on a
non-finite loss need. `TrainStep` bundles what `vig.trainer.engine.train_one_epoch` needs to run a step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn

from vig.models.training_api import EDGE_LOSS, ExtraLosses
from vig.trainer.distributed import DistributedContext, all_reduce_sum
from vig.trainer.config import DEFAULT_MAX_CONSECUTIVE_SKIPS
from vig.trainer.precision import Precision
from vig.trainer.step_guard import StepGuard

_LOGGER = logging.getLogger(__name__)


@dataclass
class StepLoss:
    """A batch's loss (0-dim, what is back-propagated) and its unweighted extra edge term (None without one)."""

    loss: torch.Tensor
    edge_loss: torch.Tensor | None = None


class LossRecipe(Protocol):
    """How a batch of images (B, C, H, W) and targets ((B,) class indices or (B, classes) mixed targets)
    becomes the training loss of ``model`` (the module the optimizer trains, possibly DDP-wrapped)."""

    has_edge_loss: bool

    def train(self, model: nn.Module) -> None:
        """Put the modules the recipe runs into training mode (once per epoch)."""

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 precision: Precision) -> StepLoss:
        """The loss of one batch, the forward pass under ``precision``'s autocast."""


@dataclass
class PlainLoss:
    """``loss_fn(model(images), targets)``: the classification loss alone."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    has_edge_loss: bool = False

    def train(self, model: nn.Module) -> None:
        model.train()

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 precision: Precision) -> StepLoss:
        with precision.autocast():
            return StepLoss(self.loss_fn(model(images), targets))


@dataclass
class EdgeLoss:
    """The classification loss plus ``weight`` x the model's extra ``edge`` term.

    The model is called as ``model(images, **extra_forward_kwargs)`` -> (logits, extras) (through DDP's
    forward); the edge term is ``extra_losses(extras, targets, smoothing)["edge"]`` (BCE(edge_sim (B, B), edge
    targets of this rank's batch), float32, outside autocast). ``smoothing`` is the label smoothing inside mixed
    targets (mixup's), which the edge targets undo.
    """

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weight: float
    smoothing: float = 0.0
    has_edge_loss: bool = True

    def train(self, model: nn.Module) -> None:
        unwrapped = unwrap_model(model)
        if not isinstance(unwrapped, ExtraLosses):
            raise TypeError(f"an edge loss needs a model with extra loss terms, got {type(unwrapped).__name__}")
        model.train()

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 precision: Precision) -> StepLoss:
        extra_loss_model = unwrap_model(model)
        with precision.autocast():
            logits, extras = model(images, **extra_loss_model.extra_forward_kwargs)
            loss = self.loss_fn(logits, targets)
        edge_loss = extra_loss_model.extra_losses(extras, targets, self.smoothing)[EDGE_LOSS]
        return StepLoss(loss + self.weight * edge_loss, edge_loss)


@dataclass
class DistillLoss:
    """A `timm.task` distillation task's ``task(images, targets)["loss"]`` (task and distillation loss, weighted);
    the model the optimizer trains is the task's trainable module."""

    task: nn.Module
    has_edge_loss: bool = False

    def train(self, model: nn.Module) -> None:
        model.train()
        self.task.train()

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 precision: Precision) -> StepLoss:
        with precision.autocast():
            return StepLoss(self.task(images, targets)["loss"])


def choose_recipe(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], edge_loss_weight: float | None = None,
                  task: nn.Module | None = None, mixup: Mixup | None = None) -> LossRecipe:
    """The loss recipe of a run: distillation with a task, the edge loss with a weight, else the plain loss."""
    if task is not None:
        return DistillLoss(task)
    if edge_loss_weight is not None:
        return EdgeLoss(loss_fn, edge_loss_weight, mixup.label_smoothing if mixup is not None else 0.0)
    return PlainLoss(loss_fn)


def accumulation_groups(num_batches: int, accum_steps: int) -> list[int]:
    """Sizes of the consecutive accumulation groups of an epoch of ``num_batches`` batches: groups of
    ``accum_steps`` batches, the last one smaller when ``accum_steps`` does not divide the epoch (one optimizer
    update per group, as timm's loop)."""
    full, rest = divmod(num_batches, accum_steps)
    return [accum_steps] * full + ([rest] if rest else [])


class Accumulation:
    """Where a step stands in the epoch's accumulation groups, and the loss / edge loss / image sums of the
    current group (added to the epoch's figures when its update runs). Past the planned groups (a loader longer
    than its len()), groups of one batch."""

    def __init__(self, num_batches: int, accum_steps: int, device: torch.device, start_step: int = 0) -> None:
        self.groups = accumulation_groups(num_batches, accum_steps)
        self.index = start_step // accum_steps  # a stop falls on a group boundary
        self.in_group = 0
        self.bad = False  # a loss of this group was not finite (--skip-nonfinite): the group is skipped
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.edge_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.images = 0

    def begin_step(self) -> None:
        """Count a batch into the current group."""
        self.in_group += 1

    @property
    def size(self) -> int:
        """The size of the current group."""
        return self.groups[self.index] if self.index < len(self.groups) else 1

    @property
    def first(self) -> bool:
        return self.in_group == 1

    @property
    def last(self) -> bool:
        return self.in_group == self.size

    def add(self, step_loss: StepLoss, batch: int) -> None:
        """Add a finite batch's loss (and edge loss) x ``batch`` images to the group's sums."""
        self.loss += step_loss.loss.detach().double() * batch
        if step_loss.edge_loss is not None:
            self.edge_loss += step_loss.edge_loss.detach().double() * batch
        self.images += batch

    def end_group(self) -> None:
        """Start the next group."""
        self.index, self.in_group, self.bad, self.images = self.index + 1, 0, False, 0
        self.loss.zero_()
        self.edge_loss.zero_()


class NonFiniteGuard:
    """What a non-finite loss needs. Without ``skip`` (the default): the first step whose loss was not finite,
    kept on the device (0: none) until the next read-back. With ``skip`` (--skip-nonfinite): the training state
    saved at each group's start (`vig.trainer.step_guard.StepGuard`: weights, buffers, optimizer and scaler
    state), put back when a loss of the group (one all-reduce and host read per step) or the updated weights are
    not finite on any rank; the count of skipped steps, and of steps skipped in a row (``streak``, across
    epochs)."""

    def __init__(self, model: nn.Module, skip: bool, device: torch.device, skipped_steps: int = 0,
                 optimizer: torch.optim.Optimizer | None = None, scaler: Any = None, streak: int = 0) -> None:
        self.skip = skip
        self.state = StepGuard(unwrap_model(model), optimizer, scaler) if skip else None
        self.first_non_finite = torch.zeros((), dtype=torch.float64, device=device)
        self.skipped_steps = skipped_steps
        self.streak = streak

    def keep_statistics(self) -> None:
        """At a group's start: a group that will be skipped must leave no trace, its forwards' included."""
        self.state.save()

    def weights_finite(self, ctx: DistributedContext) -> bool:
        """After an update with --skip-nonfinite: whether every rank's weights and buffers are finite; if not, they
        are put back as before the group."""
        if self.state.weights_finite(ctx):
            return True
        self.state.restore()
        return False

    def skips(self, loss: torch.Tensor, step: int, ctx: DistributedContext) -> bool:
        """Whether this step's group is to be skipped (``skip`` and a non-finite loss on any rank); otherwise,
        without ``skip``, a non-finite loss is noted as the first bad step (read back later)."""
        non_finite = ~torch.isfinite(loss.detach())
        if not self.skip:
            self.first_non_finite = torch.where(non_finite & (self.first_non_finite == 0), step, self.first_non_finite)
            return False
        if all_reduce_sum(non_finite.double(), ctx).item() == 0:
            return False
        self.state.restore()
        return True


@dataclass
class TrainStep:
    """Everything one training step uses, built once before the loop (`vig.trainer.engine.train_one_epoch`).

    ``model`` is the module the optimizer trains (DDP- or compile-wrapped, or the distillation task's trainable
    module); ``recipe`` makes its loss; ``model_ema`` follows ``ema_source`` (default: ``model`` without its DDP
    wrapper; with feature distillation, the student alone); ``scheduler`` steps per update; ``model_dtype``
    (--model-dtype) casts the images.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    recipe: LossRecipe
    precision: Precision
    scheduler: Any = None
    mixup: Mixup | None = None
    model_ema: ModelEmaV3 | None = None
    ema_source: nn.Module | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"
    channels_last: bool = False
    model_dtype: torch.dtype | None = None
    grad_accum_steps: int = 1
    skip_nonfinite: bool = False
    max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS
