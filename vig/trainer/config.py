"""The typed, frozen configuration of a train.py run: one section per concern, each checked where it is defined.

`vig.trainer.cli.parse_args` builds a `TrainConfig` from the flags; every module of the trainer takes the
section it needs (`vig.trainer.data` the data and augmentation sections, ...). Field names are the flags'
destinations (``--img-size`` -> ``img_size``), so `TrainConfig.to_flags` gives back the flat dict of flag
names that args.yaml and a checkpoint's ``args`` hold, and `TrainConfig.from_flags` reads it. A value that
cannot work raises `UsageError` with a one-line message when its section is built; settings resolved later
(the learning rate, the model a checkpoint records) make a new config with `dataclasses.replace`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from timm.data import auto_augment

from vig.checkpoint import ModelSettings
from vig.errors import UsageError
from vig.trainer.data import REPEATED_AUG_REPEATS, SYNTHETIC_DATASET, is_tv_rand_policy, tv_rand_augment

__all__ = ["AugmentSection", "DataSection", "DistillSection", "DistributedSection", "LoggingSection", "LoopSection",
           "ModelSection", "OptimSection", "RunFolderSection", "ScheduleSection", "TrainConfig", "TIMM_SCHEDULES",
           "FLIP_TTA"]

# the names timm.scheduler.create_scheduler_v2 builds (timm 1.0)
TIMM_SCHEDULES = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt")

FLIP_TTA = 2  # --tta factor of the flip average (the image and its mirror); 0 and 1 are off

Pair = tuple[float, float]
Triple = tuple[float, float, float]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _fix(section: Any, name: str, value: Any) -> None:
    """Set a field of a frozen section while it is being built (aliases folded in __post_init__)."""
    object.__setattr__(section, name, value)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class DataSection:
    """Where the images come from and how they are batched (flags of the "data" group but the image size)."""

    data_dir: str | None = None
    data_dir_option: str | None = None  # --data-dir, timm's spelling of the positional DIR
    dataset: str = ""
    train_num_samples: int | None = None
    val_num_samples: int | None = None
    input_key: str | None = None
    input_img_mode: str = "RGB"
    target_key: str | None = None
    dataset_download: bool = False
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None
    crop_pct: float | None = None
    mean: Triple | None = None
    std: Triple | None = None
    interpolation: str = ""
    workers: int = 4
    batch_size: int = 128
    repeated_aug: bool = False  # the same as --aug-repeats 3
    aug_repeats: int = 0
    skip_corrupt: bool = False

    def __post_init__(self) -> None:
        _fix(self, "mean", _tuple(self.mean))
        _fix(self, "std", _tuple(self.std))
        _require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        _require(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        _require(self.aug_repeats >= 0, f"--aug-repeats must be >= 0, got {self.aug_repeats}")
        _require(self.aug_repeats != 1, "--aug-repeats 1 repeats nothing: use 0 (off) or >= 2")
        _require(self.num_classes is None or self.num_classes > 0,
                 f"--num-classes must be positive, got {self.num_classes}")
        _require(self.crop_pct is None or 0 < self.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        if self.dataset.startswith("torch/"):
            _require(self.dataset in ("torch/cifar10", "torch/cifar100"),
                     f"--dataset {self.dataset!r} is not supported (torch/cifar10, torch/cifar100)")
        elif self.dataset.startswith(("wds/", "hfds/")):
            _require(len(self.dataset.split("/", 1)[1]) > 0,
                     f"--dataset {self.dataset!r}: name the dataset after the /")
        else:
            _require(self.dataset in ("", SYNTHETIC_DATASET),
                     f"--dataset {self.dataset!r} is not supported ('' = ImageFolder, torch/cifar10, "
                     f"torch/cifar100, wds/NAME, hfds/FOLDER, {SYNTHETIC_DATASET})")
        for name in ("train_num_samples", "val_num_samples"):
            value = getattr(self, name)
            flag = f"--{name.replace('_', '-')}"
            _require(value is None or value > 0, f"{flag} must be positive, got {value}")
            _require(value is None or self.dataset.startswith("wds/"),
                     f"{flag} sets the epoch length of a wds/ stream; other sources have a length")
        if self.data_dir_option is not None:
            _require(self.data_dir in (None, self.data_dir_option),
                     f"DIR {self.data_dir} and --data-dir {self.data_dir_option} differ; give one of them")
            _fix(self, "data_dir", self.data_dir_option)
        if self.repeated_aug:
            _require(self.aug_repeats in (0, REPEATED_AUG_REPEATS),
                     f"--repeated-aug means --aug-repeats {REPEATED_AUG_REPEATS}, got --aug-repeats {self.aug_repeats}")
            _fix(self, "aug_repeats", REPEATED_AUG_REPEATS)


def _require_timm_policy(policy: str) -> None:
    """Build timm's augmentation for `policy` once, so that a malformed one is a usage error, not an assertion
    deep in the first training batch."""
    if policy.startswith("rand"):
        build = auto_augment.rand_augment_transform
    elif policy.startswith("augmix"):
        build = auto_augment.augment_and_mix_transform
    else:
        build = auto_augment.auto_augment_transform
    try:
        build(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError):
        raise UsageError(f"--aa {policy!r} is not a timm augmentation policy (e.g. rand-m9-mstd0.5-inc1, "
                         "augmix-m5-w3, original, v0, 3a) nor tv-rand[-n<ops>][-m<magnitude>][-b<bins>]") from None


@dataclass(frozen=True)
class AugmentSection:
    """Training augmentation and the regularising losses (the "augmentation and regularisation" group)."""

    train_crop: str | None = None
    scale: Pair | None = None
    ratio: Pair | None = None
    aa: str | None = None
    color_jitter: float = 0.4
    force_color_jitter: bool = False
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    bce_loss: bool = False
    bce_target_thresh: float | None = None
    bce_sum: bool = False
    bce_pos_weight: float | None = None
    edge_loss_weight: float | None = None

    def __post_init__(self) -> None:
        _fix(self, "scale", _tuple(self.scale))
        _fix(self, "ratio", _tuple(self.ratio))
        _require(self.bce_loss or (self.bce_target_thresh is None and not self.bce_sum and self.bce_pos_weight is None),
                 "--bce-target-thresh / --bce-sum / --bce-pos-weight need --bce-loss")
        _require(0 <= self.smoothing < 1, f"--smoothing must be in [0, 1), got {self.smoothing}")
        _require(0 <= self.reprob <= 1, f"--reprob must be in [0, 1], got {self.reprob}")
        if self.scale is not None:
            low, high = self.scale
            _require(0 < low <= high <= 1, f"--scale must be two fractions 0 < low <= high <= 1, got {low:g} {high:g}")
        if self.ratio is not None:
            low, high = self.ratio
            _require(0 < low <= high and math.isfinite(high),
                     f"--ratio must be two aspect ratios 0 < low <= high, got {low:g} {high:g}")
        _require(self.train_crop != "pad" or (self.scale is None and self.ratio is None),
                 "--scale / --ratio set the random-resized crop; they do not apply to --train-crop pad")
        if is_tv_rand_policy(self.aa):
            tv_rand_augment(self.aa)
        elif self.aa:
            _require_timm_policy(self.aa)
        _require(0 <= self.mixup_prob <= 1, f"--mixup-prob must be in [0, 1], got {self.mixup_prob:g}")
        _require(not self.force_color_jitter or bool(self.aa),
                 "--force-color-jitter keeps --color-jitter alongside --aa; without --aa the jitter is always on")
        _require(self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be >= 0")
        _require(self.edge_loss_weight is None or (math.isfinite(self.edge_loss_weight) and self.edge_loss_weight >= 0),
                 f"--edge-loss-weight must be >= 0, got {self.edge_loss_weight}")

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix is on."""
        return self.mixup > 0 or self.cutmix > 0


def _require_readable(flag: str, path: str) -> None:
    if path:
        _require(Path(path).is_file(), f"{flag}: no such file {path}")
        _require(os.access(path, os.R_OK), f"{flag}: cannot read {path}")


@dataclass(frozen=True)
class ModelSection:
    """The model, how it is built and held (weights to start from, EMA, dtype, memory layout, compile)."""

    model: str | None = None  # None until resolved: the --pretrain_path checkpoint's, else the default
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    input_size: tuple[int, int, int] | None = None  # timm's spelling of --img-size: 3 H H
    pretrained: bool = False
    pretrained_path: str | None = None
    initial_checkpoint: str = ""
    drop: float = 0.0
    drop_path: float | None = None
    start_thresh: float | None = None
    dec: float | None = None
    channels_last: bool = False
    allow_small_graph: bool = False  # train at an --img-size whose first graph has fewer nodes than its k
    grad_checkpointing: bool = False
    torchcompile: str | None = None
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    model_dtype: str | None = None

    def __post_init__(self) -> None:
        _fix(self, "model_kwargs", dict(self.model_kwargs))
        _fix(self, "input_size", _tuple(self.input_size))
        if self.pretrained_path:
            _require(Path(self.pretrained_path).is_file(), f"--pretrained-path: no such file {self.pretrained_path}")
        _require(not ((self.pretrained or self.pretrained_path) and self.initial_checkpoint),
                 "--pretrained / --pretrained-path and --initial-checkpoint both give starting weights; give one")
        _require(self.img_size is None or self.img_size > 0, f"--img-size must be positive, got {self.img_size}")
        _require(0 < self.model_ema_decay < 1, f"--model-ema-decay must be in (0, 1), got {self.model_ema_decay}")
        for name in ("drop", "drop_path"):
            value = getattr(self, name)
            _require(value is None or 0 <= value < 1, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.start_thresh is not None:
            _require(math.isfinite(self.start_thresh) and 0 < self.start_thresh < 1,
                     f"--start-thresh must be in (0, 1), got {self.start_thresh}")
        if self.dec is not None:
            _require(self.start_thresh is not None, "--dec needs --start-thresh (it is the SViG threshold decrement)")
            _require(math.isfinite(self.dec) and self.dec >= 0, f"--dec must be >= 0, got {self.dec}")
        _require_readable("--pretrain_path", self.initial_checkpoint)
        if self.input_size is not None:
            channels, height, width = self.input_size
            _require(channels == 3 and height == width > 0,
                     f"--input-size must be 3 H H (RGB, square), got {channels} {height} {width}")
            _require(self.img_size in (None, height), f"--input-size {height} px and --img-size {self.img_size} differ")
            _fix(self, "img_size", height)
        if self.pretrained_path:
            _fix(self, "pretrained", True)

    def settings(self, num_classes: int | None = None) -> ModelSettings:
        """The settings `vig.models.factory.create_model` builds the model from (with ``num_classes``); the
        decrement only with the threshold (a checkpoint may record one without the other)."""
        return ModelSettings(model=self.model, img_size=self.img_size, num_classes=num_classes,
                             start_thresh=self.start_thresh, dec=self.dec if self.start_thresh is not None else None,
                             model_kwargs=dict(self.model_kwargs))


@dataclass(frozen=True)
class OptimSection:
    """The optimiser, its learning rate (or the base rate it is scaled from), clipping and accumulation."""

    opt: str = "adamw"
    opt_eps: float | None = None
    opt_betas: tuple[float, ...] | None = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    clip_grad: float | None = None
    clip_mode: str = "norm"
    lr: float | None = None  # None until resolved (`vig.trainer.run.resolve_lr`)
    lr_base: float | None = None
    lr_base_size: int = 256
    lr_base_scale: str = ""
    layer_decay: float | None = None
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        _fix(self, "opt_betas", _tuple(self.opt_betas))
        _require(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        _require(self.lr_base is None or self.lr_base > 0, f"--lr-base must be positive, got {self.lr_base}")
        _require(self.lr_base_size > 0, f"--lr-base-size must be positive, got {self.lr_base_size}")
        _require(self.layer_decay is None or 0 < self.layer_decay <= 1,
                 f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        _require(self.grad_accum_steps > 0, f"--grad-accum-steps must be positive, got {self.grad_accum_steps}")
        _require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay:g}")


@dataclass(frozen=True)
class ScheduleSection:
    """The learning-rate schedule over the epochs."""

    sched: str = "cosine"
    epochs: int = 300
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    cooldown_epochs: int = 0
    patience_epochs: int = 10
    decay_epochs: float = 90
    decay_rate: float = 0.1

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _require(self.cooldown_epochs >= 0, f"--cooldown-epochs must be >= 0, got {self.cooldown_epochs}")
        _require(self.patience_epochs >= 0, f"--patience-epochs must be >= 0, got {self.patience_epochs}")
        _require(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class DistillSection:
    """Knowledge distillation from a teacher (timm.task); off without ``kd_model_name``."""

    kd_model_name: str | None = None
    kd_pretrained_path: str | None = None
    kd_model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    kd_distill_type: str = "logit"
    kd_token_distill_type: str = "soft"
    kd_temperature: float = 4.0
    distill_loss_weight: float | None = None
    task_loss_weight: float | None = None

    def __post_init__(self) -> None:
        _fix(self, "kd_model_kwargs", dict(self.kd_model_kwargs))
        _require(self.kd_temperature > 0, f"--kd-temperature must be positive, got {self.kd_temperature}")
        _require(bool(self.kd_model_name) == bool(self.kd_pretrained_path),
                 "--kd-model-name and --kd-pretrained-path go together (the teacher's weights are read from a file)")
        if self.kd_pretrained_path:
            _require(Path(self.kd_pretrained_path).is_file(), f"--kd-pretrained-path: no such file {self.kd_pretrained_path}")


@dataclass(frozen=True)
class LoopSection:
    """The training / evaluation loop: precision, seeding, logging cadence, validation, resuming."""

    amp: bool = False
    amp_dtype: str | None = None
    seed: int = 42
    skip_nonfinite: bool = False
    max_consecutive_skips: int | None = None  # None: cli.DEFAULT_MAX_CONSECUTIVE_SKIPS
    log_interval: int = 50
    val_interval: int = 1
    eval_metric: str = "top1"
    tta: int = 0  # FLIP_TTA: the flip average; 0, 1: off (a bool in configs written before it took a factor)
    evaluate: bool = False
    results_file: str | None = None
    resume: str = ""
    no_resume_opt: bool = False
    start_epoch: int | None = None

    def __post_init__(self) -> None:
        _require(self.val_interval > 0, f"--val-interval must be positive, got {self.val_interval}")
        _require(self.log_interval > 0, f"--log-interval must be positive, got {self.log_interval}")
        if self.max_consecutive_skips is not None:
            _require(self.skip_nonfinite, "--max-consecutive-skips needs --skip-nonfinite (without it the first "
                     "non-finite loss stops the run)")
            _require(self.max_consecutive_skips > 0,
                     f"--max-consecutive-skips must be positive, got {self.max_consecutive_skips}")
        _require(self.start_epoch is None or self.start_epoch >= 0,
                 f"--start-epoch must be >= 0, got {self.start_epoch}")
        if isinstance(self.tta, bool):
            _fix(self, "tta", FLIP_TTA if self.tta else 0)
        _require(self.tta in (0, 1, FLIP_TTA), f"--tta {self.tta}: the test-time augmentation here is the flip "
                                               f"average, factor {FLIP_TTA} (0 or 1: off)")
        _require(self.results_file is None or self.evaluate,
                 "--results-file writes the result of --evaluate; training writes summary.csv in its run folder")

    @property
    def flip_tta(self) -> bool:
        """Whether validation averages the logits of each image and its horizontal mirror (--tta 2)."""
        return self.tta == FLIP_TTA
        _require_readable("--resume", "" if self.resume == "auto" else self.resume)


@dataclass(frozen=True)
class RunFolderSection:
    """Where the run writes: output root, run folder name, checkpoints kept."""

    output: str = ""
    experiment: str = ""
    checkpoint_hist: int = 10
    break_lock: bool = False  # take the folder's lock over whoever holds it (vig.trainer.run_lock)

    def __post_init__(self) -> None:
        _require(self.checkpoint_hist > 0, f"--checkpoint-hist must be positive, got {self.checkpoint_hist}")


@dataclass(frozen=True)
class LoggingSection:
    """Experiment logs besides summary.csv (`vig.trainer.explog`)."""

    log_wandb: bool = False
    wandb_project: str | None = None
    wandb_tags: tuple[str, ...] = ()
    log_tensorboard: str | None = None

    def __post_init__(self) -> None:
        _fix(self, "wandb_tags", tuple(self.wandb_tags))


@dataclass(frozen=True)
class DistributedSection:
    """Device and process group (`vig.trainer.distributed`)."""

    device: str | None = None
    local_rank: int | None = None
    sync_bn: bool = False


# the sections of TrainConfig, by attribute name
_SECTIONS: dict[str, type] = {
    "data": DataSection, "augmentation": AugmentSection, "model": ModelSection, "optimiser": OptimSection,
    "schedule": ScheduleSection, "distill": DistillSection, "loop": LoopSection, "run_folder": RunFolderSection,
    "logging": LoggingSection, "distributed": DistributedSection,
}
# flags whose values are lists in args.yaml / a checkpoint's args (tuples in the sections)
_LIST_FLAGS = ("input_size", "mean", "std", "scale", "ratio", "opt_betas", "wandb_tags")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a train.py run, by section; checks that span sections run when it is built."""

    data: DataSection = field(default_factory=DataSection)
    augmentation: AugmentSection = field(default_factory=AugmentSection)
    model: ModelSection = field(default_factory=ModelSection)
    optimiser: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    distill: DistillSection = field(default_factory=DistillSection)
    loop: LoopSection = field(default_factory=LoopSection)
    run_folder: RunFolderSection = field(default_factory=RunFolderSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    config: str = ""  # the -c YAML file the defaults came from

    def __post_init__(self) -> None:
        _require(self.model.model_dtype in (None, "float32") or not (self.loop.amp or self.loop.amp_dtype),
                 f"--model-dtype {self.model.model_dtype} and --amp exclude each other")
        if self.augmentation.mixes and not self.loop.evaluate:
            _require(self.data.batch_size % 2 == 0,
                     f"mixup / cutmix need an even --batch-size, got {self.data.batch_size}")
        if self.loop.evaluate:
            _require(bool(self.model.initial_checkpoint) or self.model.pretrained,
                     "--evaluate needs --pretrain_path CHECKPOINT, or --pretrained for the model's published weights")
            _require(not (self.model.pretrained and self.model.model_ema),
                     "--model-ema selects the EMA weights of --pretrain_path; with --pretrained the pretrained tag "
                     "names its weights (choose the model's tag instead, e.g. svig_ti_224_gelu.in1k_t093_d003)")
        _require(self.loop.resume != "auto" or bool(self.run_folder.experiment),
                 "--resume auto needs --experiment NAME (a fixed run folder in which to look for last.pth.tar)")

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> TrainConfig:
        """The config of a flat dict of flag destinations (``vars`` of the parsed flags, an args.yaml); keys
        that no section has raise UsageError, missing ones take the defaults."""
        names = {name: [item.name for item in dataclasses.fields(section)] for name, section in _SECTIONS.items()}
        unknown = sorted(set(flags) - {"config"}.union(*names.values()))
        _require(not unknown, f"unknown settings: {', '.join(unknown)}")
        sections = {name: section(**{key: flags[key] for key in names[name] if key in flags})
                    for name, section in _SECTIONS.items()}
        return cls(**sections, config=flags.get("config", ""))

    def to_flags(self) -> dict[str, Any]:
        """The flat dict of flag destinations (args.yaml, a checkpoint's ``args``): lists where the flag takes
        several values, dicts for the kwargs; `from_flags` reads it back to an equal config."""
        flags: dict[str, Any] = {"config": self.config}
        for name in _SECTIONS:
            section = getattr(self, name)
            for item in dataclasses.fields(section):
                value = getattr(section, item.name)
                if isinstance(value, dict):
                    value = dict(value)
                elif item.name in _LIST_FLAGS and value is not None:
                    value = list(value)
                flags[item.name] = value
        return flags

    def replace(self, **sections: Any) -> TrainConfig:
        """A new config with the given sections' fields replaced: ``replace(model={"img_size": 32})``."""
        changed = {name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()}
        return dataclasses.replace(self, **changed)
