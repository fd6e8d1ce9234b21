"""Training and validation loops, mixed precision, and per-epoch progress display.

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
``edge_loss_weight`` x that term: each rank's edges link the images of its own batch only (features are
not gathered across ranks). With mixup / cutmix the edge target is Y Y^T of the mixed
label vectors with the label smoothing undone.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, TextIO

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.loader import PrefetchLoader
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, unwrap_model
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vig.errors import RunError
from vig.models.training_api import EDGE_LOSS, ExtraLosses
from vig.trainer.distributed import DistributedContext, all_reduce_sum
from vig.trainer.faults import fault_active, fault_point
from vig.trainer.step_guard import StepGuard
from vig.tta import predict_flip_tta

_LOGGER = logging.getLogger(__name__)


@dataclass
class Precision:
    """Autocast settings: dtype None means float32; scaler only for float16 on CUDA."""

    device_type: str
    dtype: torch.dtype | None
    scaler: NativeScaler | None

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


def _cpu_bfloat16_works() -> bool:
    probe = nn.Conv2d(3, 4, 3)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = probe(torch.randn(1, 3, 5, 5))
        return out.dtype == torch.bfloat16
    except RuntimeError as err:
        _LOGGER.debug("bfloat16 autocast probe failed: %s", err)
        return False


def resolve_precision(amp: bool, amp_dtype: str | None, device: torch.device) -> Precision:
    """bfloat16 autocast where supported, float16 + gradient scaler otherwise (CUDA); CPU: bfloat16 or float32.

    Args:
        amp: --amp (an explicit --amp-dtype also turns AMP on).
        amp_dtype: None (choose), 'bfloat16' or 'float16'.
        device: the training device.
    """
    if not amp and amp_dtype is None:
        return Precision(device.type, None, None)
    if device.type == "cuda":
        if amp_dtype is None:
            amp_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        dtype = getattr(torch, amp_dtype)
        scaler = NativeScaler(device="cuda") if dtype == torch.float16 else None
        _LOGGER.info("AMP: %s autocast on CUDA%s", amp_dtype, " with gradient scaler" if scaler else "")
        return Precision("cuda", dtype, scaler)
    if amp_dtype == "float16":
        _LOGGER.warning("AMP: float16 autocast is not used on CPU; using bfloat16 instead")
    if _cpu_bfloat16_works():
        _LOGGER.info("AMP: bfloat16 autocast on CPU")
        return Precision("cpu", torch.bfloat16, None)
    _LOGGER.warning("AMP: bfloat16 autocast is not available on this CPU; falling back to float32")
    return Precision("cpu", None, None)


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


@dataclass
class TrainStats:
    """Epoch figures over all ranks: mean loss per image, images seen, updates so far, last lr, images/s,
    the steps skipped for a non-finite loss (`skip_nonfinite`) and the mean edge loss (unweighted BCE; None
    without an edge loss)."""

    loss: float
    images: int
    num_updates: int
    lr: float
    images_per_second: float
    skipped_steps: int = 0
    edge_loss: float | None = None
    stopped_at: int = 0
    local_sums: tuple[float, float, int, int] = (0.0, 0.0, 0, 0)
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


def accumulation_groups(num_batches: int, accum_steps: int) -> list[int]:
    """Sizes of the consecutive accumulation groups of an epoch of ``num_batches`` batches: groups of
    ``accum_steps`` batches, the last one smaller when ``accum_steps`` does not divide the epoch (one optimizer
    update per group, as timm's loop)."""
    full, rest = divmod(num_batches, accum_steps)
    return [accum_steps] * full + ([rest] if rest else [])


@dataclass
class _Reading:
    """Epoch figures so far, summed over ranks: loss * batch, edge loss * batch, images, and for each rank
    the first step whose loss was not finite (0: none)."""

    loss_sum: float
    edge_loss_sum: float
    images: int
    first_non_finite: list[int]


def _read_back(loss_sum: torch.Tensor, edge_loss_sum: torch.Tensor, first_non_finite: torch.Tensor, images: int,
               ctx: DistributedContext) -> _Reading:
    """One all-reduce and one host copy of this rank's device tallies (0-dim float64 tensors)."""
    local = torch.zeros(3 + ctx.world_size, dtype=torch.float64, device=loss_sum.device)
    local[0] = loss_sum
    local[1] = edge_loss_sum
    local[2] = images
    local[3 + ctx.rank] = first_non_finite
    values = all_reduce_sum(local, ctx).tolist()
    return _Reading(values[0], values[1], int(values[2]), [int(value) for value in values[3:]])


def _stop_if_non_finite(reading: _Reading, epoch: int, step: int, total: int, ctx: DistributedContext) -> None:
    bad = [first for first in reading.first_non_finite if first > 0]
    if not bad:
        return
    where = f" (on {len(bad)} of {ctx.world_size} ranks)" if ctx.distributed else ""
    raise RunError(f"non-finite training loss at epoch {epoch}, step {min(bad)} of {total}{where}, "
                   f"found at step {step}; the checkpoints keep the last finished epoch "
                   "(lower --lr, use --clip-grad, or pass --skip-nonfinite)")


def train_one_epoch(
    epoch: int,
    model: nn.Module,
    loader: DataLoader | PrefetchLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ctx: DistributedContext,
    precision: Precision,
    num_updates: int,
    scheduler=None,
    mixup: Mixup | None = None,
    model_ema: ModelEmaV3 | None = None,
    clip_grad: float | None = None,
    clip_mode: str = "norm",
    channels_last: bool = False,
    log_interval: int = 50,
    skip_nonfinite: bool = False,
    edge_loss_weight: float | None = None,
    grad_accum_steps: int = 1,
    task: nn.Module | None = None,
    model_dtype: torch.dtype | None = None,
    ema_source: nn.Module | None = None,
    resume_at: tuple[int, tuple[float, float, int, int], Callable[[], None]] | None = None,
    should_stop: Callable[[int], bool] | None = None,
    skip_streak: int = 0,
    max_consecutive_skips: int = 5,
) -> TrainStats:
    """One pass over this rank's shard. Images (B, 3, H, W), targets (B,) class indices; a PrefetchLoader
    (`vig.trainer.data.prefetch_to_device`) delivers them normalised on the device already.

    `num_updates` counts optimizer steps before this epoch (drives the per-update schedule and EMA warm-up).
    A loss that is NaN or infinite on any rank raises `RunError` on every rank, naming epoch and first
    bad step, at the next log step (every `log_interval`-th and the last): after the bad update and at
    most ``log_interval - 1`` more, and always before this function returns, so its caller never saves
    them. With `skip_nonfinite` the flag is reduced and read at every step instead, and a bad step is
    skipped on every rank and counted in `TrainStats.skipped_steps`: a step whose loss is not finite, or
    whose update leaves a parameter that is not finite, leaves no trace (`vig.trainer.step_guard`:
    parameters, buffers such as the BatchNorm running statistics, optimizer and scaler state are put back
    as before the step; no EMA or schedule step). `skip_streak` steps skipped in a row before this epoch
    (`TrainStats.skip_streak` after it) reaching `max_consecutive_skips` stops the run (`RunError`, one
    line with epoch and step).
    The progress line shows the epoch's mean loss so far over all ranks.

    Gradient accumulation (`grad_accum_steps` N > 1, timm's ``--grad-accum-steps``): the batches form
    groups of N (`accumulation_groups`; the last group of an epoch may be smaller); each batch's loss is
    divided by its group's size before its backward pass, so that a group's summed gradient is the gradient
    of the mean loss over its images, and the optimizer, gradient clipping, EMA and per-update schedule step
    once per group. Under DDP the backward passes before a group's last run in ``no_sync``: gradients are
    all-reduced once per update. With `skip_nonfinite` a non-finite loss in a group skips the whole group
    (no update; all its batches count as skipped).

    With `edge_loss_weight` (a model with the `ExtraLosses` ``edge`` term) the model is called as
    ``model(images, **extra_forward_kwargs)`` -> (logits, extras) (through DDP's forward) and the loss is the
    classification loss plus ``edge_loss_weight`` x the model's ``extra_losses(extras, targets, smoothing)``
    edge term (BCE(edge_sim (B, B), edge targets of this rank's batch), float32, outside autocast); its
    unweighted mean is `TrainStats.edge_loss`.

    With `task` (a `timm.task` distillation task whose trainable module is `model`) the loss is the task's
    ``task(images, targets)["loss"]`` (task loss and distillation loss, weighted); `loss_fn` is then unused.
    `model_dtype` (--model-dtype) casts the images to the model's floating dtype. `model_ema` follows
    `ema_source` (default: `model` without its DDP wrapper; with feature distillation, the student alone).

    `should_stop(step)` (the same answer on every rank) is asked after each accumulation group but the last
    (each step without accumulation); True ends
    the epoch there, with `TrainStats.stopped_at` = that step and `local_sums` = this rank's (loss sum, edge
    loss sum, images, skipped steps). ``resume_at = (step, local_sums, restore)`` continues such an epoch:
    the loader's first `step` batches are drawn and dropped (so loader workers and the sampler reach the
    same state), then `restore()` puts back the generators' states of the stop, and training goes on at
    step + 1.
    """
    model.train()
    if task is not None:
        task.train()
    unwrapped = ema_source if ema_source is not None else unwrap_model(model)
    extra_loss_model = unwrap_model(model)
    if edge_loss_weight is not None and not isinstance(extra_loss_model, ExtraLosses):
        raise TypeError(f"edge_loss_weight needs a model with extra loss terms, got {type(extra_loss_model).__name__}")
    guard = StepGuard(unwrap_model(model), optimizer, precision.scaler) if skip_nonfinite else None
    progress = EpochProgress(f"train {epoch}", len(loader), ctx.is_primary, log_interval)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    edge_loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    smoothing = mixup.label_smoothing if mixup is not None else 0.0  # inside the mixed targets
    first_non_finite = torch.zeros((), dtype=torch.float64, device=ctx.device)
    groups = accumulation_groups(len(loader), grad_accum_steps)
    group_index = in_group = 0
    group_bad = False
    group_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    group_edge_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    group_images = 0
    can_defer_sync = ctx.distributed and hasattr(model, "no_sync")
    images_seen = 0
    skipped_steps = 0
    start_step = 0
    if resume_at is not None:
        start_step, (loss_start, edge_start, images_seen, skipped_steps), restore = resume_at
        loss_sum += loss_start
        edge_loss_sum += edge_start
        group_index = start_step // grad_accum_steps  # a stop falls on a group boundary (see should_stop)
    reading: _Reading | None = None
    read_at = step = stopped_at = 0
    start = time.perf_counter()

    def fields() -> str:
        return (f"loss {reading.loss_sum / max(reading.images, 1):.4f} lr {optimizer.param_groups[0]['lr']:.3e} "
                f"{reading.images / max(time.perf_counter() - start, 1e-9):.1f} img/s")

    for step, (images, targets) in enumerate(loader, start=1):
        if step <= start_step:
            if step == start_step:
                restore()
            continue
        group_size = groups[group_index] if group_index < len(groups) else 1  # past len(): one-batch groups
        in_group += 1
        last_in_group = in_group == group_size
        if in_group == 1:
            if guard is not None:  # a group that will be skipped must leave no trace, its forwards' included
                guard.save()
            optimizer.zero_grad(set_to_none=True)
        if group_bad:
            skipped_steps += 1
        else:
            images, targets = _to_device(images, targets, ctx.device, channels_last, model_dtype)
            if mixup is not None:
                images, targets = mixup(images, targets)
            defer_sync = can_defer_sync and not last_in_group
            with model.no_sync() if defer_sync else contextlib.nullcontext():
                with precision.autocast():
                    if task is not None:
                        loss = task(images, targets)["loss"]
                    elif edge_loss_weight is None:
                        loss = loss_fn(model(images), targets)
                    else:
                        logits, extras = model(images, **extra_loss_model.extra_forward_kwargs)
                        loss = loss_fn(logits, targets)
                if edge_loss_weight is not None:
                    edge_loss = extra_loss_model.extra_losses(extras, targets, smoothing)[EDGE_LOSS]
                    loss = loss + edge_loss_weight * edge_loss
                if fault_active("nan-loss", epoch, step, ctx.rank):  # test-only (vig.trainer.faults)
                    loss = loss * float("nan")
                non_finite = ~torch.isfinite(loss.detach())
                if skip_nonfinite and all_reduce_sum(non_finite.double(), ctx).item() > 0:
                    group_bad = True
                    skipped_steps += in_group
                    guard.restore()
                    if ctx.is_primary:
                        _LOGGER.warning("epoch %d, step %d: non-finite loss, %s skipped (%d steps this epoch)",
                                        epoch, step, "step" if group_size == 1 else
                                        f"accumulation group of {group_size} steps", skipped_steps
                                        + group_size - in_group)
                else:
                    if not skip_nonfinite:
                        first_non_finite = torch.where(non_finite & (first_non_finite == 0), step, first_non_finite)
                    scaled = loss / group_size if group_size > 1 else loss
                    if precision.scaler is not None:
                        precision.scaler(scaled, optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                                         parameters=model.parameters(), need_update=last_in_group)
                    else:
                        scaled.backward()
                    batch = images.shape[0]
                    group_loss += loss.detach().double() * batch
                    if edge_loss_weight is not None:
                        group_edge_loss += edge_loss.detach().double() * batch
                    group_images += batch
            if last_in_group and not group_bad:
                if precision.scaler is None:
                    if clip_grad is not None:
                        dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
                    optimizer.step()
                if guard is not None and not guard.weights_finite(ctx):
                    guard.restore()
                    group_bad = True
                    skipped_steps += group_size
                    if ctx.is_primary:
                        _LOGGER.warning("epoch %d, step %d: the update made weights non-finite, %s skipped (%d steps "
                                        "this epoch)", epoch, step, "step" if group_size == 1 else
                                        f"accumulation group of {group_size} steps", skipped_steps)
            if last_in_group and not group_bad:
                num_updates += 1
                if model_ema is not None:
                    model_ema.update(unwrapped, step=num_updates)
                if scheduler is not None:
                    scheduler.step_update(num_updates=num_updates)
                loss_sum += group_loss
                edge_loss_sum += group_edge_loss
                images_seen += group_images
        if last_in_group:
            if guard is not None:
                skip_streak = skip_streak + group_size if group_bad else 0
                if skip_streak >= max_consecutive_skips:
                    raise RunError(f"--skip-nonfinite: {skip_streak} steps skipped in a row (non-finite loss or "
                                   f"weights), stopped at epoch {epoch}, step {step} of {len(loader)}; the "
                                   f"checkpoints keep the last finished epoch (lower --lr or use --clip-grad; "
                                   f"--max-consecutive-skips {max_consecutive_skips})")
            if group_bad:
                optimizer.zero_grad(set_to_none=True)
            group_index, in_group, group_bad, group_images = group_index + 1, 0, False, 0
            group_loss.zero_()
            group_edge_loss.zero_()
        if progress.due(step):
            reading, read_at = _read_back(loss_sum, edge_loss_sum, first_non_finite, images_seen, ctx), step
            _stop_if_non_finite(reading, epoch, step, len(loader), ctx)
        progress.update(step, fields)
        fault_point("train-step", epoch, step)
        if should_stop is not None and last_in_group and step < len(loader) and should_stop(step):
            stopped_at = step
            break
    elapsed = time.perf_counter() - start
    if reading is None or read_at != step:  # an empty loader, or one that ended before its len()
        reading = _read_back(loss_sum, edge_loss_sum, first_non_finite, images_seen, ctx)
        _stop_if_non_finite(reading, epoch, step, len(loader), ctx)
    return TrainStats(loss=reading.loss_sum / max(reading.images, 1), images=reading.images,
                      num_updates=num_updates, lr=optimizer.param_groups[0]["lr"],
                      images_per_second=reading.images / max(elapsed, 1e-9), skipped_steps=skipped_steps,
                      edge_loss=reading.edge_loss_sum / max(reading.images, 1) if edge_loss_weight is not None
                      else None, stopped_at=stopped_at,
                      local_sums=(float(loss_sum), float(edge_loss_sum), images_seen, skipped_steps) if stopped_at
                      else (0.0, 0.0, 0, 0), skip_streak=skip_streak)


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
