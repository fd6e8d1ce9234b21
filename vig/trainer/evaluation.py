"""The evaluation run (--evaluate): a checkpoint measured on the validation split, the result as a dict."""
from __future__ import annotations

import logging
from typing import Any

import torch
from timm.utils import unwrap_model
from torch import nn

from vig.errors import UsageError
from vig.graph_info import describe_graph
from vig.trainer.config import DataSection, TrainConfig
from vig.trainer.data import (DataConfig, build_dataset, build_loader, device_normalizes, eval_transform,
                              is_cifar_input, prefetch_to_device, resolve_preprocessing)
from vig.trainer.distributed import DistributedContext, all_gather_objects
from vig.trainer.engine import validate
from vig.trainer.precision import Precision, resolve_precision
from vig.trainer.results import write_results
from vig.trainer.setup import apply_checkpoint_settings, build_model, eval_sampler, pretrained_classes
from vig.trainer.threads import set_cpu_threads

_LOGGER = logging.getLogger(__name__)


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


def weights_source(model: nn.Module) -> str | None:
    """Where the pretrained weights of ``model`` came from (its pretrained config): a file, a URL or a hub file."""
    config = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    if config.get("file"):
        return str(config["file"])
    if config.get("hf_hub_id"):
        return f"hf-hub:{config['hf_hub_id']}/{config.get('hf_hub_filename') or ''}".rstrip("/")
    return config.get("url") or None


def compiled(model: nn.Module, backend: str | None) -> nn.Module:
    """``model`` wrapped by ``torch.compile`` with ``backend`` (--torchcompile), or ``model`` itself for None.
    Compilation happens at the first batch; the wrapper shares the model's parameters."""
    if backend is None:
        return model
    _LOGGER.info("torch.compile: backend %s", backend)
    return torch.compile(model, backend=backend)


def evaluate(config: TrainConfig, ctx: DistributedContext) -> dict[str, Any] | None:
    """Evaluate --pretrain_path (or the --pretrained weights) on the validation split; the result dict on the
    primary rank (also written to --results-file), else None."""
    config, source = apply_checkpoint_settings(config, use_class_count=True)
    if source is None and config.data.num_classes is None:  # --pretrained: the published head's class count
        config = config.replace(data={"num_classes": pretrained_classes(config.model)})
    data, loop = config.data, config.loop
    val_set, classes = build_dataset(data, data.val_split, is_training=False, seed=loop.seed)
    num_classes = evaluation_classes(
        data, config.model.initial_checkpoint or f"the pretrained {config.model.model}", classes)
    model = build_model(config.model, num_classes, source, use_ema=config.model.model_ema)
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
    result = {**_described(config, model, source is not None, preprocessing, num_classes, precision, model_dtype),
              "top1": stats.top1, "top5": stats.top5, "loss": stats.loss, "count": stats.count,
              "batch_size": data.batch_size, "last_batch_sizes": last_batches,
              "eval_order": "dataset" if sampler.shuffle_seed is None else f"shuffled (seed {sampler.shuffle_seed})"}
    if loop.results_file:
        write_results(loop.results_file, result)
    return result


def _described(config: TrainConfig, model: nn.Module, from_checkpoint: bool, preprocessing: DataConfig,
               num_classes: int, precision: Precision, model_dtype: torch.dtype | None) -> dict[str, Any]:
    """The result's description of what was evaluated: model, weights, input, numerics and graph."""
    graph = describe_graph(model)
    published = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    return {"model": config.model.model, "checkpoint": config.model.initial_checkpoint or weights_source(model),
            "ema": config.model.model_ema if from_checkpoint else bool(published.get("use_ema")),
            "img_size": preprocessing.input_size[-1],
            "crop_pct": None if is_cifar_input(preprocessing) else preprocessing.crop_pct, "num_classes": num_classes,
            "model_dtype": str(model_dtype or torch.float32).removeprefix("torch."),
            "amp": str(precision.dtype).removeprefix("torch.") if precision.dtype is not None else None,
            "channels_last": config.model.channels_last, "torchcompile": config.model.torchcompile,
            "graph": graph.label, "start_thresh": graph.start_thresh, "dec": graph.dec,
            "tta": config.loop.tta if config.loop.flip_tta else 0}
