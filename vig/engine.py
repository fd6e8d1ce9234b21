"""Training and validation loops, mixed precision, and per-epoch progress display.

Loss and accuracy sums are reduced over ranks, so every rank returns the global figures;
only the primary rank displays progress. Whether a training loss is finite is decided over all
ranks at every step, so every rank stops (or skips the step) together.
"""
from __future__ import annotations

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
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader

from vig.distributed import DistributedContext, all_reduce_sum
from vig.errors import RunError
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
    """Progress of one loop on the primary rank: a bar on a terminal, log lines every `log_interval` otherwise."""

    def __init__(self, title: str, total: int, enabled: bool, log_interval: int,
                 stream: TextIO | None = None) -> None:
        self.title = title
        self.total = total
        self.enabled = enabled
        self.log_interval = log_interval
        self.stream = stream or sys.stderr
        self.interactive = enabled and self.stream.isatty()

    def update(self, step: int, fields: str) -> None:
        """Report that `step` (1-based) of `total` batches is done; `fields` e.g. 'loss 1.23 lr 1e-3'."""
        if not self.enabled:
            return
        if self.interactive:
            width = 24
            filled = int(width * step / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            self.stream.write(f"\r{self.title} [{bar}] {step}/{self.total} {fields}")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step % self.log_interval == 0 or step == self.total:
            _LOGGER.info("%s %d/%d %s", self.title, step, self.total, fields)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@dataclass
class TrainStats:
    """Epoch figures over all ranks: mean loss per image, images seen, updates so far, last lr, images/s,
    and the steps skipped for a non-finite loss (`skip_nonfinite`)."""

    loss: float
    images: int
    num_updates: int
    lr: float
    images_per_second: float
    skipped_steps: int = 0


def _to_device(images: torch.Tensor, targets: torch.Tensor, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


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
) -> TrainStats:
    """One pass over this rank's shard. Images (B, 3, H, W), targets (B,) class indices; a PrefetchLoader
    (`vig.data.prefetch_to_device`) delivers them normalised on the device already.

    `num_updates` counts optimizer steps before this epoch (drives the per-update schedule and EMA warm-up).
    A loss that is NaN or infinite on any rank raises `RunError` naming epoch and step before anything
    is updated; with `skip_nonfinite` the step is skipped instead (no update, no EMA / schedule step)
    and counted in `TrainStats.skipped_steps`.
    """
    model.train()
    unwrapped = unwrap_model(model)
    progress = EpochProgress(f"train {epoch}", len(loader), ctx.is_primary, log_interval)
    loss_sum = torch.zeros((), dtype=torch.float64)
    images_seen = 0
    skipped_steps = 0
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader, start=1):
        images, targets = _to_device(images, targets, ctx.device, channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with precision.autocast():
            loss = loss_fn(model(images), targets)
        local_non_finite = torch.tensor(0.0 if bool(torch.isfinite(loss.detach())) else 1.0, dtype=torch.float64)
        bad = all_reduce_sum(local_non_finite, ctx).item()  # ranks whose loss is not finite
        if bad > 0:
            if not skip_nonfinite:
                where = f" (on {int(bad)} of {ctx.world_size} ranks)" if ctx.distributed else ""
                raise RunError(f"non-finite training loss at epoch {epoch}, step {step} of {len(loader)}{where}; "
                               "the checkpoints keep the last finished epoch "
                               "(lower --lr, use --clip-grad, or pass --skip-nonfinite)")
            skipped_steps += 1
            if ctx.is_primary:
                _LOGGER.warning("epoch %d, step %d: non-finite loss, step skipped (%d this epoch)",
                                epoch, step, skipped_steps)
            continue
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                             parameters=model.parameters())
        else:
            loss.backward()
            if clip_grad is not None:
                dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
            optimizer.step()
        num_updates += 1
        if model_ema is not None:
            model_ema.update(unwrapped, step=num_updates)
        if scheduler is not None:
            scheduler.step_update(num_updates=num_updates)
        batch = images.shape[0]
        loss_sum += loss.detach().double().cpu() * batch
        images_seen += batch
        elapsed = time.perf_counter() - start
        lr = optimizer.param_groups[0]["lr"]
        progress.update(step, f"loss {loss.item():.4f} lr {lr:.3e} "
                              f"{images_seen * ctx.world_size / max(elapsed, 1e-9):.1f} img/s")
    elapsed = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(images_seen), dtype=torch.float64)]), ctx)
    total_images = int(totals[1].item())
    return TrainStats(loss=float(totals[0] / max(total_images, 1)), images=total_images, num_updates=num_updates,
                      lr=optimizer.param_groups[0]["lr"], images_per_second=total_images / max(elapsed, 1e-9),
                      skipped_steps=skipped_steps)


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
) -> EvalStats:
    """Cross-entropy and top-k accuracy of `model` on every image of the loader's split (each exactly once).

    With `tta`, logits (B, classes) are the mean of the image's and its horizontal flip's logits
    (`vig.tta.predict_flip_tta`).
    """
    model.eval()
    progress = EpochProgress(title, len(loader), ctx.is_primary, log_interval)
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 correct, top-5 correct, count
    for step, (images, targets) in enumerate(loader, start=1):
        images, targets = _to_device(images, targets, ctx.device, channels_last)
        with precision.autocast():
            logits = predict_flip_tta(model, images) if tta else model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        sums += torch.tensor([
            F.cross_entropy(logits, targets, reduction="sum").item(),
            hits[:, 0].sum().item(),
            hits.any(dim=1).sum().item(),
            targets.shape[0],
        ], dtype=torch.float64)
        progress.update(step, f"loss {sums[0] / sums[3]:.4f} top1 {100 * sums[1] / sums[3]:.2f}")
    sums = all_reduce_sum(sums, ctx)
    count = int(sums[3].item())
    if count == 0:
        return EvalStats(loss=float("nan"), top1=0.0, top5=0.0, count=0)
    return EvalStats(loss=float(sums[0] / count), top1=float(100 * sums[1] / count),
                     top5=float(100 * sums[2] / count), count=count)
