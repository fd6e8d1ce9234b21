"""Training and evaluation runs: build data, model, optimiser and schedule from parsed flags, then loop.

`run(config)` is what train.py calls. It sets up the process group (see vig.trainer.distributed), trains
with per-epoch validation and checkpointing, or with `--evaluate` measures a checkpoint on the
validation split and returns the result (primary rank only).

Fault tolerance: `--resume auto` continues from the run folder's interrupted.pth.tar (left by
SIGTERM / SIGUSR1 / SIGINT, `vig.trainer.resume`) or last.pth.tar (torchrun --max-restarts), repairing
what a kill in the save sequence left (`vig.trainer.saver`); each epoch reseeds every random generator
from (seed, epoch, rank), so a run resumed from the checkpoint of epoch k repeats the uninterrupted run
bit for bit; a damaged, foreign or
code-carrying checkpoint, a corrupt image and a non-finite loss end the run with one line.
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
from timm.utils import ModelEmaV3, distribute_bn, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vig.checkpoint import (CheckpointError, classifier_outputs, extract_state_dict, load_state_dict_into,
                            read_checkpoint, recorded_settings, whole_reason)
from vig.complexity import count_macs, count_parameters
from vig.console import require_model
from vig.errors import RunError, UsageError, WeightsUnavailableError
from vig.graph_info import describe_graph
from vig.models.factory import create_model
from vig.models.training_api import EDGE_LOSS, BatchDependent, ExtraLosses
from vig.trainer.cli import DEFAULT_LR, DEFAULT_MAX_CONSECUTIVE_SKIPS, DEFAULT_MODEL, merge_flag_settings
from vig.trainer.config import (AugmentSection, DataSection, ModelSection, OptimSection, RunFolderSection,
                                TrainConfig)
from vig.trainer.curves import write_curves
from vig.trainer.data import (ShardedEvalSampler, StreamShard, build_dataset, build_loader, device_normalizes,
                              empty_class_folders, eval_shard, eval_transform, is_cifar_input,
                              prefetch_to_device, require_same_classes, resolve_preprocessing, take_corrupt_count,
                              train_sampler, train_transform)
from vig.trainer.distributed import (DistributedContext, all_gather_objects, all_reduce_sum, broadcast_object,
                                     init_distributed, shutdown_distributed)
from vig.trainer.distill import (PROJECTION_KEY, build_distillation_task, build_teacher, load_projection_state,
                                 projection_state)
from vig.trainer.engine import (EvalStats, TrainStats, accumulation_groups, resolve_precision, train_one_epoch,
                                validate)
from vig.trainer.explog import ExperimentLoggers
from vig.trainer.faults import fault_point
from vig.trainer.graph_size import require_graph_size, section_builder
from vig.trainer.results import write_results
from vig.trainer.resume import (auto_resume_file, capture_generators, remove_interrupted, restore_generators,
                                write_interrupted)
from vig.trainer.run_lock import release_run_lock, take_run_lock
from vig.trainer.saver import (CURVES_NAME, LAST_NAME, SUMMARY_NAME, CheckpointSaver, append_summary,
                               prepare_output_dir, repair_summary, require_fresh_or_resumable, run_folder_name,
                               write_args_yaml)
from vig.trainer.schedule import (ONECYCLE_LINEAR, OneCycleLinearScheduler, load_scheduler_state, plateau_mode,
                                  scheduler_state)
from vig.trainer.signals import Interrupted, catch_stop_signals, signal_name, stop_requested
from vig.trainer.threads import set_cpu_threads

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


def build_model(model: ModelSection, num_classes: int) -> nn.Module:
    """The model section's model (`vig.models.factory.create_model`) with ``num_classes`` outputs, its dropout,
    SViG thresholds, image size and --model-kwargs; with --pretrained, timm's pretrained loading
    (`pretrained_kwargs`). Weights the model cannot fetch (`WeightsUnavailableError`) end the run
    with one line that says which --model-kwargs entry takes a file."""
    require_model(model.model)
    extra: dict[str, Any] = {"drop_rate": model.drop, **pretrained_kwargs(model)}
    if model.drop_path is not None:
        extra["drop_path_rate"] = model.drop_path
    try:
        return create_model(model.settings(), num_classes, **extra)
    except (TypeError, ValueError) as err:  # constructors reject bad arguments with these
        raise UsageError(f"model {model.model}: {err}") from None
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


def weights_source(model: nn.Module) -> str | None:
    """Where the pretrained weights of ``model`` came from (its pretrained config): a file, a URL or a hub file."""
    config = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    if config.get("file"):
        return str(config["file"])
    if config.get("hf_hub_id"):
        return f"hf-hub:{config['hf_hub_id']}/{config.get('hf_hub_filename') or ''}".rstrip("/")
    return config.get("url") or None


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


def apply_checkpoint_settings(config: TrainConfig, use_class_count: bool) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Read --initial-checkpoint; the config with the model settings the command line leaves open filled in
    from it.

    Model name, image size, SViG thresholds and --model-kwargs come from the checkpoint's recorded
    flags unless given (see `vig.checkpoint.merge_settings` for which contradictions are errors and
    which win with a warning); with ``use_class_count`` (evaluation) its class count too. Without a
    checkpoint, or for a bare state dict without --model, the model is `DEFAULT_MODEL`.

    Returns:
        the new config and the checkpoint dict (read once, for `load_weights`), None without
        --initial-checkpoint.
    """
    path = config.model.initial_checkpoint
    if not path:
        return config.replace(model={"model": config.model.model or DEFAULT_MODEL}), None
    try:
        checkpoint = read_checkpoint(path)
        state_dict, _ = extract_state_dict(checkpoint, source=path)
        recorded = recorded_settings(checkpoint, state_dict, model_name=config.model.model or DEFAULT_MODEL)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    if not use_class_count:
        recorded.num_classes = None
    merged = merge_flag_settings(config.model.settings(num_classes=config.data.num_classes), recorded, path)
    # a decrement without a threshold builds nothing (the kNN graph): not carried, as --dec alone is refused
    decrement = merged.dec if merged.start_thresh is not None else None
    model = {"model": merged.model or DEFAULT_MODEL, "img_size": merged.img_size,
             "start_thresh": merged.start_thresh, "dec": decrement, "model_kwargs": merged.model_kwargs}
    data = {"num_classes": merged.num_classes} if use_class_count else {}
    return config.replace(model=model, data=data), checkpoint


def load_weights(model: nn.Module, checkpoint: dict[str, Any], path: str, use_ema: bool) -> None:
    """Strictly load the (EMA) weights of an already read checkpoint into ``model``; one-line UsageError."""
    try:
        state_dict, entry = extract_state_dict(checkpoint, use_ema, path)
        load_state_dict_into(model, state_dict, path, entry)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    _LOGGER.info("loaded %sweights from %s", "EMA " if use_ema else "", path)


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


def _num_classes(data: DataSection, classes: list[str]) -> int:
    if data.num_classes is None:
        return len(classes)
    if data.num_classes < len(classes):
        raise UsageError(f"--num-classes {data.num_classes} is smaller than the {len(classes)} classes in the data")
    return data.num_classes


def evaluation_classes(data: DataSection, checkpoint_path: str | None, classes: list[str]) -> int:
    """The class count of the head that evaluates `classes` (the validation split's class names, index order).

    The checkpoint's count (merged into ``data.num_classes``) or, without one, the data's. A head with
    fewer outputs than the data has classes is a UsageError; one with more is evaluated (labels 0 .. M - 1
    against all N outputs) with a warning naming both counts.
    """
    head = data.num_classes
    where = f"split {data.val_split!r} of {data.data_dir}" if data.data_dir else f"split {data.val_split!r}"
    if head is None:
        return len(classes)
    if head < len(classes):
        missing = f"label {head} has" if len(classes) == head + 1 else f"labels {head} to {len(classes) - 1} have"
        raise UsageError(f"{checkpoint_path} has a {head}-class head but {where} holds {len(classes)} "
                         f"classes: {missing} no output")
    if head > len(classes):
        _LOGGER.warning("%s has a %d-class head but %s holds %d classes: its labels 0 to %d are scored against "
                        "all %d outputs; is this the data the checkpoint was trained on?", checkpoint_path,
                        head, where, len(classes), len(classes) - 1, head)
    return head


def eval_sampler(seed: int, val_set: Any, ctx: DistributedContext,
                 model: nn.Module) -> ShardedEvalSampler | StreamShard:
    """This rank's share of the validation images: in the dataset's order, or, for a model whose predictions
    depend on its batch (`vig.models.training_api.BatchDependent`, e.g. an edge head), in one fixed order
    shuffled from ``seed`` (--seed), so that its batches mix classes instead of following a class-sorted
    folder. A wds/ stream is read in its shards' order."""
    shuffle_seed = seed if isinstance(unwrap_model(model), BatchDependent) else None
    return eval_shard(val_set, ctx.world_size, ctx.rank, shuffle_seed=shuffle_seed)


def compiled(model: nn.Module, backend: str | None) -> nn.Module:
    """``model`` wrapped by ``torch.compile`` with ``backend`` (--torchcompile), or ``model`` itself for None.
    Compilation happens at the first batch; the wrapper shares the model's parameters."""
    if backend is None:
        return model
    _LOGGER.info("torch.compile: backend %s", backend)
    return torch.compile(model, backend=backend)


def evaluate(config: TrainConfig, ctx: DistributedContext) -> dict[str, Any] | None:
    """Evaluate --pretrain_path on the validation split; the result dict on the primary rank, else None."""
    config, checkpoint = apply_checkpoint_settings(config, use_class_count=True)
    if checkpoint is None and config.data.num_classes is None:  # --pretrained: the published head's class count
        config = config.replace(data={"num_classes": pretrained_classes(config.model)})
    data, loop = config.data, config.loop
    val_set, classes = build_dataset(data, data.val_split, is_training=False, seed=loop.seed)
    num_classes = evaluation_classes(
        data, config.model.initial_checkpoint or f"the pretrained {config.model.model}", classes)
    model = build_model(config.model, num_classes)
    if checkpoint is not None:
        load_weights(model, checkpoint, config.model.initial_checkpoint, use_ema=config.model.model_ema)
    if ctx.device.type == "cpu":  # after the checks of the user's input, whose errors stay the only line
        set_cpu_threads(data.workers)
    preprocessing = resolve_preprocessing(data, config.model.img_size, model)
    device_normalize = device_normalizes(ctx.device)
    val_set.transform = eval_transform(preprocessing, device_normalize)
    model_dtype = getattr(torch, config.model.model_dtype) if config.model.model_dtype else None
    model.to(device=ctx.device, dtype=model_dtype)
    if config.model.channels_last:
        model.to(memory_format=torch.channels_last)
    precision = resolve_precision(loop.amp, loop.amp_dtype, ctx.device)
    sampler = eval_sampler(loop.seed, val_set, ctx, model)
    evaluated = compiled(model, config.model.torchcompile)
    loader = build_loader(val_set, sampler, data.batch_size, data.workers, is_training=False, device=ctx.device)
    last_batches = [size % data.batch_size or min(size, data.batch_size)
                    for size in all_gather_objects(len(sampler), ctx)]
    if device_normalize:
        loader = prefetch_to_device(loader, preprocessing, ctx.device)
    stats = validate(evaluated, loader, ctx, precision, tta=loop.flip_tta, channels_last=config.model.channels_last,
                     log_interval=loop.log_interval, model_dtype=model_dtype)
    if not ctx.is_primary:
        return None
    _LOGGER.info("evaluated in batches of %d images; the last batch of each process (%s) is evaluated as the "
                 "smaller batch it is, not dropped or padded%s", data.batch_size,
                 ", ".join(str(size) for size in last_batches),
                 f"; predictions are transductive (they depend on the other images of the batch), the images "
                 f"in one fixed order shuffled from --seed {sampler.shuffle_seed}" if sampler.shuffle_seed is not None
                 else "")
    graph = describe_graph(model)
    published = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    result = {"model": config.model.model, "checkpoint": config.model.initial_checkpoint or weights_source(model),
              "ema": config.model.model_ema if checkpoint is not None else bool(published.get("use_ema")),
              "img_size": preprocessing.input_size[-1],
              "crop_pct": None if is_cifar_input(preprocessing) else preprocessing.crop_pct, "num_classes": num_classes,
              "model_dtype": str(model_dtype or torch.float32).removeprefix("torch."),
              "amp": str(precision.dtype).removeprefix("torch.") if precision.dtype is not None else None,
              "channels_last": config.model.channels_last, "torchcompile": config.model.torchcompile,
              "graph": graph.label, "start_thresh": graph.start_thresh, "dec": graph.dec,
              "tta": loop.tta if loop.flip_tta else 0,
              "top1": stats.top1, "top5": stats.top5, "loss": stats.loss, "count": stats.count,
              "batch_size": data.batch_size, "last_batch_sizes": last_batches,
              "eval_order": "dataset" if sampler.shuffle_seed is None else f"shuffled (seed {sampler.shuffle_seed})"}
    if loop.results_file:
        write_results(loop.results_file, result)
    return result


def _optimizer(optimiser: OptimSection, model: nn.Module, model_name: str) -> torch.optim.Optimizer:
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


def _loss_and_mixup(augmentation: AugmentSection, num_classes: int) -> tuple[nn.Module, Mixup | None]:
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


def _output_folder(run_folder: RunFolderSection, model: ModelSection, resume: str, ctx: DistributedContext) -> Path:
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


@dataclass
class TrainingRun:
    """What one training run holds from set-up to its last epoch (this rank's share), and its resolved config."""

    config: TrainConfig
    model: nn.Module
    model_ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Any
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
    train_module: nn.Module | None = None  # what the optimizer trains: the (DDP) model, or the task's module
    model_dtype: torch.dtype | None = None
    updates_per_epoch: int = 0
    loggers: ExperimentLoggers | None = None
    position: dict[str, Any] | None = None  # where a signal stopped the start epoch (vig.trainer.resume)
    skip_streak: int = 0  # steps skipped in a row by --skip-nonfinite, across epochs


def set_up_training(config: TrainConfig, ctx: DistributedContext) -> TrainingRun:
    """Data, model (from --initial-checkpoint when given), EMA, optimizer, schedule and the run folder; the
    run's config is ``config`` with the checkpoint's model settings and the resolved learning rate."""
    config, checkpoint = apply_checkpoint_settings(config, use_class_count=False)
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
    num_classes = _num_classes(data, classes)
    require_model(model_section.model)
    # before the model is built: a used folder stops the run first
    folder = _output_folder(config.run_folder, model_section, config.loop.resume, ctx)
    model = _build_checked_model(model_section, num_classes)
    edge_loss_weight = resolve_edge_loss_weight(augmentation.edge_loss_weight, model_section.model, data.batch_size,
                                                model)
    if edge_loss_weight is not None and config.distill.kd_model_name:
        raise UsageError(f"--kd-model-name cannot train {model_section.model}: timm's distillation task returns the "
                         f"logits alone, and the model's '{EDGE_LOSS}' loss needs its edge outputs")
    if checkpoint is not None:
        load_weights(model, checkpoint, model_section.initial_checkpoint, use_ema=False)
    if model_section.grad_checkpointing:
        model.set_grad_checkpointing(True)
    preprocessing = resolve_preprocessing(data, model_section.img_size, model)
    device_normalize = device_normalizes(ctx.device)  # uint8 batches, normalised and erased on the device
    train_set.transform = train_transform(augmentation, preprocessing, device_normalize)
    val_set.transform = eval_transform(preprocessing, device_normalize)

    if ctx.is_primary:
        log_model_size(model, preprocessing.input_size)
    if config.distributed.sync_bn and ctx.distributed:
        if ctx.device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model_dtype = getattr(torch, model_section.model_dtype) if model_section.model_dtype else None
    model.to(device=ctx.device, dtype=model_dtype)
    if model_section.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn, mixup = _loss_and_mixup(augmentation, num_classes)
    loss_fn = loss_fn.to(ctx.device)
    task = None
    train_module = model
    if config.distill.kd_model_name:
        teacher = build_teacher(config.distill, num_classes, ctx.device, model_dtype)
        task = build_distillation_task(config.distill, model, teacher, loss_fn, preprocessing.mean, preprocessing.std,
                                       ctx.device, model_dtype, verbose=ctx.is_primary)
        train_module = task.get_trainable_module()
    optimizer = _optimizer(config.optimiser, train_module, model_section.model)
    precision = resolve_precision(config.loop.amp, config.loop.amp_dtype, ctx.device)
    model_ema = (ModelEmaV3(model, decay=model_section.model_ema_decay, use_warmup=model_section.model_ema_warmup)
                 if model_section.model_ema else None)

    sampler = train_sampler(train_set, ctx, data.aug_repeats > 0, config.loop.seed, num_repeats=data.aug_repeats)
    train_loader = build_loader(train_set, sampler, data.batch_size, data.workers, True, ctx.device)
    val_loader = build_loader(val_set, eval_sampler(config.loop.seed, val_set, ctx, model),
                              data.batch_size, data.workers, False, ctx.device)
    if device_normalize:
        train_loader = prefetch_to_device(train_loader, preprocessing, ctx.device, augmentation.reprob,
                                          augmentation.remode, augmentation.recount)
        val_loader = prefetch_to_device(val_loader, preprocessing, ctx.device)
    # the schedule counts optimizer updates: one per accumulation group of --grad-accum-steps batches
    updates_per_epoch = len(accumulation_groups(len(train_loader), config.optimiser.grad_accum_steps))
    if schedule.sched == ONECYCLE_LINEAR:
        scheduler, num_epochs = OneCycleLinearScheduler(optimizer, schedule.epochs * updates_per_epoch), schedule.epochs
    else:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=schedule.sched, num_epochs=schedule.epochs, decay_epochs=schedule.decay_epochs,
            decay_rate=schedule.decay_rate, cooldown_epochs=schedule.cooldown_epochs, min_lr=schedule.min_lr,
            warmup_lr=schedule.warmup_lr, warmup_epochs=schedule.warmup_epochs, updates_per_epoch=updates_per_epoch,
            patience_epochs=schedule.patience_epochs, plateau_mode=plateau_mode(config.loop.eval_metric))
    return TrainingRun(config=config, model=model, model_ema=model_ema, optimizer=optimizer, scheduler=scheduler,
                       precision=precision, train_set=train_set, val_set=val_set, sampler=sampler,
                       train_loader=train_loader, val_loader=val_loader, num_classes=num_classes,
                       num_epochs=num_epochs, folder=folder, loss_fn=loss_fn, mixup=mixup,
                       edge_loss_weight=edge_loss_weight, task=task, train_module=train_module,
                       model_dtype=model_dtype, updates_per_epoch=updates_per_epoch)


def _build_checked_model(model_section: ModelSection, num_classes: int) -> nn.Module:
    """`build_model`, refusing an --img-size at which the first graph has fewer nodes than its k (unless
    --allow-small-graph; see `vig.trainer.graph_size`)."""
    pretrained_cfg = get_pretrained_cfg(model_section.model)
    default_size = pretrained_cfg.input_size[-1] if pretrained_cfg is not None else 0
    check = bool(model_section.img_size) and not model_section.allow_small_graph and default_size > 0
    build = section_builder(build_model, model_section, num_classes)
    try:
        model = build_model(model_section, num_classes)
    except UsageError:
        if check:  # the model refused the size (a single node): name the smallest one that works
            require_graph_size(None, model_section.img_size, build, default_size)
        raise
    if check:
        require_graph_size(model, model_section.img_size, build, default_size)
    return model


def resume_training(run: TrainingRun, ctx: DistributedContext) -> None:
    """Restore --resume's state into ``run`` and set its start epoch (also from --start-epoch)."""
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


def prepare_loop(run: TrainingRun, ctx: DistributedContext) -> None:
    """DDP / torch.compile wrappers, the checkpoint saver, args.yaml and the experiment logs (primary rank).

    With distillation the task wraps its trainable module in DDP (the teacher stays unwrapped) and the
    student (`run.model`) is validated and saved unwrapped."""
    config = run.config
    device_ids = [ctx.device] if ctx.device.type == "cuda" else None
    if run.task is not None:
        if config.model.torchcompile:
            raise UsageError("--torchcompile is not supported with --kd-model-name")
        if ctx.distributed:
            run.task.prepare_distributed(device_ids=device_ids)
        run.train_module = run.task.get_trainable_module()
    else:
        if ctx.distributed:
            run.model = DistributedDataParallel(run.model, device_ids=device_ids)
        if config.model.torchcompile:
            run.model = torch.compile(run.model, backend=config.model.torchcompile)
        run.train_module = run.model
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
    resume_at = None
    if run.position is not None and run.position["epoch"] == epoch:
        mine = run.position["ranks"][ctx.rank]
        resume_at = (run.position["step"], tuple(mine["sums"]), lambda: restore_generators(mine["generators"]))
        num_updates = run.position["num_updates"]
        run.position = None
    stats = train_one_epoch(epoch, run.train_module, run.train_loader, run.optimizer, run.loss_fn, ctx,
                            run.precision, num_updates, scheduler=run.scheduler, mixup=run.mixup,
                            model_ema=run.model_ema, clip_grad=config.optimiser.clip_grad,
                            clip_mode=config.optimiser.clip_mode,
                            channels_last=config.model.channels_last, log_interval=config.loop.log_interval,
                            skip_nonfinite=config.loop.skip_nonfinite, edge_loss_weight=run.edge_loss_weight,
                            grad_accum_steps=config.optimiser.grad_accum_steps, task=run.task,
                            model_dtype=run.model_dtype,
                            ema_source=unwrap_model(run.model), resume_at=resume_at,
                            should_stop=lambda step: _agreed_stop(ctx) > 0, skip_streak=run.skip_streak,
                            max_consecutive_skips=config.loop.max_consecutive_skips or DEFAULT_MAX_CONSECUTIVE_SKIPS)
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
                             title="eval EMA",
                             model_dtype=run.model_dtype)
        row.update(ema_eval_loss=ema_stats.loss, ema_eval_top1=ema_stats.top1, ema_eval_top5=ema_stats.top5)
        metric = getattr(ema_stats, config.loop.eval_metric)
    run.scheduler.step(epoch + 1, metric)
    corrupt = all_reduce_sum(torch.tensor([take_corrupt_count(run.train_set), take_corrupt_count(run.val_set)],
                                          dtype=torch.float64), ctx)
    return EpochResult(stats, eval_stats, row, metric, shard_images, corrupt)


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
    ranks = all_gather_objects({"generators": capture_generators(), "sums": list(stats.local_sums)}, ctx)
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


def run(config: TrainConfig) -> dict[str, Any] | None:
    """Train, or evaluate with --evaluate (returns the result dict on the primary rank)."""
    ctx = init_distributed(config.distributed.local_rank, config.distributed.device)
    try:
        seed_everything(config.loop.seed, ctx.rank)
        if config.loop.evaluate:
            return evaluate(config, ctx)
        train(config, ctx)
        return None
    finally:
        release_run_lock()
        shutdown_distributed()
