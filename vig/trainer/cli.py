"""Command-line flags of train.py, the `-c config.yaml` defaults, and validation of user input.

Flag names and meanings follow timm's published training script (docs/training.md, "timm train.py flags", lists
where they differ), plus the ViG/SViG additions (`--pretrain_path`, `--start-thresh`, `--dec`,
`--repeated-aug`, `--tta`) and `--kd-pretrained-path` / `--log-tensorboard`. `parse_args` returns the
typed `vig.trainer.config.TrainConfig`, whose sections check the values; every user mistake found
here or there raises `UsageError` with a one-line message.
"""
from __future__ import annotations

import argparse
import ast
import logging
import sys
from typing import Any, Sequence

import yaml

from vig.checkpoint import ModelSettings, SettingConflict, SettingOverride, merge_settings, setting_overrides
from vig.console import OneLineErrorParser
from vig.errors import UsageError
from vig.trainer.config import FLIP_TTA, TIMM_SCHEDULES, TrainConfig
from vig.trainer.data import TRAIN_CROPS, TV_RAND_PREFIX
from vig.trainer.schedule import ONECYCLE_LINEAR

_LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = "vig_ti_224_gelu"
DEFAULT_LR = 1e-3
DEFAULT_MAX_CONSECUTIVE_SKIPS = 5
KWARGS_FLAGS = ("model_kwargs", "kd_model_kwargs")  # K=V flags, parsed into a dict of Python literals
# keys that configs written by earlier versions hold, of flags since removed: accepted with the value that did
# nothing, refused with any other
RETIRED_KEYS = {
    # datasets >= 4.0 (this project needs >= 5.2) runs no loading scripts: the flag could only fail
    "dataset_trust_remote_code": (False, "--dataset-trust-remote-code was removed: the datasets release this "
                                         "project needs (>= 5.2) runs no loading scripts; convert the dataset to "
                                         "parquet / data files"),
}


def _parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """Turn ["k=v", ...] into a dict; values are Python literals when they parse as one, else strings."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-kwargs expects key=value pairs, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    """All flags of train.py with their defaults."""
    parser = OneLineErrorParser(
        prog="train.py",
        description="Train or evaluate ViG / SViG (or any timm) models, on one device or distributed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a prefix is no flag: --checkpoint is not --checkpoint-hist
    )
    parser.add_argument("-c", "--config", default="", metavar="FILE",
                        help="YAML file whose keys (flag names, - or _) set defaults, values checked as the "
                             "flags' own; flags given win")
    parser.add_argument("data_dir", nargs="?", default=None, metavar="DIR",
                        help="dataset root (omit for the embedded synthetic demo set)")
    parser.add_argument("--data-dir", dest="data_dir_option", default=None, metavar="DIR",
                        help="dataset root, as the positional DIR (timm's spelling)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="",
                      help="'' = ImageFolder under DIR; torch/cifar10, torch/cifar100; wds/NAME (webdataset shards "
                           "in DIR with DIR/_info.json); hfds/FOLDER (a local Hugging Face dataset folder); "
                           "synthetic (embedded demo)")
    data.add_argument("--train-num-samples", type=int, default=None, metavar="N",
                      help="wds: training images per epoch (default: the split's count in _info.json)")
    data.add_argument("--val-num-samples", type=int, default=None, metavar="N",
                      help="wds: validation images (default: the split's count in _info.json)")
    data.add_argument("--input-key", default=None,
                      help="wds / hfds: the image field (default: jpg;png;webp for wds, image for hfds)")
    data.add_argument("--input-img-mode", default="RGB", help="wds / hfds: PIL mode the images are converted to")
    data.add_argument("--target-key", default=None,
                      help="wds: a field of the json sidecar (default: the .cls file); hfds: the label "
                           "feature (default: label)")
    data.add_argument("--dataset-download", action="store_true", help="download torch/* datasets into DIR")
    data.add_argument("--train-split", default="train", help="training split folder / name")
    data.add_argument("--val-split", default="val", help="validation split ('val' falls back to 'validation')")
    data.add_argument("--num-classes", type=int, default=None,
                      help="classifier outputs (default: number of classes in the data)")
    data.add_argument("--img-size", type=int, default=None, help="input image size (default: the model's)")
    data.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                      help="input dimensions 3 H W with H = W: the same as --img-size H")
    data.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction for validation")
    data.add_argument("--mean", type=float, nargs=3, default=None, metavar="M", help="normalisation mean")
    data.add_argument("--std", type=float, nargs=3, default=None, metavar="S", help="normalisation std")
    data.add_argument("--interpolation", default="", help="resize interpolation (bilinear, bicubic, ...)")
    data.add_argument("-j", "--workers", type=int, default=4, help="data loading processes per training process")
    data.add_argument("-b", "--batch-size", type=int, default=128, help="batch size per process")
    data.add_argument("--repeated-aug", action="store_true",
                      help="repeated augmentation: each image 3 times per epoch, copies on different ranks "
                           "(the same as --aug-repeats 3)")
    data.add_argument("--aug-repeats", type=int, default=0, metavar="N",
                      help="repeated augmentation with N copies of each image per epoch (0 = off)")
    data.add_argument("--skip-corrupt", action="store_true",
                      help="replace an image file that does not decode by the next readable one and count it "
                           "(default: stop, naming the file)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help=f"timm model name (default: the --pretrain_path checkpoint's, else {DEFAULT_MODEL})")
    model.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V",
                       help="extra keyword arguments for timm.create_model")
    model.add_argument("--pretrained", action="store_true",
                       help="start from the model's pretrained weights (timm's pretrained loading: the hub / cache "
                            "unless --pretrained-path); the head is reset when --num-classes differs")
    model.add_argument("--pretrained-path", default=None, metavar="FILE",
                       help="load FILE as the model's pretrained weights (implies --pretrained): through the "
                            "model's checkpoint_filter_fn, the classifier reset when its class count differs")
    model.add_argument("--initial-checkpoint", "--pretrain_path", "--pretrain-path", "--checkpoint",
                       dest="initial_checkpoint", default="", metavar="PATH",
                       help="weights to start from (required with --evaluate; --checkpoint is timm validate.py's "
                            "spelling)")
    model.add_argument("--resume", default="", metavar="PATH|auto",
                       help="resume training from a checkpoint; 'auto' = last.pth.tar of the experiment if any, "
                            "else start fresh (for torchrun --max-restarts)")
    model.add_argument("--no-resume-opt", action="store_true",
                       help="on resume, restore weights and epoch but not optimizer / scheduler / scaler")
    model.add_argument("--start-epoch", type=int, default=None, help="override the starting epoch")
    model.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    model.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    model.add_argument("--start-thresh", type=float, default=None,
                       help="SViG: similarity threshold of the first block, in (0, 1); omit for kNN ViG")
    model.add_argument("--dec", type=float, default=None, help="SViG: threshold decrement per block (>= 0)")
    model.add_argument("--channels-last", action="store_true", help="channels-last memory layout")
    model.add_argument("--allow-small-graph", action="store_true",
                       help="train at an --img-size whose first graph layer has fewer nodes than its k (refused "
                            "by default, naming the smallest size that works)")
    model.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute block activations in the backward pass (less memory, more compute)")
    model.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the model (default backend: inductor)")
    model.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm across processes")
    model.add_argument("--model-ema", "--use-ema", dest="model_ema", action="store_true",
                       help="keep an EMA of the weights (training); evaluate the EMA weights (--evaluate; "
                            "--use-ema is timm validate.py's spelling)")
    model.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay")
    model.add_argument("--model-ema-warmup", action="store_true",
                       help="EMA decay warm-up: min(decay, (1 + updates) / (10 + updates)) (timm's ModelEmaV3)")
    model.add_argument("--model-dtype", default=None, choices=("float32", "float64", "bfloat16"),
                       help="train and evaluate with weights and inputs in this dtype (not with --amp; "
                            "default: float32)")

    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--opt", default="adamw", help="timm optimizer name")
    optim.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon")
    optim.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=0.05,
                       help="weight decay (not applied to norms, biases, position embeddings)")
    optim.add_argument("--clip-grad", type=float, default=None, help="gradient clipping threshold")
    optim.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"), help="gradient clipping mode")
    optim.add_argument("--lr", type=float, default=None,
                       help=f"learning rate; wins over --lr-base (unset and no --lr-base: {DEFAULT_LR:g})")
    optim.add_argument("--lr-base", type=float, default=None,
                       help="base learning rate: lr = lr_base * (global batch / --lr-base-size), the ratio "
                            "square-rooted with --lr-base-scale sqrt; used only without --lr")
    optim.add_argument("--lr-base-size", type=int, default=256,
                       help="global batch size (batch x processes x --grad-accum-steps) at which lr = lr_base")
    optim.add_argument("--lr-base-scale", default="", choices=("", "linear", "sqrt"),
                       help="'' = sqrt for Ada* / Lamb optimizers, linear otherwise (timm's rule)")
    optim.add_argument("--layer-decay", type=float, default=None,
                       help="layer-wise learning-rate decay: the model's group_matcher layers, the head at lr, "
                            "each layer below at decay x the one above")
    optim.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                       help="accumulate the gradients of N batches per optimizer update (the schedule counts "
                            "updates; the last group of an epoch may be smaller)")

    sched = parser.add_argument_group("schedule")
    sched.add_argument("--sched", default="cosine", choices=(*TIMM_SCHEDULES, ONECYCLE_LINEAR),
                       help=f"timm scheduler, or {ONECYCLE_LINEAR} (per step 0 -> --lr at 40 %% -> --lr / 20 "
                            "at 80 %% -> 0; ignores the warm-up, --min-lr and cooldown flags)")
    sched.add_argument("--epochs", type=int, default=300, help="training epochs")
    sched.add_argument("--warmup-epochs", type=int, default=5, help="linear warm-up epochs")
    sched.add_argument("--warmup-lr", type=float, default=1e-5, help="learning rate at the start of warm-up")
    sched.add_argument("--min-lr", type=float, default=0.0, help="floor of the cosine / poly schedule")
    sched.add_argument("--cooldown-epochs", type=int, default=0,
                       help="epochs at min-lr after the schedule; plateau: epochs without decay after a decay")
    sched.add_argument("--patience-epochs", type=int, default=10,
                       help="plateau: epochs without improvement of --eval-metric before the lr decays")
    sched.add_argument("--decay-epochs", type=float, default=90, help="step schedule: epochs between decays")
    sched.add_argument("--decay-rate", type=float, default=0.1, help="step schedule: decay factor")

    aug = parser.add_argument_group("augmentation and regularisation")
    aug.add_argument("--train-crop", default=None, choices=TRAIN_CROPS,
                     help="training crop: pad = random crop of the 4-px-padded image (32-px inputs only), "
                          "rrc = random-resized crop (default: pad at 32 px, else rrc)")
    aug.add_argument("--scale", type=float, nargs=2, default=None, metavar="S",
                     help="random-resized crop: range of the crop's area fraction (default 0.08 1)")
    aug.add_argument("--ratio", type=float, nargs=2, default=None, metavar="R",
                     help="random-resized crop: range of the crop's aspect ratio (default 0.75 1.333)")
    aug.add_argument("--aa", default=None,
                     help="timm AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1, or torchvision's "
                          f"RandAugment: {TV_RAND_PREFIX}[-n<ops>][-m<magnitude 0..bins-1>][-b<bins>], "
                          f"e.g. {TV_RAND_PREFIX}-n2-m12")
    aug.add_argument("--color-jitter", type=float, default=0.4, help="colour jitter strength")
    aug.add_argument("--force-color-jitter", action="store_true",
                     help="keep --color-jitter with --aa (applied after the policy); by default --aa replaces it")
    aug.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    aug.add_argument("--remode", default="pixel", help="random erasing mode")
    aug.add_argument("--recount", type=int, default=1, help="random erasing count")
    aug.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (active if > 0)")
    aug.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (active if > 0)")
    aug.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    aug.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both on")
    aug.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    aug.add_argument("--bce-loss", action="store_true",
                     help="binary cross-entropy on the (smoothed / mixed) targets instead of cross-entropy "
                          "(timm's BinaryCrossEntropy)")
    aug.add_argument("--bce-target-thresh", type=float, default=None,
                     help="--bce-loss: binarise the soft targets at this threshold")
    aug.add_argument("--bce-sum", action="store_true", help="--bce-loss: sum over classes instead of the mean")
    aug.add_argument("--bce-pos-weight", type=float, default=None, help="--bce-loss: weight of positive targets")
    aug.add_argument("--tta", type=int, nargs="?", const=FLIP_TTA, default=0, metavar="N",
                     help=f"test-time augmentation factor in validation (timm's integer): {FLIP_TTA} = the image and "
                          f"its horizontal mirror, 0 or 1 = off; bare --tta = {FLIP_TTA}")
    aug.add_argument("--edge-loss-weight", type=float, default=None, metavar="W",
                     help="weight of the batch-graph edge loss, BCE(edge_sim, same-class matrix), added to the "
                          "classification loss (models with an edge head, e.g. bgnn; default 1)")

    kd = parser.add_argument_group("knowledge distillation (timm.task)")
    kd.add_argument("--kd-model-name", default=None, metavar="MODEL",
                    help="teacher model (timm name); needs --kd-pretrained-path")
    kd.add_argument("--kd-pretrained-path", default=None, metavar="FILE",
                    help="the teacher's weights: a train.py checkpoint or a state dict (never downloaded)")
    kd.add_argument("--kd-model-kwargs", nargs="*", default=[], metavar="K=V",
                    help="extra keyword arguments for the teacher's timm.create_model")
    kd.add_argument("--kd-distill-type", default="logit", choices=("logit", "feature", "token"),
                    help="logit: KL of the softened logits; feature: MSE of the pooled pre-logits (a learned "
                         "projection when widths differ); token: the student's distillation head (DeiT-style)")
    kd.add_argument("--kd-token-distill-type", default="soft", choices=("soft", "hard"),
                    help="token distillation: soft = KL with temperature, hard = CE with the teacher's argmax")
    kd.add_argument("--kd-temperature", type=float, default=4.0, help="softmax temperature of logit / token KD")
    kd.add_argument("--distill-loss-weight", type=float, default=None,
                    help="weight of the distillation loss (1 when only it or neither weight is given)")
    kd.add_argument("--task-loss-weight", type=float, default=None,
                    help="weight of the classification loss; given alone, the distillation weight is 1 - it")

    run = parser.add_argument_group("run")
    run.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 where supported, else float16)")
    run.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"), help="force the AMP dtype")
    run.add_argument("--seed", type=int, default=42,
                     help="random seed; each epoch and rank reseeds from (seed, epoch, rank)")
    run.add_argument("--skip-nonfinite", action="store_true",
                     help="skip a training step whose loss is NaN / infinite, or whose update makes a weight so, "
                          "and count it: the step leaves no trace (weights, BatchNorm statistics, optimizer, EMA); "
                          "costs a copy of weights and optimizer state per step (default: stop)")
    run.add_argument("--max-consecutive-skips", type=int, default=None, metavar="N",
                     help=f"with --skip-nonfinite: stop the run after N steps skipped in a row "
                          f"(default {DEFAULT_MAX_CONSECUTIVE_SKIPS})")
    run.add_argument("--log-interval", type=int, default=50, help="batches between log lines")
    run.add_argument("--val-interval", type=int, default=1, metavar="N",
                     help="validate and save checkpoints every N epochs (and after the last)")
    run.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                     help="validation figure that ranks checkpoints (loss: lower is better; of the EMA with "
                          "--model-ema)")
    run.add_argument("--device", default=None, choices=("cpu", "cuda"),
                     help="training device type (default: cuda when available, else cpu; cuda:LOCAL_RANK "
                          "per process)")
    run.add_argument("--log-wandb", action="store_true",
                     help="log each epoch's summary row to Weights & Biases (pip install 'vig-toolkit[logging]'; "
                          "WANDB_MODE=offline honoured)")
    run.add_argument("--wandb-project", default=None, help="W&B project (default: wandb's)")
    run.add_argument("--wandb-tags", nargs="*", default=[], help="W&B run tags")
    run.add_argument("--log-tensorboard", default=None, metavar="DIR",
                     help="write each epoch's summary row as TensorBoard scalars into DIR "
                          "(pip install 'vig-toolkit[logging]')")
    run.add_argument("--checkpoint-hist", type=int, default=10, help="number of best epoch checkpoints kept")
    run.add_argument("--output", default="", metavar="DIR", help="output root (default ./output/train)")
    run.add_argument("--experiment", default="", help="run folder name under --output (default: dated)")
    run.add_argument("--break-lock", action="store_true",
                     help="take the run folder over even when its lock (.run.lock) names a run that may be alive "
                          "(another host's, which cannot be checked from here); logged")
    run.add_argument("--evaluate", action="store_true", help="only evaluate --pretrain_path on the val split")
    run.add_argument("--results-file", default=None, metavar="PATH",
                     help="--evaluate: also write the result to PATH, CSV for a .csv name, else JSON")
    run.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                     help="set by torch.distributed.launch; LOCAL_RANK in the environment wins")
    return parser


def _read_config(path: str) -> dict[Any, Any]:
    """The mapping a YAML config file holds ({} for an empty file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"config {path} must be a mapping of flag names to values")
    return loaded


def _flag_name(action: argparse.Action) -> str:
    long_options = [option for option in action.option_strings if option.startswith("--")]
    return long_options[0] if long_options else str(action.metavar or action.dest)


def _flag_tokens(action: argparse.Action, value: Any) -> list[str]:
    """The command-line tokens that give ``action`` the config value ``value``; UsageError if no tokens can."""
    name = _flag_name(action)
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise UsageError(f"{name} is a switch: expected true or false, got {value!r}")
        return [name] if value != action.default else []
    many = action.nargs not in (None, "?")
    values = value if many and isinstance(value, list) else [value]
    if any(isinstance(item, bool) or not isinstance(item, (str, int, float)) for item in values):
        expected = "a value or a list of values" if many else "one value"
        raise UsageError(f"{name} takes {expected}, got {value!r}")
    strings = [str(item) for item in values]
    if not action.option_strings:
        return ["--", *strings]
    return [name, *strings] if many else [f"{name}={strings[0]}"]


def _config_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """``value`` from a config, converted and checked as the flag's tokens would be (type, choices, nargs)."""
    if value is None and action.nargs != 0:
        if action.default is not None:
            raise UsageError(f"{_flag_name(action)} takes a value, not null (its default is {action.default!r})")
        return None
    if action.dest == "tta" and isinstance(value, bool):  # the seed recipe's switch: true = flip TTA
        return FLIP_TTA if value else 0
    if action.dest in KWARGS_FLAGS and isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise UsageError(f"{_flag_name(action)} takes a mapping with string keys, got {value!r}")
        return dict(value)
    parsed = getattr(parser.parse_args(_flag_tokens(action, value)), action.dest)
    return _parse_model_kwargs(parsed) if action.dest in KWARGS_FLAGS else parsed


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Map a YAML config's keys (dashes or underscores) onto parser destinations, with checked values.

    Each value goes through the parser as the equivalent flag tokens, so a config is held to the same
    types, choices and value counts as the command line.
    """
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for key, value in _read_config(path).items():
        dest = str(key).replace("-", "_")
        if dest in RETIRED_KEYS:
            harmless, reason = RETIRED_KEYS[dest]
            if value != harmless:
                raise UsageError(f"config {path}: key {key!r}: {reason}")
            continue
        if dest not in actions:
            raise UsageError(f"config {path}: unknown key {key!r}")
        try:
            defaults[dest] = _config_value(parser, actions[dest], value)
        except UsageError as err:
            raise UsageError(f"config {path}: key {key!r}: {err}") from None
    return defaults


def bare_tta_as_flip(argv: Sequence[str]) -> list[str]:
    """``argv`` with a bare ``--tta`` (the seed recipe's switch) spelled ``--tta=2`` when the next token is not an
    integer: argparse would otherwise take the next token, e.g. the data folder of ``--tta /data``, as the factor."""
    tokens = list(argv)
    for index, token in enumerate(tokens):
        if token == "--":
            break
        if token == "--tta":
            following = tokens[index + 1] if index + 1 < len(tokens) else ""
            if not following.lstrip("-").isdigit():
                tokens[index] = f"--tta={FLIP_TTA}"
    return tokens


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse flags (after applying `-c config.yaml` defaults) into the checked, typed run config."""
    argv = bare_tta_as_flip(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_parser = OneLineErrorParser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_config_defaults(parser, known.config))
    flags = vars(parser.parse_args(argv))
    for key in KWARGS_FLAGS:
        if not isinstance(flags[key], dict):
            flags[key] = _parse_model_kwargs(flags[key])
    return TrainConfig.from_flags(flags)


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def conflict_message(error: SettingConflict) -> str:
    """The flag advice for a model name / class count that contradicts a checkpoint (one line)."""
    conflict = error.conflict
    option = _option(conflict.name)
    return (f"{option} {conflict.given} contradicts {conflict.source}, which holds a "
            f"{conflict.name.replace('_', ' ')} of {conflict.recorded}; drop {option} to use the checkpoint's")


def override_message(override: SettingOverride) -> str:
    """The warning for a flag that wins over a checkpoint's recorded setting."""
    if override.key is not None:
        return (f"--model-kwargs {override.key}={override.given!r} overrides {override.key} of {override.source} "
                f"(trained with {override.recorded!r})")
    return (f"{_option(override.name)} {override.given} overrides {override.name} of {override.source} "
            f"(trained with {override.recorded})")


def merge_flag_settings(given: ModelSettings, recorded: ModelSettings, source: str, prefix: str = "") -> ModelSettings:
    """`vig.checkpoint.merge_settings` of the flags' settings with a checkpoint's, worded in flags: each flag
    that overrides a recorded setting logs a warning, a contradiction is a UsageError (``prefix`` + advice)."""
    try:
        merged = merge_settings(given, recorded, source)
    except SettingConflict as err:
        raise UsageError(prefix + conflict_message(err)) from None
    for override in setting_overrides(given, recorded, source):
        _LOGGER.warning("%s", override_message(override))
    return merged
