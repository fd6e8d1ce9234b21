"""Set-up: everything a training or evaluation run needs, built from its config.

`set_up_training` builds the data, the model (from --initial-checkpoint when given), its EMA, the loss, the
optimiser, the schedule and the run folder into a `TrainingRun`; `build_model`, `apply_checkpoint_settings`
and `eval_sampler` serve the evaluation run too. The order of the steps is the order in which they draw from the
random generators, so a run is repeatable from --seed.
"""
from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn

from vig.checkpoint import CheckpointError, extract_state_dict, read_checkpoint
from vig.complexity import count_macs, count_parameters
from vig.console import require_model
from vig.errors import RunError, UsageError, WeightsUnavailableError
from vig.model_settings import classifier_outputs
from vig.models.training_api import EDGE_LOSS, BatchDependent, ExtraLosses
from vig.trainer.checkpoint_model import CheckpointModel, build_checked, read_model_checkpoint
from vig.trainer.config import (DEFAULT_LR, DEFAULT_MAX_CONSECUTIVE_SKIPS, DEFAULT_MODEL, AugmentSection, DataSection,
                                ModelSection, OptimSection, RunFolderSection, ScheduleSection, TrainConfig)
from vig.trainer.data import (DataConfig, ShardedEvalSampler, StreamShard, build_dataset, build_loader,
                              device_normalizes, empty_class_folders, eval_shard, eval_transform, prefetch_to_device,
                              require_same_classes, resolve_preprocessing, train_sampler, train_transform)
from vig.trainer.distill import build_distillation_task, build_teacher
from vig.trainer.distributed import DistributedContext, broadcast_object
from vig.trainer.precision import Precision, resolve_precision
from vig.trainer.explog import ExperimentLoggers
from vig.trainer.graph_size import require_graph_size, section_builder
from vig.trainer.run_lock import take_run_lock
from vig.trainer.saver import CheckpointSaver, prepare_output_dir, require_fresh_or_resumable, run_folder_name
from vig.trainer.schedule import ONECYCLE_LINEAR, OneCycleLinearScheduler, plateau_mode
from vig.trainer.step import TrainStep, accumulation_groups, choose_recipe

_LOGGER = logging.getLogger(__name__)


def seed_everything(seed: int, *streams: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every CUDA device) global generators from (seed, *streams).

    The streams (e.g. epoch and rank) are mixed by numpy's SeedSequence, so that no two
    (seed, epoch, rank) triples share a generator state.
    """
    value = int(np.random.SeedSequence([seed, *streams]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def build_model(model: ModelSection, num_classes: int, source: CheckpointModel | None = None,
                use_ema: bool = False) -> nn.Module:
    """The model section's model (`vig.models.factory.create_model`) with ``num_classes`` outputs, its dropout,
    SViG thresholds, image size and --model-kwargs, holding the (EMA) weights of ``source`` (--initial-checkpoint)
    when given; with --pretrained, timm's pretrained loading (`pretrained_kwargs`). Weights the model cannot fetch
    (`WeightsUnavailableError`) end the run with one line that says which --model-kwargs entry takes a file."""
    require_model(model.model)
    extra: dict[str, Any] = {"drop_rate": model.drop, **pretrained_kwargs(model)}
    if model.drop_path is not None:
        extra["drop_path_rate"] = model.drop_path
    try:
        if source is not None:
            return source.build(model.settings(), num_classes, use_ema=use_ema, **extra)
        return build_checked(model.settings(), num_classes, **extra)
    except WeightsUnavailableError as err:
        flag = "--pretrained-path" if err.argument == "pretrained_cfg_overlay" else f"--model-kwargs {err.argument}="
        raise RunError(f"{err} (train.py {flag}{'' if flag.endswith('=') else ' '}PATH)") from None


def pretrained_kwargs(model: ModelSection) -> dict[str, Any]:
    """timm.create_model arguments for --pretrained / --pretrained-path: ``pretrained=True`` and, for a file,
    ``pretrained_cfg_overlay`` naming it, with the class count of its classifier weights, so that timm's
    `load_pretrained` passes it through the model's ``pretrained_filter_fn`` (this project's models:
    `vig.checkpoint.checkpoint_filter_fn`, which also resizes position embeddings) and resets the head
    exactly when the run's class count differs (an unknown count: always reset)."""
    if not model.pretrained:
        return {}
    if not model.pretrained_path:
        return {"pretrained": True}
    try:
        state_dict, _ = extract_state_dict(read_checkpoint(model.pretrained_path), source=model.pretrained_path)
    except CheckpointError as err:
        raise UsageError(f"--pretrained-path: {err}") from None
    classes = classifier_outputs(model.model, state_dict)
    return {"pretrained": True,
            "pretrained_cfg_overlay": {"file": model.pretrained_path, "num_classes": classes if classes else -1}}


def pretrained_classes(model: ModelSection) -> int | None:
    """The class count of the --pretrained weights' head: the --pretrained-path file's classifier, else the
    pretrained config of the model's tag (``name.tag``, or its default tag); None when the file's is unknown.
    A model without published weights (and no --pretrained-path), or whose weights have no classifier (a
    headless tag), is a UsageError: there is no head to evaluate."""
    if model.pretrained_path:
        classes = pretrained_kwargs(model)["pretrained_cfg_overlay"]["num_classes"]
        return classes if classes > 0 else None
    config = get_pretrained_cfg(model.model) if model.model else None
    if config is None or not (config.url or config.hf_hub_id):
        raise UsageError(f"--pretrained: {model.model} has no published weights (timm.list_pretrained() lists the "
                         "models that have); give the weights with --pretrained-path FILE or --pretrain_path FILE")
    if not config.num_classes:
        raise UsageError(f"--pretrained: {model.model}'s published weights have no classifier (a backbone to "
                         "fine-tune), so there is nothing to evaluate")
    return config.num_classes


def resolve_lr(optimiser: OptimSection, batch_size: int, world_size: int) -> float:
    """--lr when given; else with --lr-base timm's rule lr = lr_base x (global batch / --lr-base-size), the
    ratio square-rooted for --lr-base-scale sqrt ('' = sqrt for Ada* / Lamb optimizers, linear otherwise),
    the global batch being ``batch_size`` x processes x --grad-accum-steps; else `DEFAULT_LR`."""
    if optimiser.lr is not None:
        return optimiser.lr
    if optimiser.lr_base is None:
        return DEFAULT_LR
    global_batch = batch_size * world_size * optimiser.grad_accum_steps
    scale = optimiser.lr_base_scale or (
        "sqrt" if any(name in optimiser.opt.lower() for name in ("ada", "lamb")) else "linear")
    ratio = global_batch / optimiser.lr_base_size
    lr = optimiser.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)
    _LOGGER.info("learning rate %g from --lr-base %g and the global batch %d (%s scaling, --lr-base-size %d)",
                 lr, optimiser.lr_base, global_batch, scale, optimiser.lr_base_size)
    return lr


def apply_checkpoint_settings(config: TrainConfig, use_class_count: bool) -> tuple[TrainConfig, CheckpointModel | None]:
    """Read --initial-checkpoint; the config with the model settings the command line leaves open filled in
    from it.

    Model name, image size, SViG thresholds and --model-kwargs come from the checkpoint's recorded
    flags unless given (see `vig.model_settings.merge_settings` for which contradictions are errors and
    which win with a warning); with ``use_class_count`` (evaluation) its class count too. Without a
    checkpoint, or for a bare state dict without --model, the model is `DEFAULT_MODEL`.

    Returns:
        the new config and the read checkpoint (for `build_model`), None without --initial-checkpoint.
    """
    path = config.model.initial_checkpoint
    if not path:
        return config.replace(model={"model": config.model.model or DEFAULT_MODEL}), None
    source = read_model_checkpoint(path, config.model.settings(num_classes=config.data.num_classes),
                                   default_model=DEFAULT_MODEL, use_class_count=use_class_count)
    merged = source.settings
    # a decrement without a threshold builds nothing (the kNN graph): not carried, as --dec alone is refused
    decrement = merged.dec if merged.start_thresh is not None else None
    model = {"model": merged.model or DEFAULT_MODEL, "img_size": merged.img_size,
             "start_thresh": merged.start_thresh, "dec": decrement, "model_kwargs": merged.model_kwargs}
    data = {"num_classes": merged.num_classes} if use_class_count else {}
    return config.replace(model=model, data=data), source


def log_model_size(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    """Log parameter count and MACs of one (1, C, H, W) input (torchprofile), on a CPU copy in eval mode."""
    params = count_parameters(model)
    probe = copy.deepcopy(model).cpu().float()
    try:
        macs = count_macs(probe, input_size[1], in_chans=input_size[0])
        _LOGGER.info("model: %.3f M parameters, %.4f G MACs at %s", params / 1e6, macs / 1e9, "x".join(
            str(s) for s in input_size[1:]))
    except Exception as err:  # torchprofile traces the model; report rather than fail the run
        _LOGGER.warning("model: %.3f M parameters; MACs not counted (%s: %s)", params / 1e6,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")


def training_classes(data: DataSection, classes: list[str]) -> int:
    """--num-classes, or the number of classes in the data; UsageError when --num-classes is smaller."""
    if data.num_classes is None:
        return len(classes)
    if data.num_classes < len(classes):
        raise UsageError(f"--num-classes {data.num_classes} is smaller than the {len(classes)} classes in the data")
    return data.num_classes


def eval_sampler(seed: int, val_set: Any, ctx: DistributedContext,
                 model: nn.Module) -> ShardedEvalSampler | StreamShard:
    """This rank's share of the validation images: in the dataset's order, or, for a model whose predictions
    depend on its batch (`vig.models.training_api.BatchDependent`, e.g. an edge head), in one fixed order
    shuffled from ``seed`` (--seed), so that its batches mix classes instead of following a class-sorted
    folder. A wds/ stream is read in its shards' order."""
    shuffle_seed = seed if isinstance(unwrap_model(model), BatchDependent) else None
    return eval_shard(val_set, ctx.world_size, ctx.rank, shuffle_seed=shuffle_seed)


def build_optimizer(optimiser: OptimSection, model: nn.Module, model_name: str) -> torch.optim.Optimizer:
    """timm optimizer at the resolved --lr; no weight decay on 1-d parameters (norms, biases) and the model's
    no_weight_decay() set (the position embedding of the ViG models); with --layer-decay, timm's layer-wise
    groups from the model's group_matcher."""
    extra: dict[str, Any] = {}
    if optimiser.layer_decay is not None:
        if not hasattr(model, "group_matcher"):
            raise UsageError(f"--layer-decay needs a model with a group_matcher; {model_name} has none")
        extra["layer_decay"] = optimiser.layer_decay
    if optimiser.opt_eps is not None:
        extra["eps"] = optimiser.opt_eps
    if optimiser.opt_betas is not None:
        extra["betas"] = tuple(optimiser.opt_betas)
    return create_optimizer_v2(model, opt=optimiser.opt, lr=optimiser.lr, weight_decay=optimiser.weight_decay,
                               momentum=optimiser.momentum, **extra)


def loss_and_mixup(augmentation: AugmentSection, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """The training loss (timm's choice: soft-target CE with mixup / cutmix, label-smoothing CE, else CE;
    timm's BinaryCrossEntropy instead with --bce-loss) and the Mixup transform (None when off)."""
    mixup = None
    if augmentation.mixes:
        mixup = Mixup(mixup_alpha=augmentation.mixup, cutmix_alpha=augmentation.cutmix, prob=augmentation.mixup_prob,
                      switch_prob=augmentation.mixup_switch_prob, mode="batch", label_smoothing=augmentation.smoothing,
                      num_classes=num_classes)
    if augmentation.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixup is not None else augmentation.smoothing,
                                  target_threshold=augmentation.bce_target_thresh, sum_classes=augmentation.bce_sum,
                                  pos_weight=augmentation.bce_pos_weight), mixup
    if mixup is not None:
        return SoftTargetCrossEntropy(), mixup
    if augmentation.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=augmentation.smoothing), None
    return nn.CrossEntropyLoss(), None


def resolve_edge_loss_weight(edge_loss_weight: float | None, model_name: str, batch_size: int,
                             model: nn.Module) -> float | None:
    """--edge-loss-weight for a model whose extra loss terms (`vig.models.training_api.ExtraLosses`) are the
    batch-graph edge loss (default 1), None for a model without extra terms. A weight given for another model,
    extra terms train.py has no weight for, or a training batch smaller than a batch-dependent model needs
    (`vig.models.training_api.BatchDependent`), is a UsageError."""
    if isinstance(model, BatchDependent) and batch_size < model.min_train_batch_size:
        raise UsageError(f"{model_name} trains on a graph over the batch: --batch-size must be >= "
                         f"{model.min_train_batch_size}, got {batch_size}")
    if not isinstance(model, ExtraLosses):
        if edge_loss_weight is not None:
            raise UsageError(f"--edge-loss-weight needs a model with a batch-graph edge head (bgnn, "
                             f"bgnn_mobilenetv3_small_100); {model_name} has none")
        return None
    if tuple(model.extra_loss_names) != (EDGE_LOSS,):
        raise UsageError(f"{model_name} trains on the loss terms {', '.join(model.extra_loss_names)}; train.py "
                         f"weighs only the batch-graph '{EDGE_LOSS}' term (--edge-loss-weight)")
    return 1.0 if edge_loss_weight is None else edge_loss_weight


def output_folder(run_folder: RunFolderSection, model: ModelSection, resume: str, ctx: DistributedContext) -> Path:
    """Primary rank creates output/experiment (without --experiment: a dated name with the model and its input
    size, --img-size or the model's configured one) and shares it, or the error.

    The primary rank takes the folder's lock (`vig.trainer.run_lock`) before anything is written there: a
    folder that another live run holds is refused. A folder that already holds another run's files is
    refused unless the run resumes (see `vig.trainer.saver.require_fresh_or_resumable`): two runs never mix
    their checkpoints and summaries.
    """
    folder: str | None = None
    error: tuple[bool, str] | None = None  # (a usage mistake, the message)
    if ctx.is_primary:
        try:
            pretrained_cfg = get_pretrained_cfg(model.model)
            img_size = model.img_size or (pretrained_cfg.input_size[-1] if pretrained_cfg is not None else 0)
            name = run_folder.experiment or run_folder_name(model.model, img_size)
            path = prepare_output_dir(run_folder.output, name)
            take_run_lock(path, break_lock=run_folder.break_lock)  # before this run writes anything there
            require_fresh_or_resumable(path, resume)
            folder = str(path)
        except (UsageError, RunError) as err:  # RunError: a full disk
            error = (isinstance(err, UsageError), str(err))
    folder, error = broadcast_object((folder, error), ctx)
    if error is not None:
        raise UsageError(error[1]) if error[0] else RunError(error[1])
    return Path(folder)


def build_scheduler(schedule: ScheduleSection, optimizer: torch.optim.Optimizer, updates_per_epoch: int,
                    eval_metric: str) -> tuple[Any, int]:
    """The learning-rate scheduler (timm's, or `OneCycleLinearScheduler`) and the number of epochs it runs; a
    plateau schedule follows ``eval_metric`` (--eval-metric: loss falls, accuracy rises)."""
    if schedule.sched == ONECYCLE_LINEAR:
        return OneCycleLinearScheduler(optimizer, schedule.epochs * updates_per_epoch), schedule.epochs
    return create_scheduler_v2(
        optimizer, sched=schedule.sched, num_epochs=schedule.epochs, decay_epochs=schedule.decay_epochs,
        decay_rate=schedule.decay_rate, cooldown_epochs=schedule.cooldown_epochs, min_lr=schedule.min_lr,
        warmup_lr=schedule.warmup_lr, warmup_epochs=schedule.warmup_epochs, updates_per_epoch=updates_per_epoch,
        patience_epochs=schedule.patience_epochs, plateau_mode=plateau_mode(eval_metric))


@dataclass
class TrainingRun:
    """What one training run holds from set-up to its last epoch (this rank's share), and its resolved config.

    ``model`` is the model that is validated and saved (unwrapped but for DDP / compile after `prepare_loop`);
    ``step`` is what the optimizer trains and how (`vig.trainer.step.TrainStep`), built by `prepare_loop`."""

    config: TrainConfig
    model: nn.Module
    model_ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    train_set: Any
    val_set: Any
    sampler: Any
    train_loader: Any
    val_loader: Any
    num_classes: int
    num_epochs: int
    folder: Path
    start_epoch: int = 0
    loss_fn: nn.Module | None = None
    mixup: Mixup | None = None
    saver: CheckpointSaver | None = None
    edge_loss_weight: float | None = None
    task: nn.Module | None = None  # timm.task distillation task (--kd-model-name)
    model_dtype: torch.dtype | None = None
    updates_per_epoch: int = 0
    loggers: ExperimentLoggers | None = None
    position: dict[str, Any] | None = None  # where a signal stopped the start epoch (vig.trainer.resume)
    step: TrainStep | None = None
    skip_streak: int = 0  # steps skipped in a row by --skip-nonfinite, across epochs


def _place_model(model: nn.Module, config: TrainConfig,
                 ctx: DistributedContext) -> tuple[nn.Module, torch.dtype | None]:
    """The model with synchronised BatchNorm (--sync-bn), on the device in --model-dtype and memory layout."""
    if config.distributed.sync_bn and ctx.distributed:
        if ctx.device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_dtype = getattr(torch, config.model.model_dtype) if config.model.model_dtype else None
    model.to(device=ctx.device, dtype=model_dtype)
    if config.model.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, model_dtype


def _loaders(config: TrainConfig, ctx: DistributedContext, train_set: Any, val_set: Any, model: nn.Module,
             preprocessing: DataConfig, device_normalize: bool) -> tuple[Any, Any, Any]:
    """This rank's training sampler, and the training and validation loaders (prefetching to the device when it
    normalises)."""
    data, augmentation = config.data, config.augmentation
    sampler = train_sampler(train_set, ctx, data.aug_repeats > 0, config.loop.seed, num_repeats=data.aug_repeats)
    train_loader = build_loader(train_set, sampler, data.batch_size, data.workers, True, ctx.device)
    val_loader = build_loader(val_set, eval_sampler(config.loop.seed, val_set, ctx, model),
                              data.batch_size, data.workers, False, ctx.device)
    if device_normalize:
        train_loader = prefetch_to_device(train_loader, preprocessing, ctx.device, augmentation.reprob,
                                          augmentation.remode, augmentation.recount)
        val_loader = prefetch_to_device(val_loader, preprocessing, ctx.device)
    return sampler, train_loader, val_loader


def set_up_training(config: TrainConfig, ctx: DistributedContext) -> TrainingRun:
    """Data, model (from --initial-checkpoint when given), EMA, optimizer, schedule and the run folder; the
    run's config is ``config`` with the checkpoint's model settings and the resolved learning rate."""
    config, source = apply_checkpoint_settings(config, use_class_count=False)
    config = config.replace(optimiser={"lr": resolve_lr(config.optimiser, config.data.batch_size, ctx.world_size)})
    data, augmentation, model_section, schedule = config.data, config.augmentation, config.model, config.schedule
    if schedule.sched != ONECYCLE_LINEAR and schedule.warmup_epochs >= schedule.epochs and ctx.is_primary:
        _LOGGER.warning("--warmup-epochs %d >= --epochs %d: the learning rate never reaches --lr %g",
                        schedule.warmup_epochs, schedule.epochs, config.optimiser.lr)
    train_set, classes = build_dataset(data, data.train_split, is_training=True, seed=config.loop.seed)
    val_set, val_classes = build_dataset(data, data.val_split, is_training=False, seed=config.loop.seed)
    require_same_classes(data, classes, val_classes)
    dropped = empty_class_folders(data, classes) if ctx.is_primary else None
    if dropped:
        _LOGGER.warning("%s", dropped)
    num_classes = training_classes(data, classes)
    require_model(model_section.model)
    # before the model is built: a used folder stops the run first
    folder = output_folder(config.run_folder, model_section, config.loop.resume, ctx)
    model = _build_checked_model(model_section, num_classes, source)
    edge_loss_weight = resolve_edge_loss_weight(augmentation.edge_loss_weight, model_section.model, data.batch_size,
                                                model)
    if edge_loss_weight is not None and config.distill.kd_model_name:
        raise UsageError(f"--kd-model-name cannot train {model_section.model}: timm's distillation task returns the "
                         f"logits alone, and the model's '{EDGE_LOSS}' loss needs its edge outputs")
    if model_section.grad_checkpointing:
        model.set_grad_checkpointing(True)
    preprocessing = resolve_preprocessing(data, model_section.img_size, model)
    device_normalize = device_normalizes(ctx.device)  # uint8 batches, normalised and erased on the device
    train_set.transform = train_transform(augmentation, preprocessing, device_normalize)
    val_set.transform = eval_transform(preprocessing, device_normalize)
    if ctx.is_primary:
        log_model_size(model, preprocessing.input_size)
    model, model_dtype = _place_model(model, config, ctx)
    loss_fn, mixup = loss_and_mixup(augmentation, num_classes)
    loss_fn = loss_fn.to(ctx.device)
    task = None
    train_module = model
    if config.distill.kd_model_name:
        teacher = build_teacher(config.distill, num_classes, ctx.device, model_dtype)
        task = build_distillation_task(config.distill, model, teacher, loss_fn, preprocessing.mean, preprocessing.std,
                                       ctx.device, model_dtype, verbose=ctx.is_primary)
        train_module = task.get_trainable_module()
    optimizer = build_optimizer(config.optimiser, train_module, model_section.model)
    precision = resolve_precision(config.loop.amp, config.loop.amp_dtype, ctx.device)
    model_ema = (ModelEmaV3(model, decay=model_section.model_ema_decay, use_warmup=model_section.model_ema_warmup)
                 if model_section.model_ema else None)
    sampler, train_loader, val_loader = _loaders(config, ctx, train_set, val_set, model, preprocessing,
                                                 device_normalize)
    # the schedule counts optimizer updates: one per accumulation group of --grad-accum-steps batches
    updates_per_epoch = len(accumulation_groups(len(train_loader), config.optimiser.grad_accum_steps))
    scheduler, num_epochs = build_scheduler(schedule, optimizer, updates_per_epoch, config.loop.eval_metric)
    return TrainingRun(config=config, model=model, model_ema=model_ema, optimizer=optimizer, scheduler=scheduler,
                       precision=precision, train_set=train_set, val_set=val_set, sampler=sampler,
                       train_loader=train_loader, val_loader=val_loader, num_classes=num_classes,
                       num_epochs=num_epochs, folder=folder, loss_fn=loss_fn, mixup=mixup,
                       edge_loss_weight=edge_loss_weight, task=task, model_dtype=model_dtype,
                       updates_per_epoch=updates_per_epoch)


def _build_checked_model(model_section: ModelSection, num_classes: int, source: CheckpointModel | None) -> nn.Module:
    """`build_model`, refusing an --img-size at which the first graph has fewer nodes than its k (unless
    --allow-small-graph; see `vig.trainer.graph_size`)."""
    pretrained_cfg = get_pretrained_cfg(model_section.model)
    default_size = pretrained_cfg.input_size[-1] if pretrained_cfg is not None else 0
    check = bool(model_section.img_size) and not model_section.allow_small_graph and default_size > 0
    build = section_builder(build_model, model_section, num_classes)
    try:
        model = build_model(model_section, num_classes, source)
    except UsageError:
        if check:  # the model refused the size (a single node): name the smallest one that works
            require_graph_size(None, model_section.img_size, build, default_size)
        raise
    if check:
        require_graph_size(model, model_section.img_size, build, default_size)
    return model


def training_step(run: TrainingRun, train_module: nn.Module) -> TrainStep:
    """The `TrainStep` of a run whose trainable module (DDP- / compile-wrapped, or the distillation task's) is
    ``train_module``: the loss recipe is chosen here, once."""
    config = run.config
    return TrainStep(model=train_module, optimizer=run.optimizer,
                     recipe=choose_recipe(run.loss_fn, run.edge_loss_weight, run.task, run.mixup),
                     precision=run.precision, scheduler=run.scheduler, mixup=run.mixup, model_ema=run.model_ema,
                     ema_source=unwrap_model(run.model), clip_grad=config.optimiser.clip_grad,
                     clip_mode=config.optimiser.clip_mode, channels_last=config.model.channels_last,
                     model_dtype=run.model_dtype, grad_accum_steps=config.optimiser.grad_accum_steps,
                     skip_nonfinite=config.loop.skip_nonfinite,
                     max_consecutive_skips=config.loop.max_consecutive_skips or DEFAULT_MAX_CONSECUTIVE_SKIPS)
