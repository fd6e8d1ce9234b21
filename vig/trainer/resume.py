"""Mid-epoch checkpoints of a run stopped by a signal, and the choice of what ``--resume auto`` continues.

A stop after step s of epoch e writes interrupted.pth.tar: last.pth.tar's fields (weights, EMA,
optimizer, schedule, ``epoch`` = e - 1, the last finished epoch) plus ``position``: epoch e, step s, the
update count, and per rank the partial loss sums and the states of Python's, numpy's and torch's
generators (CPU and CUDA). Everything else random in an epoch (sampler order, loader worker seeds,
augmentation, mixup, repeated augmentation) is drawn from those generators after the per-epoch
reseed, so replaying the epoch's first s batches through the loader and then restoring the states
continues it bit for bit. The file is removed once epoch e is saved in last.pth.tar.

`resume_training` restores a --resume checkpoint (last.pth.tar or interrupted.pth.tar) into a set-up run.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from timm.utils import ModelEmaV3

from vig.checkpoint import CheckpointError, load_state_dict_into, read_checkpoint, whole_reason
from vig.errors import UsageError
from vig.trainer.distill import load_projection_state
from vig.trainer.distributed import DistributedContext, broadcast_object
from vig.trainer.saver import INTERRUPTED_NAME, LAST_NAME, atomic_write, repair_summary
from vig.trainer.schedule import load_scheduler_state

if TYPE_CHECKING:
    from torch import nn

    from vig.trainer.setup import TrainingRun

_LOGGER = logging.getLogger(__name__)


def capture_generators() -> dict[str, Any]:
    """This process's generator states as plain tensors, lists and numbers (loadable with weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                                       float(gauss)),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_generators(state: dict[str, Any]) -> None:
    """Put back the states of `capture_generators`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_interrupted(folder: Path, state: dict[str, Any]) -> Path:
    """Write the mid-epoch checkpoint (atomically) and return its path."""
    path = folder / INTERRUPTED_NAME
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path


def _epoch_of(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception as err:  # damaged: the caller falls back to last.pth.tar
        _LOGGER.warning("ignoring %s: unreadable (%s)", path, type(err).__name__)
        return None


def auto_resume_file(folder: Path) -> Path | None:
    """interrupted.pth.tar when it continues the epoch after last.pth.tar's, else last.pth.tar, else None.

    An interrupted.pth.tar that last.pth.tar has overtaken (a kill after the epoch was saved, before the
    file was removed) is removed here.
    """
    last, interrupted = folder / LAST_NAME, folder / INTERRUPTED_NAME
    last_epoch = _epoch_of(last) if last.is_file() else None
    if interrupted.is_file():
        stopped_epoch = _epoch_of(interrupted)
        if stopped_epoch is not None and (last_epoch is None or stopped_epoch >= last_epoch):
            return interrupted
        _LOGGER.info("removing %s: %s already holds that epoch", interrupted, last)
        interrupted.unlink(missing_ok=True)
    return last if last_epoch is not None else None


def remove_interrupted(folder: Path) -> None:
    """Remove interrupted.pth.tar once a later epoch is saved."""
    (folder / INTERRUPTED_NAME).unlink(missing_ok=True)


def _resume_path(resume: str, folder: Path, ctx: DistributedContext) -> str:
    """The checkpoint to resume from ('' for a fresh start); with 'auto', rank 0 decides for every rank."""
    if resume != "auto":
        return resume
    last = folder / LAST_NAME
    chosen = auto_resume_file(folder) if ctx.is_primary else None
    found = broadcast_object(str(chosen) if chosen is not None else "", ctx)
    if not found:
        _LOGGER.info("--resume auto: no %s yet, starting fresh", last)
    return found


def _read_training_checkpoint(path: str, model_name: str) -> dict[str, Any]:
    """The dict of a checkpoint written by this trainer; UsageError (one line naming the file) otherwise."""
    try:
        state = read_checkpoint(path)
    except CheckpointError as err:
        raise UsageError(f"--resume: {err}") from None
    if not isinstance(state.get("state_dict"), dict) or not isinstance(state.get("epoch"), int):
        raise UsageError(f"--resume: {path} is not a training checkpoint of train.py (no state_dict / epoch); "
                         "use --initial-checkpoint to start from its weights")
    if state.get("arch") not in (None, model_name):
        raise UsageError(f"--resume: {path} was written for model {state['arch']}, not {model_name}")
    return state


def _restore_training_state(path: str, state: dict[str, Any], model: nn.Module, model_ema: ModelEmaV3 | None,
                            optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                            weights_only: bool) -> None:
    """Load weights (strict), EMA and, unless `weights_only`, optimizer / scheduler / scaler from `state`."""
    try:
        load_state_dict_into(model, state["state_dict"], path, "state_dict")
        if model_ema is not None and isinstance(state.get("state_dict_ema"), dict):
            load_state_dict_into(model_ema.module, state["state_dict_ema"], path, "state_dict_ema")
        elif model_ema is not None:
            _LOGGER.info("--resume: %s has no EMA weights; the EMA starts from the resumed weights", path)
            model_ema.module.load_state_dict(model.state_dict())
    except CheckpointError as err:
        raise UsageError(f"--resume: {err}") from None
    if weights_only:
        return
    try:
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"--resume: {path}: optimizer state does not fit this run's --opt and parameter groups "
                         f"({whole_reason(err, limit=160)}); add --no-resume-opt to load weights only") from None
    if state.get("scheduler") is not None:
        load_scheduler_state(scheduler, state["scheduler"])
    if scaler is not None and state.get(scaler.state_dict_key) is not None:
        scaler.load_state_dict(state[scaler.state_dict_key])


def resume_training(run: TrainingRun, ctx: DistributedContext) -> None:
    """Restore --resume's state into ``run`` and set its start epoch (also from --start-epoch) and, for a run
    stopped in mid-epoch, its `TrainingRun.position`."""
    config = run.config
    resume = _resume_path(config.loop.resume, run.folder, ctx) if config.loop.resume else ""
    if config.loop.resume == "auto" and ctx.is_primary and not resume:
        repair_summary(run.folder, -1, None)  # rows of a run killed before its first checkpoint was complete
    if resume:
        state = _read_training_checkpoint(resume, config.model.model)
        if config.loop.resume == "auto" and ctx.is_primary:
            repair_summary(run.folder, state["epoch"], state.get("summary_row"))
        _restore_training_state(resume, state, run.model, run.model_ema, run.optimizer, run.scheduler,
                                run.precision.scaler, weights_only=config.loop.no_resume_opt)
        load_projection_state(run.task, state, resume)
        run.start_epoch = state["epoch"] + 1
        saved_seed = state.get("args", {}).get("seed") if isinstance(state.get("args"), dict) else None
        if saved_seed not in (None, config.loop.seed):
            _LOGGER.warning("--resume: %s was trained with --seed %s, this run uses %s: it will not repeat the "
                            "uninterrupted run", resume, saved_seed, config.loop.seed)
        position = state.get("position")
        if isinstance(position, dict) and len(position["ranks"]) != ctx.world_size:
            _LOGGER.warning("--resume: %s stopped in epoch %d with %d process(es), this run has %d: epoch %d "
                            "starts again", resume, position["epoch"], len(position["ranks"]), ctx.world_size,
                            position["epoch"])
        elif isinstance(position, dict):
            run.position = position
        finished = (f"epoch {state['epoch']} finished" if state["epoch"] >= 0
                    else "stopped in its first epoch, none finished")
        _LOGGER.info("resumed from %s (%s%s)", resume, finished,
                     f"; continuing epoch {position['epoch']} after step {position['step']}" if run.position else "")
    if config.loop.start_epoch is not None:
        run.start_epoch = config.loop.start_epoch
    if run.start_epoch > 0:
        run.scheduler.step(run.start_epoch)
    if run.position is not None:
        run.scheduler.step_update(num_updates=run.position["num_updates"])
    if resume and run.start_epoch >= run.num_epochs and ctx.is_primary:
        _LOGGER.warning("--resume: %s already finished epoch %d of --epochs %d: nothing to train (raise --epochs "
                        "to train on)", resume, run.start_epoch - 1, run.num_epochs)
