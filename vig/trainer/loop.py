"""The loop of a training run: epochs, their validation, the schedule's epoch steps, checkpoints and stops.

`train` sets a run up (`vig.trainer.setup`), restores --resume (`vig.trainer.resume`), then runs each epoch:
`run_epoch` trains it (`vig.trainer.engine.train_one_epoch`) and validates it, `record_epoch` logs it and saves
its checkpoints and summary row (`vig.trainer.saver`). A stop signal (`vig.trainer.signals`) ends the loop with
a resumable checkpoint: in mid-epoch interrupted.pth.tar, between epochs last.pth.tar.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from timm.utils import distribute_bn, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vig.errors import UsageError
from vig.trainer.config import TrainConfig
from vig.trainer.curves import write_curves
from vig.trainer.data import take_corrupt_count
from vig.trainer.distill import PROJECTION_KEY, projection_state
from vig.trainer.distributed import DistributedContext, all_gather_objects, all_reduce_sum, broadcast_object
from vig.trainer.engine import EpochSums, EvalStats, ResumePoint, TrainStats, train_one_epoch, validate
from vig.trainer.explog import ExperimentLoggers
from vig.trainer.faults import fault_point
from vig.trainer.resume import capture_generators, remove_interrupted, restore_generators, resume_training, \
    write_interrupted
from vig.trainer.saver import CURVES_NAME, LAST_NAME, SUMMARY_NAME, CheckpointSaver, append_summary, write_args_yaml
from vig.trainer.schedule import scheduler_state
from vig.trainer.setup import TrainingRun, seed_everything, set_up_training, training_step
from vig.trainer.signals import Interrupted, catch_stop_signals, signal_name, stop_requested
from vig.trainer.threads import set_cpu_threads

_LOGGER = logging.getLogger(__name__)


def prepare_loop(run: TrainingRun, ctx: DistributedContext) -> None:
    """DDP / torch.compile wrappers, the `TrainStep`, the checkpoint saver, args.yaml and the experiment logs
    (primary rank).

    With distillation the task wraps its trainable module in DDP (the teacher stays unwrapped) and the
    student (`run.model`) is validated and saved unwrapped."""
    config = run.config
    device_ids = [ctx.device] if ctx.device.type == "cuda" else None
    if run.task is not None:
        if config.model.torchcompile:
            raise UsageError("--torchcompile is not supported with --kd-model-name")
        if ctx.distributed:
            run.task.prepare_distributed(device_ids=device_ids)
        train_module = run.task.get_trainable_module()
    else:
        if ctx.distributed:
            run.model = DistributedDataParallel(run.model, device_ids=device_ids)
        if config.model.torchcompile:
            run.model = torch.compile(run.model, backend=config.model.torchcompile)
        train_module = run.model
    run.step = training_step(run, train_module)
    if ctx.is_primary:
        run.saver = CheckpointSaver(run.folder, config.run_folder.checkpoint_hist,
                                    decreasing=config.loop.eval_metric == "loss")
        write_args_yaml(run.folder, config.to_flags())
        _LOGGER.info("output: %s; %d training / %d validation images, %d classes, %d process(es), "
                     "%d epochs from epoch %d", run.folder, len(run.train_set), len(run.val_set), run.num_classes,
                     ctx.world_size, run.num_epochs, run.start_epoch)
    run.loggers = ExperimentLoggers(config.logging, config.to_flags(), run.folder.name, ctx.is_primary)


@dataclass
class EpochResult:
    """One epoch's training and validation figures, its summary row and the metric that ranks checkpoints."""

    train: TrainStats
    eval: EvalStats
    row: dict[str, Any]
    metric: float
    shard_images: list[int]
    corrupt: torch.Tensor


def _resume_point(run: TrainingRun, ctx: DistributedContext, epoch: int) -> ResumePoint | None:
    """Where a run stopped in mid-epoch continues ``epoch`` (None for an epoch that starts afresh); consumed."""
    if run.position is None or run.position["epoch"] != epoch:
        return None
    mine = run.position["ranks"][ctx.rank]
    return ResumePoint(run.position["step"], EpochSums.from_list(mine["sums"]),
                       lambda: restore_generators(mine["generators"]))


def run_epoch(run: TrainingRun, ctx: DistributedContext, epoch: int,
              num_updates: int) -> EpochResult | TrainStats:
    """Train one epoch, synchronise BatchNorm statistics, validate (model and EMA), step the schedule.

    An epoch that --val-interval leaves out (not every N-th, not the last) is not validated: it returns
    its TrainStats alone, after stepping the schedule without a metric, as timm's loop does."""
    config = run.config
    # every generator (augmentation, mixup, drop-path, loader workers) and the sampler start each epoch
    # from (seed, epoch, rank) alone, so a resumed run repeats the uninterrupted run's randomness
    seed_everything(config.loop.seed, epoch, ctx.rank)
    run.sampler.set_epoch(epoch)
    resume_at = _resume_point(run, ctx, epoch)
    if resume_at is not None:
        num_updates = run.position["num_updates"]
        run.position = None
    stats = train_one_epoch(epoch, run.train_loader, run.step, ctx, num_updates, log_interval=config.loop.log_interval,
                            resume_at=resume_at, should_stop=lambda step: _agreed_stop(ctx) > 0,
                            skip_streak=run.skip_streak)
    run.skip_streak = stats.skip_streak
    if stats.stopped_at:
        raise _stop_in_epoch(run, ctx, epoch, stats)
    shard_images = all_gather_objects(len(run.sampler), ctx)
    if ctx.distributed:
        distribute_bn(run.model, ctx.world_size, reduce=True)
        if run.model_ema is not None:  # the EMA follows each rank's own batch statistics: average them too
            distribute_bn(run.model_ema, ctx.world_size, reduce=True)
    if (epoch + 1) % config.loop.val_interval != 0 and epoch + 1 != run.num_epochs:
        if ctx.is_primary:
            _LOGGER.info("epoch %d: train loss %.4f; not validated or saved (--val-interval %d)", epoch, stats.loss,
                         config.loop.val_interval)
        run.scheduler.step(epoch + 1, None)
        return stats
    eval_stats, row, metric = _validate_epoch(run, ctx, epoch, stats)
    run.scheduler.step(epoch + 1, metric)
    corrupt = all_reduce_sum(torch.tensor([take_corrupt_count(run.train_set), take_corrupt_count(run.val_set)],
                                          dtype=torch.float64), ctx)
    return EpochResult(stats, eval_stats, row, metric, shard_images, corrupt)


def _validate_epoch(run: TrainingRun, ctx: DistributedContext, epoch: int,
                    stats: TrainStats) -> tuple[EvalStats, dict[str, Any], float]:
    """Validate the model (and the EMA): the model's figures, the epoch's summary row and the metric that ranks
    checkpoints (the EMA's with --model-ema)."""
    config = run.config
    eval_stats = validate(run.model, run.val_loader, ctx, run.precision, tta=config.loop.flip_tta,
                          channels_last=config.model.channels_last, log_interval=config.loop.log_interval,
                          model_dtype=run.model_dtype)
    row: dict[str, Any] = {"epoch": epoch, "train_loss": stats.loss, "eval_loss": eval_stats.loss,
                           "eval_top1": eval_stats.top1, "eval_top5": eval_stats.top5, "lr": stats.lr}
    if stats.edge_loss is not None:
        row["train_edge_loss"] = stats.edge_loss
    metric = getattr(eval_stats, config.loop.eval_metric)
    if run.model_ema is not None:
        ema_stats = validate(run.model_ema.module, run.val_loader, ctx, run.precision, tta=config.loop.flip_tta,
                             channels_last=config.model.channels_last, log_interval=config.loop.log_interval,
                             title="eval EMA", model_dtype=run.model_dtype)
        row.update(ema_eval_loss=ema_stats.loss, ema_eval_top1=ema_stats.top1, ema_eval_top5=ema_stats.top5)
        metric = getattr(ema_stats, config.loop.eval_metric)
    return eval_stats, row, metric


def _agreed_stop(ctx: DistributedContext) -> int:
    """The stop signal any rank has received (0: none); the same answer on every rank (one all-reduce)."""
    if not ctx.distributed:
        return stop_requested()
    flags = torch.zeros(ctx.world_size, dtype=torch.float64, device=ctx.device)
    flags[ctx.rank] = stop_requested()
    return next((int(flag) for flag in all_reduce_sum(flags, ctx).tolist() if flag > 0), 0)


def _training_state(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """What last.pth.tar holds for `epoch` (without its metric and summary row)."""
    config = run.config
    state = {"epoch": epoch, "arch": config.model.model, "state_dict": unwrap_model(run.model).state_dict(),
             "state_dict_ema": run.model_ema.module.state_dict() if run.model_ema is not None else None,
             "optimizer": run.optimizer.state_dict(), "scheduler": scheduler_state(run.scheduler),
             "args": config.to_flags(), "version": 2}
    if run.precision.scaler is not None:
        state[run.precision.scaler.state_dict_key] = run.precision.scaler.state_dict()
    projection = projection_state(run.task)
    if projection is not None:
        state[PROJECTION_KEY] = projection
    return state


def _stop_in_epoch(run: TrainingRun, ctx: DistributedContext, epoch: int,
                   stats: TrainStats) -> Interrupted:
    """Write interrupted.pth.tar (primary rank, with every rank's generators and sums); the Interrupted to raise."""
    config = run.config
    signum = _agreed_stop(ctx)
    ranks = all_gather_objects({"generators": capture_generators(), "sums": stats.local_sums.as_list()}, ctx)
    message: str | None = None
    if ctx.is_primary:
        state = _training_state(run, epoch - 1)
        state["position"] = {"epoch": epoch, "step": stats.stopped_at, "num_updates": stats.num_updates,
                             "ranks": ranks}
        path = write_interrupted(run.folder, state)
        message = (f"{signal_name(signum)}: stopped after step {stats.stopped_at} of {len(run.train_loader)} of "
                   f"epoch {epoch}; saved {path}; the same command with --resume auto continues there")
        _LOGGER.warning("%s", message)
    return Interrupted(broadcast_object(message, ctx), signum)


def record_epoch(run: TrainingRun, ctx: DistributedContext, epoch: int,
                 result: EpochResult) -> None:
    """Primary rank: log the epoch, append its summary row, save checkpoints, redraw the curves."""
    config = run.config
    if run.saver is None:
        return
    stats, eval_stats = result.train, result.eval
    if stats.skipped_steps:
        _LOGGER.warning("epoch %d: skipped %d of %d steps for a non-finite loss or update (--skip-nonfinite)",
                        epoch, stats.skipped_steps, len(run.train_loader))
    if result.corrupt.sum() > 0:
        _LOGGER.warning("epoch %d: skipped %d corrupt training and %d corrupt validation image reads "
                        "(--skip-corrupt)", epoch, int(result.corrupt[0]), int(result.corrupt[1]))
    left_out = sum(result.shard_images) - stats.images - stats.skipped_steps * config.data.batch_size * ctx.world_size
    _LOGGER.info("epoch %d: train loss %.4f%s = mean over the %d images trained in this epoch by %d process(es)%s, "
                 "%.1f img/s; validation %d images: loss %.4f top1 %.2f top5 %.2f%s", epoch, stats.loss,
                 f" (edge loss {stats.edge_loss:.4f}, weight {run.edge_loss_weight:g})" if stats.edge_loss is not None
                 else "",
                 stats.images, ctx.world_size,
                 f" ({left_out} more in incomplete last batches, not trained)" if left_out > 0 else "",
                 stats.images_per_second, eval_stats.count, eval_stats.loss, eval_stats.top1, eval_stats.top5,
                 f"; EMA top1 {result.row['ema_eval_top1']:.2f}" if run.model_ema is not None else "")
    state = {**_training_state(run, epoch), "metric": result.metric, "summary_row": result.row}
    # the checkpoint first: a kill before the summary leaves a row that a restart restores from it
    best_epoch, best_metric = run.saver.save(state, epoch, result.metric)
    append_summary(run.folder, result.row)
    fault_point("after-summary", epoch)
    if run.loggers is not None:
        run.loggers.log(result.row)
    _LOGGER.info("best %s %s at epoch %d", config.loop.eval_metric,
                 f"{best_metric:.4f}" if config.loop.eval_metric == "loss" else f"{best_metric:.2f}", best_epoch)
    write_curves(run.folder / SUMMARY_NAME, run.folder / CURVES_NAME)
    fault_point("after-curves", epoch)
    remove_interrupted(run.folder)


def train(config: TrainConfig, ctx: DistributedContext) -> tuple[nn.Module, nn.Module | None]:
    """Full training run with per-epoch validation, summary.csv and checkpoints in output/experiment.

    Returns this rank's final model (without its DDP / compile wrappers) and EMA module (None without
    --model-ema).
    """
    training = set_up_training(config, ctx)
    resume_training(training, ctx)
    prepare_loop(training, ctx)
    if ctx.device.type == "cpu":  # after the checks of the user's input, whose errors stay the only line
        set_cpu_threads(config.data.workers)
    num_updates = training.start_epoch * training.updates_per_epoch
    try:
        with catch_stop_signals():
            for epoch in range(training.start_epoch, training.num_epochs):
                result = run_epoch(training, ctx, epoch, num_updates)
                if isinstance(result, TrainStats):
                    num_updates = result.num_updates
                    continue
                num_updates = result.train.num_updates
                fault_point("epoch-end", epoch)
                record_epoch(training, ctx, epoch, result)
                signum = _agreed_stop(ctx)
                if signum and epoch + 1 < training.num_epochs:  # arrived during validation or saving
                    message = (f"{signal_name(signum)}: stopped after epoch {epoch}, saved in "
                               f"{training.folder / LAST_NAME}; the same command with --resume auto continues there")
                    if ctx.is_primary:
                        _LOGGER.warning("%s", message)
                    raise Interrupted(message, signum)
    finally:
        if training.loggers is not None:
            training.loggers.close()
    ema = training.model_ema.module if training.model_ema is not None else None
    return unwrap_model(training.model), ema
