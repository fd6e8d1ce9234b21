"""The typed, frozen configuration of a train.py run: one section per concern, each checked where it is defined.

The config is the one place a setting is declared: each field carries, through `flag`, its command-line
name(s), help, choices and default, and `vig.trainer.cli.build_parser` generates the argparse parser from
these fields (value type and count come from the field's annotation). Adding a flag is adding one field.

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
from typing import Any, Iterator, Mapping

from vig.model_settings import ModelSettings
from vig.errors import UsageError
from vig.trainer.policies import (REPEATED_AUG_REPEATS, SYNTHETIC_DATASET, TRAIN_CROPS, TV_RAND_PREFIX,
                                  check_aa_policy)
from vig.trainer.schedule import ONECYCLE_LINEAR

__all__ = ["AugmentSection", "DataSection", "DistillSection", "DistributedSection", "FlagSpec", "LoggingSection",
           "LoopSection", "ModelSection", "OptimSection", "RunFolderSection", "ScheduleSection", "TrainConfig",
           "DEFAULT_LR", "DEFAULT_MAX_CONSECUTIVE_SKIPS", "DEFAULT_MODEL", "FLIP_TTA", "SECTION_TITLES",
           "TIMM_SCHEDULES", "flag", "flag_fields"]

# the names timm.scheduler.create_scheduler_v2 builds (timm 1.0)
TIMM_SCHEDULES = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt")
DEFAULT_MODEL = "vig_ti_224_gelu"  # the model without --model and without a checkpoint that names one
DEFAULT_LR = 1e-3  # the learning rate without --lr and --lr-base
DEFAULT_MAX_CONSECUTIVE_SKIPS = 5  # --skip-nonfinite stops the run after this many skipped steps in a row

FLIP_TTA = 2  # --tta factor of the flip average (the image and its mirror); 0 and 1 are off

Pair = tuple[float, float]
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class FlagSpec:
    """How a config field appears on the command line (the field itself holds the default and the type).

    ``names``: the option strings, the first long one being the flag's name (empty: ``--`` + the field name
    with dashes); ``positional``: the field is the positional argument named ``metavar``; ``kwargs``: a K=V
    list parsed into a dict of Python literals; ``nargs`` / ``const``: argparse's, where the annotation does not
    say (an open-ended tuple, an optional value).
    """

    help: str
    names: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: str | None = None
    const: Any = None
    positional: bool = False
    kwargs: bool = False


def flag(default: Any = None, *names: str, help: str, choices: tuple[Any, ...] | None = None,
         metavar: str | tuple[str, ...] | None = None, nargs: str | None = None, const: Any = None,
         positional: bool = False, kwargs: bool = False) -> Any:
    """A dataclass field with ``default`` that is also a train.py flag (`FlagSpec`); a dict or tuple default
    becomes a default factory (a fresh value per config)."""
    spec = FlagSpec(help=help, names=names, choices=choices, metavar=metavar, nargs=nargs, const=const,
                    positional=positional, kwargs=kwargs)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"flag": spec})
    return field(default=default, metadata={"flag": spec})


def flag_fields(section: type) -> Iterator[tuple[dataclasses.Field, FlagSpec]]:
    """The fields of a section (or of `TrainConfig` itself) that are flags, with their `FlagSpec`."""
    for item in dataclasses.fields(section):
        spec = item.metadata.get("flag")
        if spec is not None:
            yield item, spec


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
    """Where the images come from and how they are batched."""

    data_dir: str | None = flag(None,
        help='dataset root (default: the embedded synthetic demo set)', positional=True, metavar='DIR')
    data_dir_option: str | None = flag(None, '--data-dir',
        help="dataset root, as the positional DIR (timm's spelling)", metavar='DIR')
    dataset: str = flag("",
        help="'' = ImageFolder under DIR; torch/cifar10, torch/cifar100; wds/NAME (webdataset shards in DIR with "
             'DIR/_info.json); hfds/FOLDER (a local Hugging Face dataset folder); synthetic (embedded demo)')
    train_num_samples: int | None = flag(None,
        help="wds: training images per epoch (default: the split's count in _info.json)", metavar='N')
    val_num_samples: int | None = flag(None,
        help="wds: validation images (default: the split's count in _info.json)", metavar='N')
    input_key: str | None = flag(None,
        help='wds / hfds: the image field (default: jpg;png;webp for wds, image for hfds)')
    input_img_mode: str = flag("RGB", help='wds / hfds: PIL mode the images are converted to')
    target_key: str | None = flag(None,
        help='wds: a field of the json sidecar (default: the .cls file); hfds: the label feature (default: label)')
    dataset_download: bool = flag(False, help='download torch/* datasets into DIR')
    train_split: str = flag("train", help='training split folder / name')
    val_split: str = flag("val", help="validation split ('val' falls back to 'validation')")
    num_classes: int | None = flag(None, help='classifier outputs (default: number of classes in the data)')
    crop_pct: float | None = flag(None, help='centre-crop fraction for validation')
    mean: Triple | None = flag(None, help='normalisation mean', metavar='M')
    std: Triple | None = flag(None, help='normalisation std', metavar='S')
    interpolation: str = flag("", help='resize interpolation (bilinear, bicubic, ...)')
    workers: int = flag(4, '-j', '--workers', help='data loading processes per training process')
    batch_size: int = flag(128, '-b', '--batch-size', help='batch size per process')
    repeated_aug: bool = flag(False,
        help=f'repeated augmentation: each image {REPEATED_AUG_REPEATS} times per epoch, copies on different ranks '
             f'(the same as --aug-repeats {REPEATED_AUG_REPEATS})')
    aug_repeats: int = flag(0,
        help='repeated augmentation with N copies of each image per epoch (0 = off)', metavar='N')
    skip_corrupt: bool = flag(False,
        help='replace an image file that does not decode by the next readable one and count it (default: stop, naming '
             'the file)')

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


@dataclass(frozen=True)
class AugmentSection:
    """Training augmentation and the regularising losses."""

    train_crop: str | None = flag(None,
        help='training crop: pad = random crop of the 4-px-padded image (32-px inputs only), rrc = random-resized crop '
             '(default: pad at 32 px, else rrc)', choices=TRAIN_CROPS)
    scale: Pair | None = flag(None,
        help="random-resized crop: range of the crop's area fraction (default 0.08 1)", metavar='S')
    ratio: Pair | None = flag(None,
        help="random-resized crop: range of the crop's aspect ratio (default 0.75 1.333)", metavar='R')
    aa: str | None = flag(None,
        help="timm AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1, or torchvision's RandAugment: "
             f'{TV_RAND_PREFIX}[-n<ops>][-m<magnitude 0..bins-1>][-b<bins>], e.g. {TV_RAND_PREFIX}-n2-m12')
    color_jitter: float = flag(0.4, help='colour jitter strength')
    force_color_jitter: bool = flag(False,
        help='keep --color-jitter with --aa (applied after the policy); by default --aa replaces it')
    reprob: float = flag(0.0, help='random erasing probability')
    remode: str = flag("pixel", help='random erasing mode')
    recount: int = flag(1, help='random erasing count')
    mixup: float = flag(0.0, help='mixup alpha (active if > 0)')
    cutmix: float = flag(0.0, help='cutmix alpha (active if > 0)')
    mixup_prob: float = flag(1.0, help='probability of mixup or cutmix per batch')
    mixup_switch_prob: float = flag(0.5, help='probability of cutmix when both on')
    smoothing: float = flag(0.1, help='label smoothing')
    bce_loss: bool = flag(False,
        help="binary cross-entropy on the (smoothed / mixed) targets instead of cross-entropy (timm's "
             'BinaryCrossEntropy)')
    bce_target_thresh: float | None = flag(None, help='--bce-loss: binarise the soft targets at this threshold')
    bce_sum: bool = flag(False, help='--bce-loss: sum over classes instead of the mean')
    bce_pos_weight: float | None = flag(None, help='--bce-loss: weight of positive targets')
    edge_loss_weight: float | None = flag(None,
        help='weight of the batch-graph edge loss, BCE(edge_sim, same-class matrix), added to the classification loss '
             '(models with an edge head, e.g. bgnn; default 1)', metavar='W')

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
        check_aa_policy(self.aa)
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

    model: str | None = flag(None,
        help=f"timm model name (default: the --pretrain_path checkpoint's, else {DEFAULT_MODEL})")
    model_kwargs: Mapping[str, Any] = flag({},
        help='extra keyword arguments for timm.create_model', metavar='K=V', kwargs=True)
    img_size: int | None = flag(None, help="input image size (default: the model's)")
    input_size: tuple[int, int, int] | None = flag(None,
        help='input dimensions 3 H W with H = W: the same as --img-size H', metavar=('C', 'H', 'W'))
    pretrained: bool = flag(False,
        help="start from the model's pretrained weights (timm's pretrained loading: the hub / cache unless "
             '--pretrained-path); the head is reset when --num-classes differs')
    pretrained_path: str | None = flag(None,
        help="load FILE as the model's pretrained weights (implies --pretrained): through the model's "
             'checkpoint_filter_fn, the classifier reset when its class count differs', metavar='FILE')
    initial_checkpoint: str = flag("", '--initial-checkpoint', '--pretrain_path', '--pretrain-path', '--checkpoint',
        help="weights to start from (required with --evaluate; --checkpoint is timm validate.py's spelling)",
        metavar='PATH')
    drop: float = flag(0.0, help='dropout rate')
    drop_path: float | None = flag(None, help='stochastic depth rate')
    start_thresh: float | None = flag(None,
        help='SViG: similarity threshold of the first block, in (0, 1); omit for kNN ViG')
    dec: float | None = flag(None, help='SViG: threshold decrement per block (>= 0)')
    channels_last: bool = flag(False, help='channels-last memory layout')
    allow_small_graph: bool = flag(False,
        help='train at an --img-size whose first graph layer has fewer nodes than its k (refused by default, naming '
             'the smallest size that works)')
    grad_checkpointing: bool = flag(False,
        help='recompute block activations in the backward pass (less memory, more compute)')
    torchcompile: str | None = flag(None,
        help='torch.compile the model (default backend: inductor)', metavar='BACKEND', nargs='?', const='inductor')
    model_ema: bool = flag(False, '--model-ema', '--use-ema',
        help="keep an EMA of the weights (training); evaluate the EMA weights (--evaluate; --use-ema is timm "
             "validate.py's spelling)")
    model_ema_decay: float = flag(0.9998, help='EMA decay')
    model_ema_warmup: bool = flag(False,
        help="EMA decay warm-up: min(decay, (1 + updates) / (10 + updates)) (timm's ModelEmaV3)")
    model_dtype: str | None = flag(None,
        help='train and evaluate with weights and inputs in this dtype (not with --amp; default: float32)',
        choices=('float32', 'float64', 'bfloat16'))

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

    opt: str = flag("adamw", help='timm optimizer name')
    opt_eps: float | None = flag(None, help='optimizer epsilon')
    opt_betas: tuple[float, ...] | None = flag(None, help='optimizer betas', nargs='+')
    momentum: float = flag(0.9, help='SGD momentum')
    weight_decay: float = flag(0.05, help='weight decay (not applied to norms, biases, position embeddings)')
    clip_grad: float | None = flag(None, help='gradient clipping threshold')
    clip_mode: str = flag("norm", help='gradient clipping mode', choices=('norm', 'value', 'agc'))
    lr: float | None = flag(None, help=f'learning rate; wins over --lr-base (unset and no --lr-base: {DEFAULT_LR:g})')
    lr_base: float | None = flag(None,
        help='base learning rate: lr = lr_base * (global batch / --lr-base-size), the ratio square-rooted with '
             '--lr-base-scale sqrt; used only without --lr')
    lr_base_size: int = flag(256,
        help='global batch size (batch x processes x --grad-accum-steps) at which lr = lr_base')
    lr_base_scale: str = flag("",
        help="'' = sqrt for Ada* / Lamb optimizers, linear otherwise (timm's rule)", choices=('', 'linear', 'sqrt'))
    layer_decay: float | None = flag(None,
        help="layer-wise learning-rate decay: the model's group_matcher layers, the head at lr, each layer below at "
             'decay x the one above')
    grad_accum_steps: int = flag(1,
        help='accumulate the gradients of N batches per optimizer update (the schedule counts updates; the last group '
             'of an epoch may be smaller)', metavar='N')

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

    sched: str = flag("cosine",
        help=f'timm scheduler, or {ONECYCLE_LINEAR} (per step 0 -> --lr at 40 %% -> --lr / 20 at 80 %% -> 0; '
             'ignores the warm-up, --min-lr and cooldown flags)',
        choices=(*TIMM_SCHEDULES, ONECYCLE_LINEAR))
    epochs: int = flag(300, help='training epochs')
    warmup_epochs: int = flag(5, help='linear warm-up epochs')
    warmup_lr: float = flag(1e-5, help='learning rate at the start of warm-up')
    min_lr: float = flag(0.0, help='floor of the cosine / poly schedule')
    cooldown_epochs: int = flag(0,
        help='epochs at min-lr after the schedule; plateau: epochs without decay after a decay')
    patience_epochs: int = flag(10, help='plateau: epochs without improvement of --eval-metric before the lr decays')
    decay_epochs: float = flag(90, help='step schedule: epochs between decays')
    decay_rate: float = flag(0.1, help='step schedule: decay factor')

    def __post_init__(self) -> None:
        _require(self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        _require(self.cooldown_epochs >= 0, f"--cooldown-epochs must be >= 0, got {self.cooldown_epochs}")
        _require(self.patience_epochs >= 0, f"--patience-epochs must be >= 0, got {self.patience_epochs}")
        _require(self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class DistillSection:
    """Knowledge distillation from a teacher (timm.task); off without ``kd_model_name``."""

    kd_model_name: str | None = flag(None,
        help='teacher model (timm name); needs --kd-pretrained-path', metavar='MODEL')
    kd_pretrained_path: str | None = flag(None,
        help="the teacher's weights: a train.py checkpoint or a state dict (never downloaded)", metavar='FILE')
    kd_model_kwargs: Mapping[str, Any] = flag({},
        help="extra keyword arguments for the teacher's timm.create_model", metavar='K=V', kwargs=True)
    kd_distill_type: str = flag("logit",
        help='logit: KL of the softened logits; feature: MSE of the pooled pre-logits (a learned projection when '
             "widths differ); token: the student's distillation head (DeiT-style)",
        choices=('logit', 'feature', 'token'))
    kd_token_distill_type: str = flag("soft",
        help="token distillation: soft = KL with temperature, hard = CE with the teacher's argmax",
        choices=('soft', 'hard'))
    kd_temperature: float = flag(4.0, help='softmax temperature of logit / token KD')
    distill_loss_weight: float | None = flag(None,
        help='weight of the distillation loss (1 when only it or neither weight is given)')
    task_loss_weight: float | None = flag(None,
        help='weight of the classification loss; given alone, the distillation weight is 1 - it')

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

    amp: bool = flag(False, help='mixed precision (bfloat16 where supported, else float16)')
    amp_dtype: str | None = flag(None, help='force the AMP dtype', choices=('bfloat16', 'float16'))
    seed: int = flag(42, help='random seed; each epoch and rank reseeds from (seed, epoch, rank)')
    skip_nonfinite: bool = flag(False,
        help='skip a training step whose loss is NaN / infinite, or whose update makes a weight so, and count it: the '
             'step leaves no trace (weights, BatchNorm statistics, optimizer, EMA); costs a copy of weights and '
             'optimizer state per step (default: stop)')
    max_consecutive_skips: int | None = flag(None,
        help=f'with --skip-nonfinite: stop the run after N steps skipped in a row '
             f'(default {DEFAULT_MAX_CONSECUTIVE_SKIPS})',
        metavar='N')
    log_interval: int = flag(50, help='batches between log lines')
    val_interval: int = flag(1, help='validate and save checkpoints every N epochs (and after the last)', metavar='N')
    eval_metric: str = flag("top1",
        help='validation figure that ranks checkpoints (loss: lower is better; of the EMA with --model-ema)',
        choices=('top1', 'top5', 'loss'))
    # a bool in configs written before --tta took a factor
    tta: int = flag(0, help=f"test-time augmentation factor in validation (timm's integer): {FLIP_TTA} = the image "
                            f"and its horizontal mirror, 0 or 1 = off; bare --tta = {FLIP_TTA}",
                    metavar="N", nargs="?", const=FLIP_TTA)
    evaluate: bool = flag(False, help='only evaluate --pretrain_path on the val split')
    results_file: str | None = flag(None,
        help='--evaluate: also write the result to PATH, CSV for a .csv name, else JSON', metavar="PATH")
    resume: str = flag("",
        help="resume training from a checkpoint; 'auto' = last.pth.tar of the experiment if any, else start fresh (for "
             'torchrun --max-restarts)', metavar='PATH|auto')
    no_resume_opt: bool = flag(False,
        help='on resume, restore weights and epoch but not optimizer / scheduler / scaler')
    start_epoch: int | None = flag(None, help='override the starting epoch')

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
        _require_readable("--resume", "" if self.resume == "auto" else self.resume)

    @property
    def flip_tta(self) -> bool:
        """Whether validation averages the logits of each image and its horizontal mirror (--tta 2)."""
        return self.tta == FLIP_TTA


@dataclass(frozen=True)
class RunFolderSection:
    """Where the run writes: output root, run folder name, checkpoints kept."""

    output: str = flag("", help='output root (default ./output/train)', metavar='DIR')
    experiment: str = flag("", help='run folder name under --output (default: dated)')
    checkpoint_hist: int = flag(10, help='number of best epoch checkpoints kept')
    break_lock: bool = flag(False,
        help="take the run folder over even when its lock (.run.lock) names a run that may be alive (another host's, "
             'which cannot be checked from here); logged')

    def __post_init__(self) -> None:
        _require(self.checkpoint_hist > 0, f"--checkpoint-hist must be positive, got {self.checkpoint_hist}")


@dataclass(frozen=True)
class LoggingSection:
    """Experiment logs besides summary.csv (`vig.trainer.explog`)."""

    log_wandb: bool = flag(False,
        help="log each epoch's summary row to Weights & Biases (pip install 'vig-toolkit[logging]'; WANDB_MODE=offline "
             'honoured)')
    wandb_project: str | None = flag(None, help="W&B project (default: wandb's)")
    wandb_tags: tuple[str, ...] = flag((), help='W&B run tags', nargs='*')
    log_tensorboard: str | None = flag(None,
        help="write each epoch's summary row as TensorBoard scalars into DIR (pip install 'vig-toolkit[logging]')",
        metavar='DIR')

    def __post_init__(self) -> None:
        _fix(self, "wandb_tags", tuple(self.wandb_tags))


@dataclass(frozen=True)
class DistributedSection:
    """Device and process group (`vig.trainer.distributed`)."""

    device: str | None = flag(None,
        help='training device type (default: cuda when available, else cpu; cuda:LOCAL_RANK per process)',
        choices=('cpu', 'cuda'))
    local_rank: int | None = flag(None, '--local-rank', '--local_rank',
        help='set by torch.distributed.launch; LOCAL_RANK in the environment wins')
    sync_bn: bool = flag(False, help='synchronised BatchNorm across processes')


# the sections of TrainConfig, by attribute name
_SECTIONS: dict[str, type] = {
    "data": DataSection, "augmentation": AugmentSection, "model": ModelSection, "optimiser": OptimSection,
    "schedule": ScheduleSection, "distill": DistillSection, "loop": LoopSection, "run_folder": RunFolderSection,
    "logging": LoggingSection, "distributed": DistributedSection,
}
# the title of each section's group in --help
SECTION_TITLES: dict[str, str] = {
    "data": "data", "augmentation": "augmentation and regularisation", "model": "model", "optimiser": "optimizer",
    "schedule": "schedule", "distill": "knowledge distillation (timm.task)", "loop": "training and evaluation loop",
    "run_folder": "run folder", "logging": "experiment logs", "distributed": "device and processes",
}


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
    config: str = flag("", "-c", "--config", metavar="FILE",
                       help="YAML file whose keys (flag names, - or _) set defaults, values checked as the flags' own; "
                            "flags given win")

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
                elif isinstance(value, tuple):  # a flag of several values: a list in YAML
                    value = list(value)
                flags[item.name] = value
        return flags

    def replace(self, **sections: Any) -> TrainConfig:
        """A new config with the given sections' fields replaced: ``replace(model={"img_size": 32})``."""
        changed = {name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()}
        return dataclasses.replace(self, **changed)
