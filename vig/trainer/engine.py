"""The epoch loops: `train_one_epoch` (a `vig.trainer.step.TrainStep` per batch) and `validate`, and the
per-epoch progress display.

Loss and accuracy sums are reduced over ranks, so every rank returns the global figures;
only the primary rank displays progress.

The host waits for the device only at the log interval and at the end of a loop, as timm's loop
does: loss sums and the first step whose training loss was not finite are kept on the device and
read back (one all-reduce, one copy) at those steps only. A non-finite loss therefore stops every
rank at the next log step or at the end of the epoch, whichever comes first, always before
`train_one_epoch` returns and hence before anything of that epoch is saved. In between, the bad
update and up to ``log_interval - 1`` further updates run on weights that are no longer finite;
they are thrown away with the run. ``skip_nonfinite`` has to decide at every step whether to update,
so with it the finite-loss flag is reduced over ranks and read at every step (one read per step).

Models with extra loss terms (`vig.models.training_api.ExtraLosses`: the batch-graph model's ``edge`` term,
BCE(edge_sim, `vig.models.batch_graph.edge_targets`)) train on the classification loss plus
``edge_loss_weight`` x that term (`vig.trainer.step.EdgeLoss`): each rank's edges link the images of its own
batch only (features are not gathered across ranks). With mixup / cutmix the edge target is Y Y^T of the mixed
label vectors with the label smoothing undone.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

import torch
import torch.nn.functional as F
from timm.data.loader import PrefetchLoader
from timm.utils import dispatch_clip_grad, unwrap_model
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vig.errors import RunError
from vig.trainer.distributed import DistributedContext, all_reduce_sum
from vig.trainer.faults import fault_active, fault_point
from vig.trainer.precision import Precision, resolve_precision
from vig.trainer.step import Accumulation, NonFiniteGuard, TrainStep
from vig.tta import predict_flip_tta

__all__ = ["EpochProgress", "EpochSums", "EvalStats", "Precision", "ResumePoint", "TrainStats", "resolve_precision",
           "train_one_epoch", "validate"]

_LOGGER = logging.getLogger(__name__)


class EpochProgress:
    """Progress of one loop on the primary rank: a tqdm bar on a terminal, log lines every `log_interval` otherwise.

    Figures that need the device (`fields`) are read only at log steps (`due`); on a terminal the bar
    moves at every step and shows the figures of the last log step.
    """

    def __init__(self, title: str, total: int, enabled: bool, log_interval: int,
                 stream: TextIO | None = None) -> None:
        self.title = title
        self.total = total
        self.enabled = enabled
        self.log_interval = log_interval
        stream = stream or sys.stderr
        interactive = enabled and stream.isatty()
        self.bar = tqdm(total=total, desc=title, file=stream, dynamic_ncols=True) if interactive else None
        self.fields = ""

    def due(self, step: int) -> bool:
        """Whether `step` (1-based) is a log step: every `log_interval`-th and the last."""
        return step % self.log_interval == 0 or step == self.total

    def update(self, step: int, fields: Callable[[], str]) -> None:
        """Report that `step` (1-based) of `total` batches is done; `fields()` (e.g. 'loss 1.23 lr 1e-3')
        is called only on a log step of the primary rank."""
        if not self.enabled:
            return
        due = self.due(step)
        if due:
            self.fields = fields()
        if self.bar is not None:
            if due:
                self.bar.set_postfix_str(self.fields, refresh=False)
            self.bar.update(step - self.bar.n)
            if step == self.total:
                self.bar.close()
        elif due:
            _LOGGER.info("%s %d/%d %s", self.title, step, self.total, self.fields)


@dataclass(frozen=True)
class EpochSums:
    """This rank's running figures of an epoch stopped in mid-epoch (what interrupted.pth.tar keeps per rank):
    loss x images, edge loss x images, images trained and steps skipped so far."""

    loss: float = 0.0
    edge_loss: float = 0.0
    images: int = 0
    skipped_steps: int = 0

    def as_list(self) -> list[float | int]:
        """The checkpoint's ``sums`` entry."""
        return [self.loss, self.edge_loss, self.images, self.skipped_steps]

    @classmethod
    def from_list(cls, sums: list[float | int]) -> EpochSums:
        loss, edge_loss, images, skipped_steps = sums
        return cls(float(loss), float(edge_loss), int(images), int(skipped_steps))


@dataclass(frozen=True)
class ResumePoint:
    """Where a stopped epoch goes on: after ``step`` (1-based), from ``sums``; ``restore()`` puts back the random
    generators' states of the stop once the loader has drawn the first ``step`` batches again."""

    step: int
    sums: EpochSums
    restore: Callable[[], None]


@dataclass
class TrainStats:
    """Epoch figures over all ranks: mean loss per image, images seen, updates so far, last lr, images/s,
    the steps skipped for a non-finite loss (`skip_nonfinite`) and the mean edge loss (unweighted BCE; None
    without an edge loss); for an epoch stopped in mid-epoch, the step it stopped after and this rank's sums."""

    loss: float
    images: int
    num_updates: int
    lr: float
    images_per_second: float
    skipped_steps: int = 0
    edge_loss: float | None = None
    stopped_at: int = 0
    local_sums: EpochSums = EpochSums()
    skip_streak: int = 0


def _to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device,
               channels_last: bool, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, C, H, W) and targets on ``device``; images cast to ``dtype`` (--model-dtype) when given."""
    images = images.to(device, non_blocking=True)
    if dtype is not None:
        images = images.to(dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


@dataclass
class _Reading:
    """Epoch figures so far, summed over ranks: loss * batch, edge loss * batch, images, and for each rank
    the first step whose loss was not finite (0: none)."""

    loss_sum: float
    edge_loss_sum: float
    images: int
    first_non_finite: list[int]


def _stop_if_non_finite(reading: _Reading, epoch: int, step: int, total: int, ctx: DistributedContext) -> None:
    bad = [first for first in reading.first_non_finite if first > 0]
    if not bad:
        return
    where = f" (on {len(bad)} of {ctx.world_size} ranks)" if ctx.distributed else ""
    raise RunError(f"non-finite training loss at epoch {epoch}, step {min(bad)} of {total}{where}, "
                   f"found at step {step}; the checkpoints keep the last finished epoch "
                   "(lower --lr, use --clip-grad, or pass --skip-nonfinite)")


class _Epoch:
    """One rank's pass over an epoch, step by step: the accumulation group, the non-finite guard and the epoch's
    sums (on the device until `read_back`)."""

    def __init__(self, epoch: int, num_batches: int, step: TrainStep, ctx: DistributedContext, num_updates: int,
                 resume_at: ResumePoint | None, skip_streak: int = 0) -> None:
        sums = resume_at.sums if resume_at is not None else EpochSums()
        self.epoch, self.num_batches, self.step, self.ctx, self.num_updates = epoch, num_batches, step, ctx, num_updates
        self.group = Accumulation(num_batches, step.grad_accum_steps, ctx.device,
                                  resume_at.step if resume_at is not None else 0)
        self.guard = NonFiniteGuard(step.model, step.skip_nonfinite, ctx.device, sums.skipped_steps, step.optimizer,
                                    step.precision.scaler, skip_streak)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device) + sums.loss
        self.edge_loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device) + sums.edge_loss
        self.images = sums.images
        self.ema_source = step.ema_source if step.ema_source is not None else unwrap_model(step.model)
        self.can_defer_sync = ctx.distributed and hasattr(step.model, "no_sync")

    def train_batch(self, index: int, images: torch.Tensor, targets: torch.Tensor) -> bool:
        """Train batch ``index`` (1-based) into its accumulation group; True when it ended the group."""
        group = self.group
        group.begin_step()
        if group.first:
            if self.guard.skip:
                self.guard.keep_statistics()
            self.step.optimizer.zero_grad(set_to_none=True)
        if group.bad:
            self.guard.skipped_steps += 1
        else:
            self._forward_backward(index, images, targets)
            if group.last and not group.bad:
                self._update(index)
        ended = group.last
        if ended:
            self._end_group(index)
        return ended

    def _end_group(self, index: int) -> None:
        """After a group's last batch: count a skipped group into the streak (too long a streak stops the run)."""
        group, guard = self.group, self.guard
        if guard.skip:
            guard.streak = guard.streak + group.size if group.bad else 0
            if guard.streak >= self.step.max_consecutive_skips:
                raise RunError(f"--skip-nonfinite: {guard.streak} steps skipped in a row (non-finite loss or "
                               f"weights), stopped at epoch {self.epoch}, step {index} of {self.num_batches}; the "
                               f"checkpoints keep the last finished epoch (lower --lr or use --clip-grad; "
                               f"--max-consecutive-skips {self.step.max_consecutive_skips})")
        if group.bad:
            self.step.optimizer.zero_grad(set_to_none=True)
        group.end_group()

    def _forward_backward(self, index: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        """The batch's loss and backward pass (scaled by the group's size); or, when --skip-nonfinite finds the
        loss not finite on a rank, the group marked as skipped."""
        step, group = self.step, self.group
        images, targets = _to_device(images, targets, self.ctx.device, step.channels_last, step.model_dtype)
        if step.mixup is not None:
            images, targets = step.mixup(images, targets)
        defer_sync = self.can_defer_sync and not group.last
        with step.model.no_sync() if defer_sync else contextlib.nullcontext():
            step_loss = step.recipe(step.model, images, targets, step.precision)
            if fault_active("nan-loss", self.epoch, index, self.ctx.rank):  # test-only (vig.trainer.faults)
                step_loss.loss = step_loss.loss * float("nan")
            if self.guard.skips(step_loss.loss, index, self.ctx):
                self._skip_group(index)
                return
            scaled = step_loss.loss / group.size if group.size > 1 else step_loss.loss
            if step.precision.scaler is not None:
                step.precision.scaler(scaled, step.optimizer, clip_grad=step.clip_grad, clip_mode=step.clip_mode,
                                      parameters=step.model.parameters(), need_update=group.last)
            else:
                scaled.backward()
            group.add(step_loss, images.shape[0])

    def _skip_group(self, index: int) -> None:
        group = self.group
        group.bad = True
        self.guard.skipped_steps += group.in_group
        if self.ctx.is_primary:
            _LOGGER.warning("epoch %d, step %d: non-finite loss, %s skipped (%d steps this epoch)", self.epoch, index,
                            "step" if group.size == 1 else f"accumulation group of {group.size} steps",
                            self.guard.skipped_steps + group.size - group.in_group)

    def _update(self, index: int) -> None:
        """The group's optimizer update (clipped), EMA and per-update schedule step; its sums join the epoch's. With
        --skip-nonfinite an update that leaves a weight not finite is undone and its group skipped."""
        step, group = self.step, self.group
        if step.precision.scaler is None:
            if step.clip_grad is not None:
                dispatch_clip_grad(step.model.parameters(), step.clip_grad, mode=step.clip_mode)
            step.optimizer.step()
        if self.guard.skip and not self.guard.weights_finite(self.ctx):
            group.bad = True
            self.guard.skipped_steps += group.size
            if self.ctx.is_primary:
                _LOGGER.warning("epoch %d, step %d: the update made weights non-finite, %s skipped (%d steps this "
                                "epoch)", self.epoch, index, "step" if group.size == 1 else
                                f"accumulation group of {group.size} steps", self.guard.skipped_steps)
            return
        self.num_updates += 1
        if step.model_ema is not None:
            step.model_ema.update(self.ema_source, step=self.num_updates)
        if step.scheduler is not None:
            step.scheduler.step_update(num_updates=self.num_updates)
        self.loss_sum += group.loss
        self.edge_loss_sum += group.edge_loss
        self.images += group.images

    def read_back(self) -> _Reading:
        """One all-reduce and one host copy of this rank's device tallies."""
        ctx = self.ctx
        local = torch.zeros(3 + ctx.world_size, dtype=torch.float64, device=self.loss_sum.device)
        local[0] = self.loss_sum
        local[1] = self.edge_loss_sum
        local[2] = self.images
        local[3 + ctx.rank] = self.guard.first_non_finite
        values = all_reduce_sum(local, ctx).tolist()
        return _Reading(values[0], values[1], int(values[2]), [int(value) for value in values[3:]])

    def stats(self, reading: _Reading, elapsed: float, stopped_at: int) -> TrainStats:
        images = max(reading.images, 1)
        local = (EpochSums(float(self.loss_sum), float(self.edge_loss_sum), self.images, self.guard.skipped_steps)
                 if stopped_at else EpochSums())  # a host read each: only for a stopped epoch
        return TrainStats(loss=reading.loss_sum / images, images=reading.images, num_updates=self.num_updates,
                          lr=self.step.optimizer.param_groups[0]["lr"],
                          images_per_second=reading.images / max(elapsed, 1e-9),
                          skipped_steps=self.guard.skipped_steps,
                          edge_loss=reading.edge_loss_sum / images if self.step.recipe.has_edge_loss else None,
                          stopped_at=stopped_at, local_sums=local, skip_streak=self.guard.streak)


def train_one_epoch(epoch: int, loader: DataLoader | PrefetchLoader, step: TrainStep, ctx: DistributedContext,
                    num_updates: int = 0, log_interval: int = 50, resume_at: ResumePoint | None = None,
                    should_stop: Callable[[int], bool] | None = None, skip_streak: int = 0) -> TrainStats:
    """One pass over this rank's shard, a `TrainStep` per batch. Images (B, 3, H, W), targets (B,) class indices;
    a PrefetchLoader (`vig.trainer.data.prefetch_to_device`) delivers them normalised on the device already.

    `num_updates` counts optimizer steps before this epoch (drives the per-update schedule and EMA warm-up).
    A loss that is NaN or infinite on any rank raises `RunError` on every rank, naming epoch and first
    bad step, at the next log step (every `log_interval`-th and the last): after the bad update and at
    most ``log_interval - 1`` more, and always before this function returns, so its caller never saves
    them. With ``step.skip_nonfinite`` the flag is reduced and read at every step instead, and a bad step is
    skipped on every rank and counted in `TrainStats.skipped_steps`: a step whose loss is not finite, or whose
    update leaves a parameter that is not finite, leaves no trace (`vig.trainer.step_guard`: parameters, buffers
    such as the BatchNorm running statistics, optimizer and scaler state are put back as before the step; no EMA
    or schedule step). `skip_streak` steps skipped in a row before this epoch (`TrainStats.skip_streak` after it)
    reaching ``step.max_consecutive_skips`` stops the run (`RunError`, one line with epoch and step).
    The progress line shows the epoch's mean loss so far over all ranks.

    Gradient accumulation (``step.grad_accum_steps`` N > 1, timm's ``--grad-accum-steps``): the batches form
    groups of N (`vig.trainer.step.accumulation_groups`; the last group of an epoch may be smaller); each batch's
    loss is divided by its group's size before its backward pass, so that a group's summed gradient is the
    gradient of the mean loss over its images, and the optimizer, gradient clipping, EMA and per-update schedule
    step once per group. Under DDP the backward passes before a group's last run in ``no_sync``: gradients are
    all-reduced once per update. With ``skip_nonfinite`` a non-finite loss in a group skips the whole group
    (no update; all its batches count as skipped).

    The loss is ``step.recipe``'s (`vig.trainer.step`): plain, with the edge term (whose unweighted mean is
    `TrainStats.edge_loss`), or a distillation task's.

    `should_stop(step)` (the same answer on every rank) is asked after each accumulation group but the last
    (each step without accumulation); True ends the epoch there, with `TrainStats.stopped_at` = that step and
    `local_sums` = this rank's `EpochSums`. `resume_at` continues such an epoch: the loader's first
    ``resume_at.step`` batches are drawn and dropped (so loader workers and the sampler reach the same state),
    then ``resume_at.restore()`` puts back the generators' states of the stop, and training goes on.
    """
    step.recipe.train(step.model)
    state = _Epoch(epoch, len(loader), step, ctx, num_updates, resume_at, skip_streak)
    progress = EpochProgress(f"train {epoch}", len(loader), ctx.is_primary, log_interval)
    start_step = resume_at.step if resume_at is not None else 0
    reading: _Reading | None = None
    read_at = index = stopped_at = 0
    start = time.perf_counter()

    def fields() -> str:
        return (f"loss {reading.loss_sum / max(reading.images, 1):.4f} "
                f"lr {step.optimizer.param_groups[0]['lr']:.3e} "
                f"{reading.images / max(time.perf_counter() - start, 1e-9):.1f} img/s")

    for index, (images, targets) in enumerate(loader, start=1):
        if index <= start_step:
            if index == start_step:
                resume_at.restore()
            continue
        ended_group = state.train_batch(index, images, targets)
        if progress.due(index):
            reading, read_at = state.read_back(), index
            _stop_if_non_finite(reading, epoch, index, len(loader), ctx)
        progress.update(index, fields)
        fault_point("train-step", epoch, index)
        if should_stop is not None and ended_group and index < len(loader) and should_stop(index):
            stopped_at = index
            break
    elapsed = time.perf_counter() - start
    if reading is None or read_at != index:  # an empty loader, or one that ended before its len()
        reading = state.read_back()
        _stop_if_non_finite(reading, epoch, index, len(loader), ctx)
    return state.stats(reading, elapsed, stopped_at)


@dataclass
class EvalStats:
    """Validation figures over the whole split: mean cross-entropy, top-1 / top-5 in percent, image count."""

    loss: float
    top1: float
    top5: float
    count: int


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader | PrefetchLoader,
    ctx: DistributedContext,
    precision: Precision,
    tta: bool = False,
    channels_last: bool = False,
    log_interval: int = 50,
    title: str = "eval",
    model_dtype: torch.dtype | None = None,
) -> EvalStats:
    """Cross-entropy and top-k accuracy of `model` on every image of the loader's split (each exactly once).

    With `tta`, logits (B, classes) are the mean of the image's and its horizontal flip's logits
    (`vig.tta.predict_flip_tta`). Sums stay on the device; the progress line (primary rank, log steps
    only) shows the running figures of rank 0's shard, the result is reduced over all ranks. `model_dtype`
    (--model-dtype) casts the images to the model's floating dtype.
    """
    model.eval()
    shown = f"{title} (rank 0's share)" if ctx.distributed else title
    progress = EpochProgress(shown, len(loader), ctx.is_primary, log_interval)
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, top-1 correct, top-5 correct
    count = 0

    def fields() -> str:
        loss, top1, _ = sums.tolist()
        return f"loss {loss / max(count, 1):.4f} top1 {100 * top1 / max(count, 1):.2f}"

    for step, (images, targets) in enumerate(loader, start=1):
        images, targets = _to_device(images, targets, ctx.device, channels_last, model_dtype)
        with precision.autocast():
            logits = predict_flip_tta(model, images) if tta else model(images)
        if logits.dtype != torch.float64:  # float64 (--model-dtype float64) keeps its precision in the loss
            logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        count += targets.shape[0]
        progress.update(step, fields)
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    totals[:3] = sums
    totals[3] = count
    loss_sum, top1, top5, total = all_reduce_sum(totals, ctx).tolist()
    if total == 0:
        return EvalStats(loss=float("nan"), top1=0.0, top5=0.0, count=0)
    return EvalStats(loss=loss_sum / total, top1=100 * top1 / total, top5=100 * top5 / total, count=int(total))
